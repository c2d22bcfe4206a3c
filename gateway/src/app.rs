//! The application: shared state, the router with its layers, and the server loop.
//!
//! Request path, outermost first:
//! 1. `CatchPanicLayer`: a bug becomes a 500 in OpenAI's error shape, never a dropped
//!    connection (no input is expected to panic; this is the last line of defence).
//! 2. The route's handler (`routes/`), which authenticates ([`crate::auth`]), reads the body
//!    within `server.max_body_bytes`, validates it ([`crate::api`]), dispatches it to a
//!    deployment (strategy, retries, fallbacks, breakers, hedging: [`crate::routing`]) through
//!    the provider ([`crate::providers`]) and relays the answer
//!    ([`crate::relay`], [`crate::translate`]); every request ends in one completion record
//!    given to the event sink ([`crate::events`]) and to the metrics ([`crate::metrics`]).
//!    `/admin/v1/...` is the admin API (`routes/admin.rs`), authenticated with the admin token;
//!    `/v1/usage` and `/v1/audit/requests` read the caller's own tenant
//!    (`routes/caller.rs`: the tenant comes from the API key, never from a parameter).
//! 3. Unknown paths get a 404 and wrong methods a 405, in OpenAI's error shape. `/metrics`
//!    is one of them in production, or when `server.metrics_listen` gives the metrics a
//!    listener of their own ([`metrics_app`], [`serve_metrics`]).
//!
//! Beside the server, with the embedded default, the billing pipeline runs on its own thread
//! ([`crate::billing`]); [`AppState::shutdown`] stops it last, after the event sink flushed.
//!
//! The server ([`crate::server`]) runs the application on one single-threaded runtime per
//! core, each connection on one of them; the main runtime keeps the background work (key
//! cache invalidations, health checks, limit recovery, store and Redis connections).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use parking_lot::Mutex;
use tollgate_pipeline::sink::memory::MemoryBalances;

use crate::admin::Admin;
use crate::api::WireFormat;
use crate::auth::Authenticator;
use crate::billing::EmbeddedPipeline;
use crate::config::{Config, DeploymentConfig};
use crate::error::GatewayError;
use crate::events::EventSink;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::routes;
use crate::routing::ModelRouter;
use crate::secrets::MasterKey;
use crate::store::MetaStore;

/// Everything a handler needs.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn MetaStore>,
    pub auth: Arc<Authenticator>,
    pub router: ModelRouter,
    /// Quotas and rate limits.
    pub limiter: Arc<Limiter>,
    pub metrics: Arc<Metrics>,
    pub sink: Arc<dyn EventSink>,
    /// Which requests go to the audit trail (`[audit]`).
    pub audit: crate::audit::Auditor,
    /// Where audited requests are read back (`[audit] clickhouse_url`; `None` without it).
    pub audit_log: Option<tollgate_pipeline::audit::AuditStore>,
    /// The exact response cache, when `[cache] enabled`.
    pub cache: Option<Arc<crate::cache::ResponseCache>>,
    /// PII masking, when some policy can apply (`[privacy]`, aliases' `pii`).
    pub privacy: Option<Arc<crate::privacy::Privacy>>,
    /// The admin API's bearer token (`TOLLGATE_ADMIN_TOKEN`); `None` disables the admin API.
    pub admin_token: Option<String>,
    /// Encrypts provider credentials (`TOLLGATE_MASTER_KEY`).
    pub master_key: Option<Arc<MasterKey>>,
    /// Live balances the embedded billing pipeline publishes (empty when it does not run).
    balances: MemoryBalances,
    /// The embedded billing pipeline, until [`AppState::shutdown`] stops it.
    billing: Mutex<Option<EmbeddedPipeline>>,
    /// The embedded audit consumer, until [`AppState::shutdown`] stops it.
    audit_consumer: Mutex<Option<crate::audit::EmbeddedAudit>>,
}

