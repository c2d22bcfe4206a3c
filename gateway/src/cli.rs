//! The `tollgate` command line: `serve`, and the admin actions (the same ones the admin API
//! offers) against the embedded SQLite directory or PostgreSQL (`--database-url`).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use tollgate_gateway::admin::{parse_time, Admin, PROVIDER_TYPES};
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
        /// The ClickHouse database of the tables.
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
    /// The audit trail of admin actions, newest first (`audit requests`: audited requests).
    Audit {
        #[command(subcommand)]
        command: Option<AuditCommand>,
        /// How many entries to print.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Audited requests of a tenant (`[audit]`), newest first, read from ClickHouse.
    Requests {
        /// The tenant (name or id).
        #[arg(long)]
        tenant: String,
        /// Only this request.
        #[arg(long)]
        request_id: Option<String>,
        /// How many requests to print (1 to 1000).
        #[arg(long, default_value_t = 20)]
        limit: u64,
        /// ClickHouse's HTTP URL, where the audit log is.
        #[arg(long, env = "CLICKHOUSE_URL")]
        clickhouse_url: Option<String>,
        /// The ClickHouse database of `audit_log`.
        #[arg(long, default_value = "default")]
        clickhouse_database: String,
    },
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant; prints its id.
    Create {
        /// The tenant's name (unique).
        name: String,
        /// A plan (id or name) to put the tenant on.
        #[arg(long)]
        plan: Option<String>,
    },
    /// List tenants (JSON lines).
    List,
    /// Suspend a tenant (by id or name): its keys stop working everywhere at once.
    Suspend {
        /// The tenant, by id or name.
        tenant: String,
    },
    /// Reactivate a suspended tenant.
    Activate {
        /// The tenant, by id or name.
        tenant: String,
    },
    /// Put a tenant on a plan.
    SetPlan {
        /// The tenant, by id or name.
        tenant: String,
        /// The plan, by id or name.
        plan: String,
    },
}

#[derive(Args, Default)]
pub struct LimitArgs {
    /// Models the key may use (comma-separated; `prefix/*` patterns allowed).
    #[arg(long, visible_alias = "models", value_delimiter = ',')]
    pub allowed_models: Option<Vec<String>>,
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
    #[arg(long, visible_alias = "rpm")]
    pub rpm_limit: Option<i64>,
    /// Tokens (input + output) per minute.
    #[arg(long, visible_alias = "tpm")]
    pub tpm_limit: Option<i64>,
    /// Spend limit per billing period (decimal, in the plan's currency).
    #[arg(long, visible_alias = "spend")]
    pub spend_limit: Option<Decimal>,
    /// Concurrent requests (streams included).
    #[arg(long)]
    pub max_concurrent: Option<i64>,
    /// `soft`: a stream that crosses the token or spend limit finishes, and the next requests
    /// are refused; `hard` (default): the stream is cut.
    #[arg(long, value_parser = PossibleValuesParser::new(["hard", "soft"]), conflicts_with = "soft")]
    pub enforcement: Option<String>,
    /// Short for `--enforcement soft`.
    #[arg(long)]
    pub soft: bool,
}

