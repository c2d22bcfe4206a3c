//! Envoy in front of the gateways: the gRPC services Envoy calls, and trust in the identity
//! headers it forwards.
//!
//! ```text
//! client ──TLS──▶ Envoy ── ext_authz ──▶ Tollgate gRPC: Authorization.Check (authz.rs)
//!                   │ ─── ratelimit ──▶ Tollgate gRPC: RateLimitService (ratelimit.rs)
//!                   ▼
//!            gateway pool (HTTP) ── believes x-tollgate-* only with the edge secret (trust.rs)
//! ```
//!
//! | file | owns |
//! |---|---|
//! | `authz.rs` | `envoy.service.auth.v3.Authorization`: the key check, identity headers, denials in OpenAI's shape |
//! | `ratelimit.rs` | `envoy.service.ratelimit.v3.RateLimitService`: requests (and tokens) per minute per tenant and key |
//! | `trust.rs` | the HTTP path's side: identity headers count only with `edge.trusted_secret` |
//!
//! Tokens per minute at the edge: Envoy reads a key's and tenant's count before a request,
//! and adds a request's tokens when its response ends, which the gateway sends as
//! [`USAGE_TOKENS_HEADER`] (a header, or a stream's trailer: `crate::relay::usage_trailer`).
//!
//! The services run in the gateway process on `edge.grpc_listen` ([`serve`]), with
//! `grpc.health.v1.Health` and server reflection (`grpc.reflection.v1` and `v1alpha`) beside
//! them. Reflection lists all four services, but describes only Health and itself: the
//! `envoy-types` crate compiles Envoy's protos without exporting their descriptor set, so a
//! client calling ext_authz or the rate-limit service by reflection needs Envoy's protos. They use the gateway's own key cache (with its
//! revocation feed) and its limiter (memory or Redis), so a key revoked or a limit changed
//! applies at the edge as it does on the HTTP path.

pub mod authz;
pub mod ratelimit;
pub mod trust;

use std::sync::Arc;

use prometheus::{IntCounterVec, Opts};
use serde::Deserialize;

use crate::app::AppState;
use crate::config::{ConfigError, ServerConfig};

/// Request header (set by Envoy from ext_authz): the caller's tenant id.
pub const TENANT_HEADER: &str = "x-tollgate-tenant";
/// Request header (set by Envoy from ext_authz): the caller's key id.
pub const KEY_ID_HEADER: &str = "x-tollgate-key-id";
/// Request header (set by Envoy from ext_authz): the stored form of the caller's key (its
/// SHA-256), which the gateways and the rate-limit service resolve through the key cache.
pub const KEY_HASH_HEADER: &str = "x-tollgate-key-hash";
/// Request header Envoy adds on its way to the gateways: `edge.trusted_secret`.
pub const EDGE_SECRET_HEADER: &str = "x-tollgate-edge-secret";

/// Response header (whole answers) and trailer (streams): the tokens the request used (input
/// plus output, as its tokens-per-minute limits count them). Envoy reads it when the stream
/// ends and sends it to the rate-limit service as `hits_addend` (`deploy/envoy/envoy.yaml`).
pub const USAGE_TOKENS_HEADER: &str = "x-tollgate-usage-tokens";

/// The gRPC services on `edge.grpc_listen`, as reflection names them.
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";
pub const RATELIMIT_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The shortest `edge.trusted_secret` accepted.
const MIN_SECRET_LEN: usize = 16;

/// `[edge]`: Envoy in front of the gateways.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Where the ext_authz and rate-limit gRPC services listen (`host:port`); unset: not
    /// served. Keep it private: Envoy is its only client.
    pub grpc_listen: Option<String>,
    /// The shared secret Envoy sends in `x-tollgate-edge-secret`
    /// (`TOLLGATE__EDGE__TRUSTED_SECRET`); with it, the identity headers replace the key.
    /// Unset: identity headers are ignored and every request needs its key.
    pub trusted_secret: Option<String>,
}