impl AppState {
    /// Builds the state: decrypts stored provider credentials for the router, starts following
    /// the store's key invalidations, and starts the embedded billing pipeline when
    /// `billing.pipeline` is `embedded` and `sink` is the local event log.
    pub async fn start(
        config: Config,
        store: Arc<dyn MetaStore>,
        sink: Arc<dyn EventSink>,
        master_key: Option<Arc<MasterKey>>,
        admin_token: Option<String>,
    ) -> Result<Arc<Self>, GatewayError> {
        let admin = Admin {
            store: store.clone(),
            master: master_key.clone(),
            actor: "gateway".to_string(),
        };
        let credentials = if config
            .deployments
            .iter()
            .any(DeploymentConfig::uses_stored_credential)
        {
            admin.decrypt_credentials().await?
        } else {
            Default::default()
        };
        let router = ModelRouter::from_config(&config, &credentials)?;
        let audit = crate::audit::Auditor::new(
            &config.audit,
            crate::audit::deployment_secrets(&config, &credentials),
        );
        let metrics = Metrics::new().map_err(|e| GatewayError::Internal(e.to_string()))?;
        metrics
            .register(sink.collectors())
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        metrics
            .register(router.metrics.collectors())
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        router.start_background();
        let auth = Arc::new(
            Authenticator::new(
                store.clone(),
                Duration::from_millis(config.server.key_cache_ttl_ms),
            )
            .trust_edge(config.edge.trusted_secret.clone()),
        );
        auth.follow().await?;
        let balances = MemoryBalances::new();
        let limiter =
            Limiter::start(config.limits.clone(), store.clone(), balances.clone()).await?;
        metrics
            .register(limiter.collectors())
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        metrics
            .track_cost(limiter.price_book(), config.metrics.cost_tenant_labels_max)
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        limiter.spawn_recovery();
        let billing = match crate::billing::embedded_log_path(
            &config.billing,
            &config.events,
            sink.local_log_path(),
        ) {
            Some(log) => {
                let billing_metrics = metrics
                    .billing()
                    .map_err(|e| GatewayError::Internal(e.to_string()))?;
                let pipeline = EmbeddedPipeline::start(
                    &config.billing,
                    &config.events,
                    &log,
                    store.ledger_location(),
                    balances.clone(),
                    billing_metrics,
                )
                .map_err(|e| {
                    GatewayError::Internal(format!("cannot start the billing pipeline: {e}"))
                })?;
                let recovery = pipeline
                    .recovery_collector()
                    .map_err(|e| GatewayError::Internal(e.to_string()))?;
                metrics
                    .register(vec![Box::new(recovery)])
                    .map_err(|e| GatewayError::Internal(e.to_string()))?;
                Some(pipeline)
            }
            None => None,
        };
        let audit_topic = match &config.events {
            crate::events::EventsConfig::Local(l) => l.audit_topic.clone(),
            _ => tollgate_schemas::events::topics::AUDIT.to_string(),
        };
        let audit_consumer =
            crate::audit::EmbeddedAudit::start(&config.audit, sink.local_log_path(), &audit_topic)
                .map_err(|e| {
                    GatewayError::Internal(format!("cannot start the audit consumer: {e}"))
                })?;
        let cache = crate::cache::ResponseCache::from_config(
            &config.cache,
            metrics
                .cache()
                .map_err(|e| GatewayError::Internal(e.to_string()))?,
        )?;
        let privacy = crate::privacy::Privacy::new(
            &config.privacy,
            config.models.iter().filter_map(|m| m.pii),
            &metrics,
        )?;
        let audit_log = config.audit.reader();
        Ok(Arc::new(AppState {
            audit,
            audit_log,
            cache,
            privacy,
            auth,
            config,
            store,
            router,
            limiter,
            metrics: Arc::new(metrics),
            sink,
            admin_token: admin_token.filter(|t| !t.is_empty()),
            master_key,
            balances,
            billing: Mutex::new(billing),
            audit_consumer: Mutex::new(audit_consumer),
        }))
    }

    /// Live balances per tenant and billing period, as the embedded pipeline last committed
    /// them (absolute figures, versioned by ledger commit).
    pub fn balances(&self) -> &MemoryBalances {
        &self.balances
    }

