//! The `tollgate` command line: `serve`, and the admin actions (the same ones the admin API
//! offers) against the embedded SQLite directory or PostgreSQL (`--database-url`).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use tollgate_gateway::admin::Admin;
use tollgate_gateway::invoices::render::{write_files, Format};
use tollgate_gateway::secrets::{MasterKey, MASTER_KEY_ENV, OLD_MASTER_KEY_ENV};
use tollgate_gateway::store::postgres::PostgresStore;
use tollgate_gateway::store::sqlite::SqliteStore;
use tollgate_gateway::store::{Discount, Enforcement, KeyLimits, MetaStore, Plan, Price};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Tollgate LLM gateway")]
pub struct Cli {
    /// Directory of the embedded store (SQLite) and local state.
    #[arg(
        long,
        global = true,
        default_value = "./.tollgate",
        env = "TOLLGATE_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// PostgreSQL URL of the metadata store; without it the embedded SQLite store is used.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Log lines as `text` (coloured on a terminal only) or `json` (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "TOLLGATE_LOG_FORMAT"
    )]
    pub log_format: tollgate_pipeline::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Tenants.
    Tenants {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Limits: per key (with model allow-lists), per tenant and per tenant × model.
    Limits {
        #[command(subcommand)]
        command: LimitCommand,
    },
    /// Plans.
    Plans {
        #[command(subcommand)]
        command: PlanCommand,
    },
    /// The effective-dated price book.
    Prices {
        #[command(subcommand)]
        command: PriceCommand,
    },
    /// Tenant discounts.
    Discounts {
        #[command(subcommand)]
        command: DiscountCommand,
    },
    /// Provider credentials, encrypted with the master key (TOLLGATE_MASTER_KEY).
    Credentials {
        #[command(subcommand)]
        command: CredentialCommand,
    },
    /// Invoices per tenant and billing period (YYYY-MM, UTC months).
    Invoices {
        #[command(subcommand)]
        command: InvoiceCommand,
    },
    /// Compares, per tenant × model, the completion events, the ledger, ClickHouse and the
    /// invoices of a period; prints the differences and fails if there are any.
    Reconcile {
        /// The billing period, YYYY-MM (UTC).
        #[arg(long)]
        period: String,
        /// Read the events from this Kafka cluster (else the local log in the data directory).
        #[arg(long)]
        kafka_bootstrap: Option<String>,
        /// The completions topic.
        #[arg(long, default_value = "llm.completions")]
        topic: String,
        /// Also compare ClickHouse's tables (HTTP URL).
        #[arg(long)]
        clickhouse_url: Option<String>,
        #[arg(long, default_value = "default")]
        clickhouse_database: String,
        /// Print every row, not only the differing ones.
        #[arg(long)]
        all: bool,
        /// Compare the Flink SQL job's tables (flink_usage_minutes, flink_usage_periods) with
        /// the ledger instead, per tenant × model × minute (PostgreSQL: --database-url).
        #[arg(long, conflicts_with_all = ["kafka_bootstrap", "clickhouse_url"])]
        flink: bool,
    },
    /// The audit trail of admin actions, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant; prints its id.
    Create {
        name: String,
        #[arg(long)]
        plan: Option<String>,
    },
    /// List tenants (JSON lines).
    List,
    /// Suspend a tenant (by id or name): its keys stop working everywhere at once.
    Suspend { tenant: String },
    /// Reactivate a suspended tenant.
    Activate { tenant: String },
    /// Put a tenant on a plan.
    SetPlan { tenant: String, plan: String },
}

#[derive(Args, Default)]
pub struct LimitArgs {
    /// Models the key may use (comma-separated; `prefix/*` patterns allowed).
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    #[command(flatten)]
    pub scope: ScopeLimitArgs,
}

impl LimitArgs {
    fn limits(&self) -> KeyLimits {
        self.scope.limits()
    }
}

/// The limits of one scope (key, tenant, tenant × model).
#[derive(Args, Default)]
pub struct ScopeLimitArgs {
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<i64>,
    /// Tokens (input + output) per minute.
    #[arg(long)]
    pub tpm: Option<i64>,
    /// Spend limit per billing period (decimal, in the plan's currency).
    #[arg(long)]
    pub spend: Option<Decimal>,
    /// Concurrent requests (streams included).
    #[arg(long)]
    pub max_concurrent: Option<i64>,
    /// Soft limits: a stream that crosses the token or spend limit finishes, and the next
    /// requests are refused (default: hard, the stream is cut).
    #[arg(long)]
    pub soft: bool,
}

