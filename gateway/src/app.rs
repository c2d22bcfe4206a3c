//! The application: shared state, the router with its layers, and the server loop.
//!
//! Request path, outermost first:
//! 1. `CatchPanicLayer`: a bug becomes a 500 in OpenAI's error shape, never a dropped
//!    connection (no input is expected to panic; this is the last line of defence).
//! 2. The route's handler (`routes/`), which authenticates ([`crate::auth`]), reads the body
//!    within `server.max_body_bytes`, validates it ([`crate::api`]), picks a deployment
//!    ([`crate::routing`]), calls the provider ([`crate::providers`]) and relays the answer
//!    ([`crate::relay`], [`crate::translate`]); every request ends in one completion record
//!    given to the event sink ([`crate::events`]) and to the metrics ([`crate::metrics`]).
//!    `/admin/v1/...` is the admin API (`routes/admin.rs`), authenticated with the admin token.
//! 3. Unknown paths get a 404 and wrong methods a 405, in OpenAI's error shape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;

use crate::admin::Admin;
use crate::api::WireFormat;
use crate::auth::Authenticator;
use crate::config::{Config, DeploymentConfig};
use crate::error::GatewayError;
use crate::events::EventSink;
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
    pub metrics: Arc<Metrics>,
    pub sink: Arc<dyn EventSink>,
    /// The admin API's bearer token (`TOLLGATE_ADMIN_TOKEN`); `None` disables the admin API.
    pub admin_token: Option<String>,
    /// Encrypts provider credentials (`TOLLGATE_MASTER_KEY`).
    pub master_key: Option<Arc<MasterKey>>,
}

impl AppState {
    /// Builds the state: decrypts stored provider credentials for the router, and starts
    /// following the store's key invalidations.
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
        let metrics = Metrics::new().map_err(|e| GatewayError::Internal(e.to_string()))?;
        metrics
            .register(sink.collectors())
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let auth = Arc::new(Authenticator::new(
            store.clone(),
            Duration::from_millis(config.server.key_cache_ttl_ms),
        ));
        auth.follow().await?;
        Ok(Arc::new(AppState {
            auth,
            config,
            store,
            router,
            metrics: Arc::new(metrics),
            sink,
            admin_token: admin_token.filter(|t| !t.is_empty()),
            master_key,
        }))
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
    Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/messages", post(routes::chat::messages))
        .route("/v1/embeddings", post(routes::embeddings::embeddings))
        .route("/embeddings", post(routes::embeddings::embeddings))
        .route("/v1/models", get(routes::models::list))
        .route("/models", get(routes::models::list))
        .route("/v1/usage", get(routes::usage::usage))
        .nest("/admin/v1", routes::admin::routes())
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(state)
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

/// Serves `app` on `listener` until `shutdown` resolves; accepted sockets get `TCP_NODELAY`
/// (without it every streamed chunk can wait ~40 ms on Nagle and delayed ACKs).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The serving threads `server.worker_threads` asks for: 0 means one per available core.
pub fn worker_threads(config: &Config) -> usize {
    match config.server.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// `threads` listeners on `addr`, all accepting: with more than one, each is its own socket
/// bound with `SO_REUSEPORT` (the kernel spreads incoming connections over them) where the
/// platform balances that way (Linux), or one socket shared otherwise. A port of 0 is
/// resolved by the first bind and reused by the others.
pub fn bind_listeners(
    addr: SocketAddr,
    threads: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let threads = threads.max(1);
    let bind = |addr: SocketAddr, reuse_port: bool| -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        #[cfg(unix)]
        socket.set_reuse_address(true)?;
        #[cfg(target_os = "linux")]
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = reuse_port;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    let reuse_port = threads > 1 && cfg!(target_os = "linux");
    let first = bind(addr, reuse_port)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        let next = if reuse_port {
            bind(addr, true)?
        } else {
            listeners
                .first()
                .ok_or_else(|| std::io::Error::other("no listener"))?
                .try_clone()?
        };
        listeners.push(next);
    }
    Ok(listeners)
}

/// Serves on `listeners` (from [`bind_listeners`]) with one single-threaded runtime each:
/// the calling runtime serves the first, and a thread per other listener runs its own.
/// Each runtime accepts its own connections and keeps its own upstream connection pool, so
/// a request, its client connection and its upstream connection stay on one thread, with no
/// wake-ups across threads. State shared by all (stores, event sinks) lives on the calling
/// runtime, which must therefore be the one that built it. Returns once every runtime has
/// stopped: `shutdown` resolved and in-flight requests finished.
pub async fn serve_on_threads(
    listeners: Vec<std::net::TcpListener>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut listeners = listeners.into_iter();
    let first = listeners
        .next()
        .ok_or_else(|| std::io::Error::other("no listener to serve on"))?;
    let mut threads = Vec::new();
    for (i, listener) in listeners.enumerate() {
        let (state, stop) = (state.clone(), stopped(stop_rx.clone()));
        let thread = std::thread::Builder::new()
            .name(format!("tollgate-serve-{}", i + 1))
            .spawn(move || -> std::io::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    serve(tokio::net::TcpListener::from_std(listener)?, state, stop).await
                })
            });
        match thread {
            Ok(t) => threads.push(t),
            Err(e) => {
                let _ = stop_tx.send(true);
                return Err(e);
            }
        }
    }
    let signal = stop_tx.clone();
    let result = match tokio::net::TcpListener::from_std(first) {
        Ok(listener) => {
            serve(listener, state, async move {
                shutdown.await;
                let _ = signal.send(true);
            })
            .await
        }
        Err(e) => Err(e),
    };
    // Whatever ended this one (shutdown or an error) ends the others.
    let _ = stop_tx.send(true);
    let joined = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("serving thread panicked")))
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(std::io::Error::other)?;
    joined.into_iter().fold(result, |acc, r| acc.and(r))
}