impl EdgeConfig {
    pub fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        if let Some(addr) = &self.grpc_listen {
            if addr.trim().is_empty()
                || *addr == server.listen
                || server.metrics_listen.as_deref() == Some(addr.as_str())
            {
                return Err(ConfigError::Invalid(format!(
                    "edge.grpc_listen is `{addr}`; it must be an address of its own"
                )));
            }
        }
        if let Some(secret) = &self.trusted_secret {
            if secret.len() < MIN_SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::Invalid(format!(
                    "edge.trusted_secret must be at least {MIN_SECRET_LEN} printable characters \
                     (no spaces): it travels in a header"
                )));
            }
        }
        Ok(())
    }
}

/// Counters of the edge services (bounded labels: the decision only).
#[derive(Clone)]
pub struct EdgeMetrics {
    authz: IntCounterVec,
    ratelimit: IntCounterVec,
}

impl EdgeMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(EdgeMetrics {
            authz: IntCounterVec::new(
                Opts::new(
                    "tollgate_edge_authz_total",
                    "ext_authz checks answered for Envoy, by decision",
                ),
                &["decision"],
            )?,
            ratelimit: IntCounterVec::new(
                Opts::new(
                    "tollgate_edge_ratelimit_total",
                    "Rate-limit descriptors answered for Envoy, by decision",
                ),
                &["decision"],
            )?,
        })
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.authz.clone()),
            Box::new(self.ratelimit.clone()),
        ]
    }
}

/// The gRPC router: Authorization, RateLimitService, Health and reflection.
pub async fn services(
    state: &Arc<AppState>,
) -> Result<tonic::service::Routes, crate::error::GatewayError> {
    let metrics =
        EdgeMetrics::new().map_err(|e| crate::error::GatewayError::Internal(e.to_string()))?;
    state
        .metrics
        .register(metrics.collectors())
        .map_err(|e| crate::error::GatewayError::Internal(e.to_string()))?;
    let authz = authz::AuthzService::new(state.auth.clone(), metrics.clone());
    let rls = ratelimit::RateLimit::new(state.auth.clone(), state.limiter.clone(), metrics);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<authz::pb::AuthorizationServer<authz::AuthzService>>()
        .await;
    reporter
        .set_serving::<ratelimit::pb::RateLimitServiceServer<ratelimit::RateLimit>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(AUTHZ_SERVICE)
            .with_service_name(RATELIMIT_SERVICE)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| crate::error::GatewayError::Internal(format!("gRPC reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| crate::error::GatewayError::Internal(format!("gRPC reflection: {e}")))?;
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(health)
        .add_service(authz::pb::AuthorizationServer::new(authz))
        .add_service(ratelimit::pb::RateLimitServiceServer::new(rls));
    Ok(routes.routes())
}

/// Serves the edge's gRPC services on `listener` (on the caller's runtime, beside the
/// metrics listener) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), crate::error::GatewayError> {
    let routes = services(&state).await?;
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| crate::error::GatewayError::Internal(format!("edge gRPC server: {e}")))
}

/// The edge's gRPC server, running on the caller's runtime until [`EdgeServer::stop`].
pub struct EdgeServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), crate::error::GatewayError>>,
}

impl EdgeServer {
    /// Binds `edge.grpc_listen` and starts serving; `None` when it is not set.
    pub async fn start(state: &Arc<AppState>) -> Result<Option<EdgeServer>, std::io::Error> {
        let Some(addr) = state.config.edge.grpc_listen.clone() else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        tracing::info!(
            "edge gRPC (ext_authz, rate limit, health) on {}",
            listener.local_addr()?
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        Ok(Some(EdgeServer { stop, task }))
    }

    /// Stops accepting, lets in-flight calls finish, and waits for the server to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the edge gRPC server failed: {e}"),
            Err(e) => tracing::warn!("the edge gRPC server task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn edge_config_is_validated() {
        let ok = Config::from_toml(
            "[edge]\ngrpc_listen = \"127.0.0.1:9090\"\ntrusted_secret = \"0123456789abcdef\"\n",
        )
        .unwrap();
        assert_eq!(ok.edge.grpc_listen.as_deref(), Some("127.0.0.1:9090"));
        for bad in [
            "[edge]\ntrusted_secret = \"short\"\n",
            "[edge]\ntrusted_secret = \"has spaces in it, sixteen+\"\n",
            "[server]\nlisten = \"127.0.0.1:9000\"\n[edge]\ngrpc_listen = \"127.0.0.1:9000\"\n",
            "[edge]\ngrpc_listn = \"127.0.0.1:9090\"\n",
        ] {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
    }
}