impl ScopeLimitArgs {
    fn limits(&self) -> KeyLimits {
        KeyLimits {
            rpm_limit: self.rpm,
            tpm_limit: self.tpm,
            spend_limit: self.spend,
            max_concurrent: self.max_concurrent,
            enforcement: if self.soft {
                Enforcement::Soft
            } else {
                Enforcement::Hard
            },
        }
    }
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a key; prints the secret alone (shown once).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
        #[arg(long, value_parser = parse_time)]
        expires_at: Option<OffsetDateTime>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List keys (JSON lines; never secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key, given its id or the secret itself.
    Revoke { key: String },
    /// Replace a key (id or secret) with a new one; prints the new secret alone.
    Rotate { key: String },
}

#[derive(Subcommand)]
pub enum LimitCommand {
    /// Set a key's (id or secret) limits and allowed models; unset ones are cleared.
    Set {
        key: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Set the limits of a tenant (by id or name), or of a tenant × model alias with
    /// `--model`; unset ones are cleared. Without a tenant-wide row its plan's limits apply.
    Tenant {
        tenant: String,
        /// A model alias as clients name it (default: `*`, the whole tenant).
        #[arg(long, default_value = "*")]
        model: String,
        #[command(flatten)]
        limits: ScopeLimitArgs,
    },
    /// Remove a tenant's (or tenant × model's) limit row.
    Clear {
        tenant: String,
        #[arg(long, default_value = "*")]
        model: String,
    },
    /// List tenant limit rows (JSON lines).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum PlanCommand {
    Create {
        name: String,
        #[arg(long, default_value = "0")]
        monthly_fee: Decimal,
        #[arg(long, default_value = "USD")]
        currency: String,
        #[arg(long)]
        rpm: Option<i64>,
        #[arg(long)]
        tpm: Option<i64>,
        #[arg(long)]
        monthly_spend_limit: Option<Decimal>,
    },
    List,
}

#[derive(Subcommand)]
pub enum PriceCommand {
    /// Add a price-book entry (prices per million tokens).
    Set {
        #[arg(long)]
        model: String,
        #[arg(long)]
        input: Decimal,
        #[arg(long)]
        cached_input: Decimal,
        #[arg(long)]
        output: Decimal,
        /// A tenant-specific override.
        #[arg(long)]
        tenant: Option<String>,
        /// When the price applies from (RFC 3339; default now).
        #[arg(long, value_parser = parse_time)]
        effective_from: Option<OffsetDateTime>,
        #[arg(long, default_value = "USD")]
        currency: String,
    },
    List {
        #[arg(long)]
        model: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum DiscountCommand {
    Add {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        percent: Decimal,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, value_parser = parse_time)]
        from: Option<OffsetDateTime>,
        #[arg(long, value_parser = parse_time)]
        to: Option<OffsetDateTime>,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum InvoiceCommand {
    /// Write one file per invoice (`<number>.<ext>`) into a directory, all or nothing;
    /// prints the paths written. The current period exports as drafts.
    Export {
        /// The billing period, YYYY-MM.
        #[arg(long)]
        period: String,
        /// One tenant (id or name); default all.
        #[arg(long)]
        tenant: Option<String>,
        /// csv, json or html.
        #[arg(long)]
        format: Format,
        /// Output directory (created if needed).
        #[arg(long)]
        out: PathBuf,
    },
    /// Close a period that has ended: its invoices become final.
    Close {
        #[arg(long)]
        period: String,
    },
}

#[derive(Subcommand)]
pub enum CredentialCommand {
    /// Store a provider credential; the secret is read from stdin (never from arguments).
    Add {
        name: String,
        #[arg(long)]
        provider: String,
    },
    List,
    Remove {
        name: String,
    },
    /// Print a new random master key (base64) for TOLLGATE_MASTER_KEY.
    GenerateMasterKey,
    /// Re-encrypt every credential from TOLLGATE_MASTER_KEY_OLD to TOLLGATE_MASTER_KEY.
    RotateMaster,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("expected an RFC 3339 time such as 2027-01-01T00:00:00Z: {e}"))
}

/// CLI failures: printed as `error: ...` with exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] tollgate_gateway::config::ConfigError),
    #[error(transparent)]
    Store(#[from] tollgate_gateway::store::StoreError),
    #[error(transparent)]
    Secrets(#[from] tollgate_gateway::secrets::SecretsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Gateway(#[from] tollgate_gateway::error::GatewayError),
    #[error(transparent)]
    Events(#[from] tollgate_gateway::events::EventsError),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Invoices(#[from] tollgate_gateway::invoices::InvoiceError),
    #[error(transparent)]
    Reconcile(#[from] tollgate_gateway::reconcile::ReconcileError),
    #[error("{0}")]
    Failed(String),
}

/// Opens the metadata store the flags select.
pub async fn open_store(
    cli_url: Option<&str>,
    config_url: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn MetaStore>, CliError> {
    Ok(match cli_url.or(config_url) {
        Some(url) => Arc::new(PostgresStore::connect(url).await?),
        None => Arc::new(SqliteStore::open(data_dir).await?),
    })
}

fn print_json<T: serde::Serialize>(items: &[T]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    for item in items {
        writeln!(out, "{}", serde_json::to_string(item)?)?;
    }
    Ok(())
}

/// `tollgate reconcile`: prints the report; an error when anything disagrees.
pub async fn reconcile(
    store: Arc<dyn MetaStore>,
    data_dir: &std::path::Path,
    command: Command,
) -> Result<(), CliError> {
    use tollgate_gateway::reconcile::{ClickHouseTarget, EventSource};
    let Command::Reconcile {
        period,
        kafka_bootstrap,
        topic,
        clickhouse_url,
        clickhouse_database,
        all,
        flink,
    } = command
    else {
        return Err(CliError::Failed("not a reconcile command".into()));
    };
    if flink {
        let report = tollgate_gateway::reconcile::reconcile_flink(&*store, &period).await?;
        write!(
            std::io::stdout().lock(),
            "{}",
            tollgate_gateway::reconcile::render_flink(&report, all)
        )?;
        let differing = report.differences();
        if differing > 0 {
            return Err(CliError::Failed(format!(
                "{differing} rows of {period} differ between the ledger and Flink"
            )));
        }
        return Ok(());
    }
    let events = match kafka_bootstrap {
        Some(bootstrap) => EventSource::Kafka { bootstrap, topic },
        None => EventSource::LocalLog {
            path: tollgate_gateway::events::local_log::LocalEventLog::default_path(data_dir),
        },
    };
    let clickhouse = clickhouse_url.map(|url| ClickHouseTarget {
        url,
        database: clickhouse_database,
    });
    let report =
        tollgate_gateway::reconcile::reconcile(&*store, &period, &events, clickhouse.as_ref())
            .await?;
    write!(
        std::io::stdout().lock(),
        "{}",
        tollgate_gateway::reconcile::render(&report, all)
    )?;
    let differing = report.values().filter(|r| !r.agrees()).count();
    if differing > 0 {
        return Err(CliError::Failed(format!(
            "{differing} tenant × model rows of {period} disagree"
        )));
    }
    Ok(())
}

fn print_line(text: &str) -> Result<(), CliError> {
    writeln!(std::io::stdout().lock(), "{text}")?;
    Ok(())
}

fn actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_string())
    )
}

/// Runs an admin command.
pub async fn run_admin(store: Arc<dyn MetaStore>, command: Command) -> Result<(), CliError> {
    let master = MasterKey::from_env(MASTER_KEY_ENV)?.map(Arc::new);
    let admin = Admin {
        store,
        master,
        actor: actor(),
    };
    match command {
        Command::Serve { .. } => Ok(()),
        Command::Tenants { command } => match command {
            TenantCommand::Create { name, plan } => {
                print_line(&admin.create_tenant(&name, plan.as_deref()).await?.id)
            }
            TenantCommand::List => print_json(&admin.list_tenants().await?),
            TenantCommand::Suspend { tenant } => {
                print_json(&[admin.set_tenant_active(&tenant, false).await?])
            }
            TenantCommand::Activate { tenant } => {
                print_json(&[admin.set_tenant_active(&tenant, true).await?])
            }
            TenantCommand::SetPlan { tenant, plan } => {
                print_json(&[admin.set_tenant_plan(&tenant, &plan).await?])
            }
        },
        Command::Keys { command } => match command {
            KeyCommand::Create {
                tenant,
                name,
                expires_at,
                limits,
            } => {
                let issued = admin
                    .create_key(
                        &tenant,
                        &name,
                        expires_at,
                        limits.models.clone(),
                        limits.limits(),
                        serde_json::Value::Null,
                    )
                    .await?;
                print_line(&issued.secret)
            }
            KeyCommand::List { tenant } => print_json(&admin.list_keys(tenant.as_deref()).await?),
            KeyCommand::Revoke { key } => print_json(&[admin.revoke_key(&key).await?]),
            KeyCommand::Rotate { key } => print_line(&admin.rotate_key(&key).await?.secret),
        },
        Command::Limits { command } => match command {
            LimitCommand::Set { key, limits } => print_json(&[admin
                .set_key_limits(&key, limits.models.clone(), limits.limits())
                .await?]),
            LimitCommand::Tenant {
                tenant,
                model,
                limits,
            } => print_json(&[admin
                .set_tenant_limit(&tenant, &model, limits.limits())
                .await?]),
            LimitCommand::Clear { tenant, model } => {
                admin.delete_tenant_limit(&tenant, &model).await?;
                Ok(())
            }
            LimitCommand::List { tenant } => {
                print_json(&admin.tenant_limits(tenant.as_deref()).await?)
            }
        },
        Command::Plans { command } => match command {
            PlanCommand::Create {
                name,
                monthly_fee,
                currency,
                rpm,
                tpm,
                monthly_spend_limit,
            } => {
                let plan = Plan {
                    id: String::new(),
                    name,
                    monthly_fee,
                    currency,
                    rpm_limit: rpm,
                    tpm_limit: tpm,
                    monthly_spend_limit,
                };
                print_json(&[admin.create_plan(plan).await?])
            }
            PlanCommand::List => print_json(&admin.list_plans().await?),
        },
        Command::Prices { command } => match command {
            PriceCommand::Set {
                model,
                input,
                cached_input,
                output,
                tenant,
                effective_from,
                currency,
            } => {
                let price = Price {
                    model,
                    tenant_id: tenant,
                    effective_from: effective_from.unwrap_or_else(OffsetDateTime::now_utc),
                    input_per_mtok: input,
                    cached_input_per_mtok: cached_input,
                    output_per_mtok: output,
                    currency,
                };
                print_json(&[admin.add_price(price).await?])
            }
            PriceCommand::List { model } => print_json(&admin.list_prices(model.as_deref()).await?),
        },
        Command::Discounts { command } => match command {
            DiscountCommand::Add {
                tenant,
                percent,
                model,
                from,
                to,
            } => {
                let d = Discount {
                    tenant_id: tenant,
                    model,
                    percent,
                    effective_from: from.unwrap_or_else(OffsetDateTime::now_utc),
                    effective_to: to,
                };
                print_json(&[admin.add_discount(d).await?])
            }
            DiscountCommand::List { tenant } => {
                print_json(&admin.list_discounts(tenant.as_deref()).await?)
            }
        },
        Command::Credentials { command } => match command {
            CredentialCommand::Add { name, provider } => {
                let mut secret = String::new();
                std::io::stdin().read_to_string(&mut secret)?;
                print_json(&[admin
                    .put_credential(&name, &provider, secret.trim())
                    .await?])
            }
            CredentialCommand::List => print_json(&admin.list_credentials().await?),
            CredentialCommand::Remove { name } => {
                admin.delete_credential(&name).await.map_err(Into::into)
            }
            CredentialCommand::GenerateMasterKey => print_line(&MasterKey::generate_encoded()),
            CredentialCommand::RotateMaster => {
                let old = MasterKey::from_env(OLD_MASTER_KEY_ENV)?
                    .ok_or(tollgate_gateway::secrets::SecretsError::Missing)?;
                let new = MasterKey::from_env(MASTER_KEY_ENV)?
                    .ok_or(tollgate_gateway::secrets::SecretsError::Missing)?;
                let n = admin.rotate_master(&old, &new).await?;
                print_line(&format!(
                    "re-encrypted {n} credential(s) under key {}",
                    new.fingerprint()
                ))
            }
        },
        Command::Invoices { command } => match command {
            InvoiceCommand::Export {
                period,
                tenant,
                format,
                out,
            } => {
                let invoices = admin.invoices(&period, tenant.as_deref()).await?;
                for path in write_files(&out, &invoices, format)? {
                    print_line(&path.display().to_string())?;
                }
                Ok(())
            }
            InvoiceCommand::Close { period } => print_json(&[admin.close_period(&period).await?]),
        },
        Command::Audit { limit } => print_json(&admin.audit_log(limit).await?),
        Command::Reconcile { .. } => Err(CliError::Failed(
            "reconcile needs the data directory; run it through `tollgate reconcile`".into(),
        )),
    }
}