    /// Graceful shutdown, once the server has stopped: writes out keys' last use, flushes the
    /// event sink, then stops the embedded billing pipeline, which commits what the flushed
    /// log holds.
    pub async fn shutdown(&self) {
        self.auth.flush_last_used().await;
        self.sink.shutdown().await;
        let billing = self.billing.lock().take();
        if let Some(pipeline) = billing {
            pipeline.stop().await;
        }
        let audit = self.audit_consumer.lock().take();
        if let Some(consumer) = audit {
            consumer.stop().await;
        }
    }

    /// Admin actions on behalf of `actor`.
    pub fn admin(&self, actor: &str) -> Admin {
        Admin {
            store: self.store.clone(),
            master: self.master_key.clone(),
            actor: actor.to_string(),
        }
    }
}

/// The HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    let metrics_here = state.config.server.metrics_on_api_port();
    let router = Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/messages", post(routes::chat::messages))
        .route("/v1/embeddings", post(routes::chat::embeddings))
        .route("/embeddings", post(routes::chat::embeddings))
        .route("/v1/realtime/chat", get(routes::realtime::chat))
        .route("/v1/models", get(routes::models::list))
        .route("/models", get(routes::models::list))
        .route("/v1/usage", get(routes::usage::usage))
        .route("/v1/audit/requests", get(routes::audit::requests))
        .nest("/admin/v1", routes::admin::routes())
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz));
    let router = if metrics_here {
        router.route("/metrics", get(routes::health::metrics))
    } else {
        router
    };
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(axum::middleware::from_fn(routes::request_id::assign))
        .with_state(state)
}

/// The application of the `server.metrics_listen` port: `GET /metrics` only.
pub fn metrics_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(routes::health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves [`metrics_app`] on `listener` (on the caller's runtime: scrapes are rare and
/// small) until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found(uri: Uri) -> Response {
    GatewayError::NotFound(format!("Unknown request URL: {}", uri.path()))
        .into_response_for(WireFormat::OpenAi)
}

async fn method_not_allowed() -> Response {
    let body =
        GatewayError::bad_request("Method not allowed for this URL.").body(WireFormat::OpenAi);
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    GatewayError::Internal("unexpected internal error".to_string())
        .into_response_for(WireFormat::OpenAi)
}

/// A limit in milliseconds from the config, where 0 means none.
fn limit_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The caps on client connections that `config` sets: `server.max_connections`, else derived
/// from the process's open-files limit as it is now (raise it first:
/// [`crate::server::connections::raise_fd_limit`]).
pub fn connection_limits(config: &Config) -> crate::server::connections::ConnectionLimits {
    use crate::server::connections;
    let max = match config.server.max_connections {
        0 => connections::derived_max_connections(connections::fd_limit()),
        n => n,
    };
    connections::ConnectionLimits {
        max,
        per_address: config.server.max_connections_per_ip,
    }
}

/// Serves the application on `listener` until `shutdown` resolves and every in-flight request
/// has been answered ([`crate::server`]: one serving thread per core, `server.threads` and
/// `server.busy_poll_us`). Drop the result after [`AppState::shutdown`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<crate::server::Stopped> {
    let metrics = state
        .metrics
        .server()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let server = &state.config.server;
    let options = crate::server::ServeOptions {
        threads: server.threads,
        busy_poll: Duration::from_micros(server.busy_poll_us),
        metrics: Some(metrics),
        header_read_timeout: limit_ms(server.header_read_timeout_ms),
        shutdown_grace: limit_ms(server.shutdown_grace_ms),
        first_byte_timeout: limit_ms(server.first_byte_timeout_ms),
        idle_timeout: limit_ms(server.idle_timeout_ms),
        body_read_timeout: limit_ms(server.body_read_timeout_ms),
        connection_limits: connection_limits(&state.config),
        tls: match &server.tls {
            Some(config) => Some(Arc::new(
                crate::server::tls::ServerTls::load(config)
                    .map_err(|e| std::io::Error::other(format!("server.tls: {e}")))?,
            )),
            None => None,
        },
    };
    crate::server::serve(listener, app(state), options, shutdown).await
}
