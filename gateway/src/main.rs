//! The `tollgate` binary: `serve`, and the admin commands (see `cli.rs`).

mod cli;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use clap::Parser;
use cli::{Cli, CliError, Command};
use tollgate_gateway::admin::Admin;
use tollgate_gateway::app::{self, AppState};
use tollgate_gateway::config::Config;
use tollgate_gateway::secrets::{MasterKey, MASTER_KEY_ENV};
use tollgate_gateway::store::KeyLimits;
use tollgate_gateway::telemetry::Telemetry;

/// glibc's allocator took about an eighth of the gateway's CPU time under load (every request
/// allocates its parsed body, headers, records); mimalloc's per-thread pages cost a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `serve` reads its configuration before logging starts: `[tracing]` decides whether a
    // trace layer goes beside the log lines.
    let config = match &cli.command {
        Command::Serve { config, .. } => match Config::load(config.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => return fail(&e),
        },
        _ => None,
    };
    let telemetry = match config.as_ref().map(|c| Telemetry::start(&c.tracing)) {
        Some(Err(e)) => return fail(&e),
        Some(Ok(t)) => t,
        None => None,
    };
    let (telemetry, traces) = telemetry.unzip();
    tollgate_pipeline::logging::init_with_traces(cli.log_format, traces);
    for warning in tollgate_gateway::config::unknown_env_vars(std::env::vars()) {
        tracing::warn!("{warning}");
    }
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
    let result = runtime.block_on(run(cli, config));
    // The last spans go out once every request is done; outside the runtime, which the
    // exporter does not use.
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> std::process::ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {e}");
    std::process::ExitCode::FAILURE
}

async fn run(cli: Cli, config: Option<Config>) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { listen, .. } => {
            // Loaded by `main` for every `serve`.
            let config = config.unwrap_or_default();
            serve(&cli.data_dir, cli.database_url.as_deref(), config, listen).await
        }
        command if !command.uses_store() => cli::run_without_store(command),
        command => {
            cli::check_store_exists(&command, cli.database_url.as_deref(), &cli.data_dir)?;
            let store = cli::open_store(cli.database_url.as_deref(), None, &cli.data_dir).await?;
            match command {
                command @ Command::Reconcile { .. } => {
                    cli::reconcile(store, &cli.data_dir, command).await
                }
                command => cli::run_admin(store, command).await,
            }
        }
    }
}

async fn serve(
    data_dir: &Path,
    database_url: Option<&str>,
    config: Config,
    listen: Option<String>,
) -> Result<(), CliError> {
    // Before anything opens files or sockets: as many descriptors as the hard limit allows,
    // and the connection cap derived from them (unless the config sets one).
    let fd_limit = tollgate_gateway::server::connections::raise_fd_limit();
    let master_key = MasterKey::from_env(MASTER_KEY_ENV)?.map(Arc::new);
    if config.server.preload_tokenizers {
        tokio::task::spawn_blocking(tollgate_gateway::tokens::warm_up);
    }
    let store =
        cli::open_store(database_url, config.store.database_url.as_deref(), data_dir).await?;
    if !config.server.production && store.list_tenants().await?.is_empty() {
        let admin = Admin {
            store: store.clone(),
            master: None,
            actor: "first-start".to_string(),
        };
        let tenant = admin.create_tenant("default", None).await?;
        let issued = admin
            .create_key(
                &tenant.id,
                "first key",
                None,
                None,
                KeyLimits::default(),
                serde_json::Value::Null,
            )
            .await?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "Created tenant `default` and its first API key (shown once, keep it):\n{}",
            issued.secret
        )?;
        out.flush()?;
    }
    let addr = listen.unwrap_or_else(|| config.server.listen.clone());
    let sink = tollgate_gateway::events::from_config(&config.events, data_dir).await?;
    let admin_token = std::env::var("TOLLGATE_ADMIN_TOKEN").ok();
    let state = AppState::start(config, store, sink, master_key, admin_token).await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let metrics_task = match state.config.server.metrics_listen.clone() {
        Some(metrics_addr) => {
            let metrics_listener = tokio::net::TcpListener::bind(&metrics_addr).await?;
            tracing::info!(
                "metrics on http://{}/metrics",
                metrics_listener.local_addr()?
            );
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(app::serve_metrics(
                metrics_listener,
                state.clone(),
                async move {
                    let _ = stopped.await;
                },
            ));
            Some((stop, task))
        }
        None if state.config.server.production => {
            tracing::warn!(
                "production: /metrics is not served; set server.metrics_listen to a private address"
            );
            None
        }
        None => None,
    };
    let edge = tollgate_gateway::edge::EdgeServer::start(&state).await?;
    let caps = app::connection_limits(&state.config);
    let show = |n: Option<u64>| n.map_or("unlimited".to_string(), |n| n.to_string());
    tracing::info!(
        "tollgate listening on {}://{} (models: {}; admin API {}; open files limit {} (was {}); connections at most {}, {} per client address)",
        if state.config.server.tls.is_some() {
            "https"
        } else {
            "http"
        },
        listener.local_addr()?,
        state.router.model_names().join(", "),
        if state.admin_token.is_some() {
            "on /admin/v1"
        } else {
            "off: set TOLLGATE_ADMIN_TOKEN"
        },
        show(fd_limit.now),
        show(fd_limit.before),
        show(u64::try_from(caps.max).ok().filter(|&n| n != u64::MAX)),
        match caps.per_address {
            0 => "no cap".to_string(),
            n => n.to_string(),
        },
    );
    let stopped = app::serve(listener, state.clone(), shutdown_signal()).await?;
    if let Some((stop, task)) = metrics_task {
        let _ = stop.send(());
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the metrics listener failed: {e}"),
            Err(e) => tracing::warn!("the metrics listener task failed: {e}"),
        }
    }
    if let Some(edge) = edge {
        edge.stop().await;
    }
    // Shutdown work may use store connections a serving thread opened: its runtime runs on
    // until `stopped` goes.
    state.shutdown().await;
    drop(stopped);
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
