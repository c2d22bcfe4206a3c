//! The `tollgate` command: `serve`, and the key-management commands of the embedded store.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tollgate_gateway::app::{self, AppState};
use tollgate_gateway::auth::keys;
use tollgate_gateway::config::Config;
use tollgate_gateway::store::sqlite::SqliteStore;
use tollgate_gateway::store::{MetaStore, StoreError};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Tollgate LLM gateway")]
struct Cli {
    /// Directory of the embedded store (SQLite).
    #[arg(
        long,
        global = true,
        default_value = "./.tollgate",
        env = "TOLLGATE_DATA_DIR"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file (TOML). Without one, the built-in mock models and any provider
        /// whose key is in the environment are served.
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address (overrides `server.listen`).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Manage tenants.
    Tenants {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints its id.
    Create { name: String },
    /// List tenants.
    List,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an API key for a tenant; prints the secret alone (shown once).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        name: String,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Config(#[from] tollgate_gateway::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Gateway(#[from] tollgate_gateway::error::GatewayError),
    #[error(transparent)]
    Events(#[from] tollgate_gateway::events::EventsError),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { config, listen } => serve(&cli.data_dir, config.as_deref(), listen).await,
        Command::Tenants { command } => {
            let store = SqliteStore::open(&cli.data_dir).await?;
            let mut out = std::io::stdout().lock();
            match command {
                TenantCommand::Create { name } => {
                    let t = store.create_tenant(&name).await?;
                    writeln!(out, "{}", t.id)?;
                }
                TenantCommand::List => {
                    for t in store.list_tenants().await? {
                        writeln!(out, "{}\t{}\t{}", t.id, t.name, t.status)?;
                    }
                }
            }
            Ok(())
        }
        Command::Keys {
            command: KeyCommand::Create { tenant, name },
        } => {
            let store = SqliteStore::open(&cli.data_dir).await?;
            let t = store
                .tenant_by_name(&tenant)
                .await?
                .ok_or_else(|| CliError::Usage(format!("no tenant named `{tenant}`")))?;
            let secret = create_key(&store, &t.id, &name).await?;
            writeln!(std::io::stdout().lock(), "{secret}")?;
            Ok(())
        }
    }
}

async fn create_key(
    store: &dyn MetaStore,
    tenant_id: &str,
    name: &str,
) -> Result<String, StoreError> {
    let k = keys::generate();
    store
        .create_key(tenant_id, name, &k.hash, &k.display_prefix)
        .await?;
    Ok(k.secret)
}

async fn serve(
    data_dir: &Path,
    config_path: Option<&Path>,
    listen: Option<String>,
) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    tokio::task::spawn_blocking(tollgate_gateway::tokens::warm_up);
    let store = Arc::new(SqliteStore::open(data_dir).await?);
    if !config.server.production && store.list_tenants().await?.is_empty() {
        let t = store.create_tenant("default").await?;
        let secret = create_key(store.as_ref(), &t.id, "first key").await?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "Created tenant `default` and its first API key (shown once, keep it):\n{secret}"
        )?;
        out.flush()?;
    }
    let addr = listen.unwrap_or_else(|| config.server.listen.clone());
    let sink = tollgate_gateway::events::from_config(&config.events, data_dir).await?;
    let state = Arc::new(AppState::new(config, store, sink)?);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(
        "tollgate listening on http://{} (models: {})",
        listener.local_addr()?,
        state.router.model_names().join(", ")
    );
    app::serve(listener, state, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