impl ScopeLimitArgs {
    fn limits(&self) -> KeyLimits {
        KeyLimits {
            rpm_limit: self.rpm_limit,
            tpm_limit: self.tpm_limit,
            spend_limit: self.spend_limit,
            max_concurrent: self.max_concurrent,
            enforcement: if self.soft || self.enforcement.as_deref() == Some("soft") {
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
        /// The tenant (id or name) the key belongs to.
        #[arg(long)]
        tenant: String,
        /// A name for the key (shown in lists and the audit trail).
        #[arg(long, default_value = "")]
        name: String,
        /// Expiry: RFC 3339 (2027-01-01T00:00:00Z) or a date (2027-01-01, midnight UTC).
        #[arg(long, value_parser = parse_time)]
        expires_at: Option<OffsetDateTime>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List keys (JSON lines; never secrets).
    List {
        /// Only this tenant's keys (id or name).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key, given its id or the secret itself.
    Revoke {
        /// The key's id or its secret.
        key: String,
    },
    /// Replace a key (id or secret) with a new one; prints the new secret alone.
    Rotate {
        /// The key's id or its secret.
        key: String,
    },
}

#[derive(Subcommand)]
pub enum LimitCommand {
    /// Set a key's (id or secret) limits and allowed models; unset ones are cleared.
    Set {
        /// The key's id or its secret.
        key: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Set the limits of a tenant (by id or name), or of a tenant × model alias with
    /// `--model`; unset ones are cleared. Without a tenant-wide row its plan's limits apply.
    Tenant {
        /// The tenant, by id or name.
        tenant: String,
        /// A model alias as clients name it (default: `*`, the whole tenant).
        #[arg(long, default_value = "*")]
        model: String,
        #[command(flatten)]
        limits: ScopeLimitArgs,
    },
    /// Remove a tenant's (or tenant × model's) limit row.
    Clear {
        /// The tenant, by id or name.
        tenant: String,
        /// The model alias of the row (default: `*`, the tenant-wide row).
        #[arg(long, default_value = "*")]
        model: String,
    },
    /// List tenant limit rows (JSON lines).
    List {
        /// Only this tenant's rows (id or name).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Create a plan: a monthly fee and the limits of tenants without limits of their own.
    Create {
        /// The plan's name (unique).
        name: String,
        /// The fee per billing period (decimal).
        #[arg(long, default_value = "0")]
        monthly_fee: Decimal,
        /// ISO 4217 currency code.
        #[arg(long, default_value = "USD")]
        currency: String,
        /// Requests per minute of each tenant on the plan.
        #[arg(long, visible_alias = "rpm")]
        rpm_limit: Option<i64>,
        /// Tokens (input + output) per minute of each tenant on the plan.
        #[arg(long, visible_alias = "tpm")]
        tpm_limit: Option<i64>,
        /// Spend limit per billing period (decimal).
        #[arg(long)]
        monthly_spend_limit: Option<Decimal>,
    },
    /// List plans (JSON lines).
    List,
}

#[derive(Subcommand)]
pub enum PriceCommand {
    /// Add a price-book entry (prices per million tokens).
    Set {
        /// The model alias the price is for.
        #[arg(long)]
        model: String,
        /// Price per million input tokens (decimal).
        #[arg(long, visible_alias = "input")]
        input_per_mtok: Decimal,
        /// Price per million cached input tokens (decimal).
        #[arg(long, visible_alias = "cached-input")]
        cached_input_per_mtok: Decimal,
        /// Price per million output tokens (decimal).
        #[arg(long, visible_alias = "output")]
        output_per_mtok: Decimal,
        /// A tenant-specific override (id or name).
        #[arg(long)]
        tenant: Option<String>,
        /// When the price applies from: RFC 3339 or a date (midnight UTC); default now.
        #[arg(long, value_parser = parse_time)]
        effective_from: Option<OffsetDateTime>,
        /// ISO 4217 currency code.
        #[arg(long, default_value = "USD")]
        currency: String,
    },
    /// List price-book entries (JSON lines).
    List {
        /// Only this model's entries.
        #[arg(long)]
        model: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum DiscountCommand {
    /// Give a tenant a percentage off its usage, for one model or all, for a time range.
    Add {
        /// The tenant, by id or name.
        #[arg(long)]
        tenant: String,
        /// The discount in percent (decimal, 0 to 100).
        #[arg(long)]
        percent: Decimal,
        /// Only this model alias (default: every model).
        #[arg(long)]
        model: Option<String>,
        /// Start: RFC 3339 or a date (midnight UTC); default now.
        #[arg(long, visible_alias = "from", value_parser = parse_time)]
        effective_from: Option<OffsetDateTime>,
        /// End (exclusive): RFC 3339 or a date (midnight UTC); default open-ended.
        #[arg(long, visible_alias = "to", value_parser = parse_time)]
        effective_to: Option<OffsetDateTime>,
    },
    /// List discounts (JSON lines).
    List {
        /// Only this tenant's discounts (id or name).
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
        /// The file format.
        #[arg(long, value_enum)]
        format: Format,
        /// Output directory (created if needed).
        #[arg(long)]
        out: PathBuf,
    },
    /// Close a period that has ended: its invoices become final.
    Close {
        /// The billing period, YYYY-MM.
        #[arg(long)]
        period: String,
    },
}

#[derive(Subcommand)]
pub enum CredentialCommand {
    /// Store a provider credential; the secret is read from stdin (never from arguments).
    /// An existing name is refused unless `--replace` is given.
    Add {
        /// The credential's name, as deployments refer to it (`api_key_credential`).
        name: String,
        /// The provider type the credential is for.
        #[arg(long, value_parser = PossibleValuesParser::new(PROVIDER_TYPES))]
        provider: String,
        /// Overwrite a credential of the same name (without it, an existing name is an error).
        #[arg(long)]
        replace: bool,
    },
    /// List credentials: names, providers and master-key fingerprints, never secrets.
    List,
    /// Delete a credential.
    Remove {
        /// The credential's name.
        name: String,
    },
    /// Print a new random master key (base64) for TOLLGATE_MASTER_KEY.
    GenerateMasterKey,
    /// Re-encrypt every credential from TOLLGATE_MASTER_KEY_OLD to TOLLGATE_MASTER_KEY.
    RotateMaster,
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

impl Command {
    /// Whether the command may create an embedded store that does not exist yet: `serve` and
    /// the commands that create something from nothing. The others (lists, exports, changes to
    /// existing rows) refuse a data directory without a store, so that a mistyped
    /// `--data-dir`, or a run from another directory, is an error instead of an empty answer.
    pub fn may_create_store(&self) -> bool {
        matches!(
            self,
            Command::Serve { .. }
                | Command::Tenants {
                    command: TenantCommand::Create { .. }
                }
                | Command::Plans {
                    command: PlanCommand::Create { .. }
                }
                | Command::Prices {
                    command: PriceCommand::Set { .. }
                }
                | Command::Credentials {
                    command: CredentialCommand::Add { .. }
                }
        )
    }

    /// Whether the command reads or writes the metadata store at all.
    pub fn uses_store(&self) -> bool {
        !matches!(
            self,
            Command::Credentials {
                command: CredentialCommand::GenerateMasterKey
            }
        )
    }
}

/// Fails when `command` would read an embedded store that is not there (see
/// [`Command::may_create_store`]); with a PostgreSQL URL there is nothing to check.
pub fn check_store_exists(
    command: &Command,
    database_url: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<(), CliError> {
    if database_url.is_some() || command.may_create_store() || SqliteStore::exists_in(data_dir) {
        return Ok(());
    }
    Err(CliError::Failed(format!(
        "no Tollgate store in {}; create one with tollgate serve or pass --data-dir \
         (or --database-url)",
        data_dir.display()
    )))
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

/// Runs a command that needs no store (see [`Command::uses_store`]).
pub fn run_without_store(command: Command) -> Result<(), CliError> {
    match command {
        Command::Credentials {
            command: CredentialCommand::GenerateMasterKey,
        } => print_line(&MasterKey::generate_encoded()),
        _ => Err(CliError::Failed("this command needs the store".into())),
    }
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
                        limits.allowed_models.clone(),
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
                .set_key_limits(&key, limits.allowed_models.clone(), limits.limits())
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
                rpm_limit,
                tpm_limit,
                monthly_spend_limit,
            } => {
                let plan = Plan {
                    id: String::new(),
                    name,
                    monthly_fee,
                    currency,
                    rpm_limit,
                    tpm_limit,
                    monthly_spend_limit,
                };
                print_json(&[admin.create_plan(plan).await?])
            }
            PlanCommand::List => print_json(&admin.list_plans().await?),
        },
        Command::Prices { command } => match command {
            PriceCommand::Set {
                model,
                input_per_mtok,
                cached_input_per_mtok,
                output_per_mtok,
                tenant,
                effective_from,
                currency,
            } => {
                let price = Price {
                    model,
                    tenant_id: tenant,
                    effective_from: effective_from.unwrap_or_else(OffsetDateTime::now_utc),
                    input_per_mtok,
                    cached_input_per_mtok,
                    output_per_mtok,
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
                effective_from,
                effective_to,
            } => {
                let d = Discount {
                    tenant_id: tenant,
                    model,
                    percent,
                    effective_from: effective_from.unwrap_or_else(OffsetDateTime::now_utc),
                    effective_to,
                };
                print_json(&[admin.add_discount(d).await?])
            }
            DiscountCommand::List { tenant } => {
                print_json(&admin.list_discounts(tenant.as_deref()).await?)
            }
        },
        Command::Credentials { command } => match command {
            CredentialCommand::Add {
                name,
                provider,
                replace,
            } => {
                let mut secret = String::new();
                std::io::stdin().read_to_string(&mut secret)?;
                print_json(&[admin
                    .put_credential(&name, &provider, secret.trim(), replace)
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
        Command::Audit {
            command: None,
            limit,
        } => print_json(&admin.audit_log(limit).await?),
        Command::Audit {
            command:
                Some(AuditCommand::Requests {
                    tenant,
                    request_id,
                    limit,
                    clickhouse_url,
                    clickhouse_database,
                }),
            ..
        } => print_json(
            &admin
                .audited_requests(
                    clickhouse_url
                        .map(|u| {
                            tollgate_pipeline::audit::AuditStore::new(&u, &clickhouse_database, 1)
                        })
                        .as_ref(),
                    &tenant,
                    request_id.as_deref(),
                    Some(limit),
                )
                .await?,
        ),
        Command::Reconcile { .. } => Err(CliError::Failed(
            "reconcile needs the data directory; run it through `tollgate reconcile`".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: failing loudly is the point

    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every argument the CLI has, without a help line.
    fn missing_help(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
            missing.push(format!("{path}: subcommand without help"));
        }
        for arg in cmd.get_arguments() {
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path}: argument `{}` without help", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            missing_help(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    #[test]
    fn every_subcommand_and_argument_has_help() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        missing_help(&cmd, "tollgate", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
        // The walk sees what it must: a nested argument of a flattened group.
        let prices = cmd.find_subcommand("limits").unwrap();
        let set = prices.find_subcommand("set").unwrap();
        assert!(set.get_arguments().any(|a| a.get_id() == "rpm_limit"));
    }

    #[test]
    fn a_command_without_help_is_found() {
        let cmd = clap::Command::new("t")
            .about("top")
            .subcommand(clap::Command::new("bare").arg(clap::Arg::new("x").long("x")));
        let mut missing = Vec::new();
        missing_help(&cmd, "t", &mut missing);
        assert_eq!(missing.len(), 2, "{missing:?}");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_api_field_names_are_the_flags_and_the_old_spellings_still_work() {
        for (new, old) in [
            ("--rpm-limit", "--rpm"),
            ("--tpm-limit", "--tpm"),
            ("--spend-limit", "--spend"),
            ("--allowed-models", "--models"),
        ] {
            for flag in [new, old] {
                let value = if flag.ends_with("models") { "a,b" } else { "5" };
                let cli = Cli::try_parse_from(["tollgate", "limits", "set", "k", flag, value])
                    .unwrap_or_else(|e| panic!("{flag}: {e}"));
                let Command::Limits {
                    command: LimitCommand::Set { limits, .. },
                } = cli.command
                else {
                    panic!("not limits set");
                };
                let set = limits.limits();
                match new {
                    "--rpm-limit" => assert_eq!(set.rpm_limit, Some(5)),
                    "--tpm-limit" => assert_eq!(set.tpm_limit, Some(5)),
                    "--spend-limit" => assert_eq!(set.spend_limit, Some(Decimal::from(5))),
                    _ => assert_eq!(limits.allowed_models, Some(vec!["a".into(), "b".into()])),
                }
            }
        }
        for args in [
            [
                "--input-per-mtok",
                "--cached-input-per-mtok",
                "--output-per-mtok",
            ],
            ["--input", "--cached-input", "--output"],
        ] {
            let cli = Cli::try_parse_from([
                "tollgate", "prices", "set", "--model", "m", args[0], "1", args[1], "2", args[2],
                "3",
            ])
            .unwrap();
            let Command::Prices {
                command:
                    PriceCommand::Set {
                        input_per_mtok,
                        cached_input_per_mtok,
                        output_per_mtok,
                        ..
                    },
            } = cli.command
            else {
                panic!("not prices set");
            };
            assert_eq!(
                (input_per_mtok, cached_input_per_mtok, output_per_mtok),
                (Decimal::from(1), Decimal::from(2), Decimal::from(3))
            );
        }
        let soft = |args: &[&str]| {
            let mut all = vec!["tollgate", "limits", "tenant", "t"];
            all.extend_from_slice(args);
            let Command::Limits {
                command: LimitCommand::Tenant { limits, .. },
            } = Cli::try_parse_from(all).unwrap().command
            else {
                panic!("not limits tenant");
            };
            limits.limits().enforcement
        };
        assert_eq!(soft(&[]), Enforcement::Hard);
        assert_eq!(soft(&["--soft"]), Enforcement::Soft);
        assert_eq!(soft(&["--enforcement", "soft"]), Enforcement::Soft);
        assert_eq!(soft(&["--enforcement", "hard"]), Enforcement::Hard);
    }

    #[test]
    fn closed_sets_are_checked_by_the_parser() {
        let parse = |args: &[&str]| {
            let mut all = vec!["tollgate"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).map(|_| ())
        };
        let e = parse(&["credentials", "add", "x", "--provider", "opnai"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(e.to_string().contains("openai_compatible"), "{e}");
        for p in PROVIDER_TYPES {
            parse(&["credentials", "add", "x", "--provider", p]).unwrap();
        }
        let export = |f: &str| {
            parse(&[
                "invoices", "export", "--period", "2026-11", "--format", f, "--out", "o",
            ])
        };
        assert_eq!(
            export("pdf").unwrap_err().kind(),
            clap::error::ErrorKind::InvalidValue
        );
        for f in ["csv", "json", "html"] {
            export(f).unwrap();
        }
        let e = parse(&["limits", "tenant", "t", "--enforcement", "medium"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn date_flags_take_a_date_or_rfc_3339() {
        let from = |v: &str| {
            let cli = Cli::try_parse_from([
                "tollgate",
                "discounts",
                "add",
                "--tenant",
                "t",
                "--percent",
                "10",
                "--from",
                v,
            ])?;
            let Command::Discounts {
                command: DiscountCommand::Add { effective_from, .. },
            } = cli.command
            else {
                panic!("not discounts add");
            };
            Ok::<_, clap::Error>(effective_from.unwrap())
        };
        let midnight = time::macros::datetime!(2026-12-01 00:00 UTC);
        assert_eq!(from("2026-12-01").unwrap(), midnight);
        assert_eq!(from("2026-12-01T00:00:00Z").unwrap(), midnight);
        assert_eq!(from("2026-12-01T01:00:00+01:00").unwrap(), midnight);
        for bad in ["2026-13-01", "2026-12", "yesterday", "2026-12-01T25:00:00Z"] {
            assert!(from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_creating_commands_may_create_a_store() {
        let command = |args: &[&str]| {
            let mut all = vec!["tollgate"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().command
        };
        let dir = std::env::temp_dir().join(format!("tollgate-no-store-{}", std::process::id()));
        let list = command(&["tenants", "list"]);
        let e = check_store_exists(&list, None, &dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no Tollgate store in") && e.contains("--data-dir"),
            "{e}"
        );
        assert!(check_store_exists(&list, Some("postgres://x"), &dir).is_ok());
        assert!(check_store_exists(&command(&["tenants", "create", "a"]), None, &dir).is_ok());
        assert!(!dir.exists());
    }
}
