//! Model aliases → deployments, and everything that decides where a request goes: the
//! strategy, retries with backoff, fallbacks, circuit breakers, hedging and rate-limit
//! steering.
//!
//! An alias is an exact name (`gpt-4o`) or a prefix wildcard (`openai/*`) whose matched suffix
//! becomes the upstream model of deployments configured with `model = "*"`.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`ModelRouter`]: deployments and aliases built from the config, alias lookup |
//! | `config.rs` | the `[routing]` table, per-deployment and per-alias routing keys |
//! | `dispatch.rs` | [`ModelRouter::dispatch`]: the attempt loop (choose, send, act on the plan, hedge), breaker counting, and its [`RouteLog`] |
//! | `plan.rs` | what to do after a failed attempt: retry, next deployment, other alias, fail (a pure state machine; the attempt budget's fairness) |
//! | `strategy.rs` | which deployment next: the strategies, who is unavailable, the last resort when every breaker is open |
//! | `retry.rs` | error classification, backoff with full jitter, the deadline |
//! | `breaker.rs` | the per-deployment circuit breaker state machine |
//! | `hedge.rs` | racing a second request against a slow first one |
//! | `health.rs` | per-deployment run-time state: in flight, TTFT estimate, upstream rate-limit headers, spend |
//! | `limiter.rs` | local RPM/TPM accounting per deployment (the [`limiter::DeploymentLimiter`] seam) |
//! | `vllm.rs` | polling a vLLM server's Prometheus metrics for load-aware routing |

pub mod breaker;
pub mod config;
pub mod dispatch;
pub mod health;
pub mod hedge;
pub mod limiter;
pub mod plan;
pub mod retry;
pub mod shared;
pub mod strategy;
pub mod vllm;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

use crate::config::{
    Config, DeploymentConfig, HttpDeploymentConfig, MockDeploymentConfig, ModelAliasConfig,
};
use crate::error::GatewayError;
use crate::metrics::RoutingMetrics;
use crate::providers::anthropic::{AnthropicProvider, ANTHROPIC_BASE_URL};
use crate::providers::http::{HttpUpstream, Secret};
use crate::providers::mock::{MockProvider, MockStyle};
use crate::providers::openai::{OpenAiProvider, OPENAI_BASE_URL};
use crate::providers::Provider;

pub use config::{RoutingConfig, Strategy};
pub use dispatch::{
    Attempt, AttemptOutcome, DispatchFailure, DispatchRequest, Dispatched, HedgeLoser, Lease, Pins,
    RouteLog, UpstreamBody,
};
use health::Health;
use limiter::{DeploymentLimiter, MemoryLimiter};
use shared::SharedLimiter;

/// Most deployments one alias may list (a request's tried set is a 64-bit mask).
pub const MAX_DEPLOYMENTS_PER_ALIAS: usize = 64;

/// One deployment: a provider endpoint plus the upstream model it serves, its routing
/// settings and its run-time health.
pub struct Deployment {
    pub name: String,
    /// Upstream model name, or `*` to forward a wildcard alias's suffix.
    pub model: String,
    pub weight: u32,
    pub embeddings: bool,
    pub provider: Arc<dyn Provider>,
    pub limits: config::DeploymentLimits,
    pub price: Option<config::DeploymentPrice>,
    pub monthly_commit: Option<Decimal>,
    /// vLLM's Prometheus endpoint and how often to poll it.
    pub metrics_url: Option<(String, Duration)>,
    pub health: Arc<Health>,
    /// Longest time between two upstream data events of a stream (`idle_timeout_ms`);
    /// `None`: unbounded (the in-process mock).
    pub stream_idle_timeout: Option<Duration>,
    /// Never masked for PII (`pii_exempt = true`); its type may also be exempt.
    pub pii_exempt: bool,
}

impl Deployment {
    /// The model name sent upstream for a client's `model` (and the suffix a wildcard matched).
    pub fn upstream_model(&self, requested: &str, suffix: Option<&str>) -> String {
        match (self.model.as_str(), suffix) {
            ("*", Some(s)) => s.to_string(),
            ("*", None) => requested.to_string(),
            (m, _) => m.to_string(),
        }
    }
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("name", &self.name)
            .field("provider", &self.provider.label())
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// An alias and its deployments, in fallback order.
pub struct Alias {
    /// The configured name (the metrics label).
    pub name: String,
    pub deployments: Vec<Arc<Deployment>>,
    pub strategy: Strategy,
    pub context_window_fallback: Option<String>,
    pub content_policy_fallback: Option<String>,
    /// Hedge every request, not only high-priority ones.
    pub hedge: bool,
    /// The alias's PII policy, if it sets one.
    pub pii: Option<crate::privacy::PiiAction>,
    /// The alias's response cache settings.
    pub cache: crate::cache::AliasCache,
}

/// One deployment's run-time state, as `GET /admin/v1/deployments` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeploymentStatus {
    pub name: String,
    pub provider: &'static str,
    pub model: String,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    pub in_flight: u64,
    pub ttft_estimate_ms: Option<f64>,
    pub upstream_requests_remaining: Option<u64>,
    pub upstream_requests_reset_ms: Option<u64>,
    pub upstream_tokens_remaining: Option<u64>,
    pub upstream_tokens_reset_ms: Option<u64>,
    /// Set while a 429's `retry-after` runs.
    pub rate_limited_for_ms: Option<u64>,
    pub rpm_limit: Option<u64>,
    pub tpm_limit: Option<u64>,
    pub requests_last_minute: u64,
    pub tokens_last_minute: u64,
    pub server_running: Option<u64>,
    pub server_waiting: Option<u64>,
    pub server_kv_cache_usage: Option<f64>,
    /// Decimal strings.
    pub monthly_commit: Option<String>,
    pub spent_this_month: Option<String>,
}

/// A resolved request target.
pub struct Target<'a> {
    pub alias: &'a Alias,
    pub deployment: Arc<Deployment>,
    pub upstream_model: String,
}

/// All aliases, and what routing needs beside them.
pub struct ModelRouter {
    exact: HashMap<String, Alias>,
    /// (prefix without `*`, alias), longest prefix first.
    wildcards: Vec<(String, Alias)>,
    /// Every deployment, in config order (admin API, metrics, vLLM pollers).
    deployments: Vec<Arc<Deployment>>,
    pub config: RoutingConfig,
    limiter: Arc<dyn DeploymentLimiter>,
    /// The limiter again when it is shared through Redis (its sync task starts with the
    /// background work).
    shared: Option<Arc<SharedLimiter>>,
    pub metrics: RoutingMetrics,
}

impl ModelRouter {
    /// Builds deployments and aliases from the config plus the built-in ones (mock models,
    /// `openai/*` and `anthropic/*` when their keys are in the environment).
    /// `credentials` maps stored credential names to their decrypted secrets.
    pub fn from_config(
        config: &Config,
        credentials: &HashMap<String, String>,
    ) -> Result<Self, GatewayError> {
        let (mut deployments, mut aliases) = (config.deployments.clone(), config.models.clone());
        add_builtins(config, &mut deployments, &mut aliases);
        let mut built: HashMap<String, Arc<Deployment>> = HashMap::new();
        let mut all = Vec::with_capacity(deployments.len());
        for d in &deployments {
            let d = Arc::new(build_deployment(d, credentials, &config.routing)?);
            built.insert(d.name.clone(), d.clone());
            all.push(d);
        }
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for a in aliases {
            let alias = Alias {
                name: a.name.clone(),
                deployments: a
                    .deployments
                    .iter()
                    .filter_map(|n| built.get(n).cloned())
                    .take(MAX_DEPLOYMENTS_PER_ALIAS)
                    .collect(),
                strategy: a.strategy.unwrap_or(config.routing.strategy),
                context_window_fallback: a.context_window_fallback.clone(),
                content_policy_fallback: a.content_policy_fallback.clone(),
                hedge: a.hedge,
                pii: a.pii,
                cache: crate::cache::AliasCache {
                    enabled: a.cache,
                    bill_hits: a.cache_bill_hits,
                },
            };
            match a.name.strip_suffix('*') {
                Some(prefix) => wildcards.push((prefix.to_string(), alias)),
                None => {
                    exact.insert(a.name, alias);
                }
            }
        }
        wildcards.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        let limited = all
            .iter()
            .filter(|d| d.limits.rpm.is_some() || d.limits.tpm.is_some())
            .map(|d| d.name.as_str());
        let (limiter, shared): (Arc<dyn DeploymentLimiter>, _) =
            if config.routing.rate_limits.shared_redis_url.is_some() {
                let shared = Arc::new(SharedLimiter::new(limited));
                (shared.clone(), Some(shared))
            } else {
                (Arc::new(MemoryLimiter::new(limited)), None)
            };
        let metrics = RoutingMetrics::new()
            .map_err(|e| GatewayError::Internal(format!("routing metrics: {e}")))?;
        Ok(ModelRouter {
            exact,
            wildcards,
            deployments: all,
            config: config.routing.clone(),
            limiter,
            shared,
            metrics,
        })
    }

    /// Starts the background work routing needs (vLLM metrics pollers); call once, inside the
    /// runtime.
    pub fn start_background(&self) {
        let rate_limits = &self.config.rate_limits;
        if let (Some(shared), Some(url)) = (&self.shared, &rate_limits.shared_redis_url) {
            let every = Duration::from_millis(rate_limits.shared_sync_ms);
            let failures = self.metrics.shared_sync_failures.clone();
            if let Err(e) = shared::spawn_sync(shared.clone(), url, every, failures) {
                tracing::error!(error = %e, "routing.rate_limits.shared_redis_url: counting per instance");
            }
        }
        for d in &self.deployments {
            if let Some((url, every)) = &d.metrics_url {
                vllm::spawn_poller(d.name.clone(), url.clone(), *every, d.health.clone());
            }
        }
    }

    /// The alias for `model` and the suffix a wildcard matched.
    fn resolve<'s, 'm>(&'s self, model: &'m str) -> Option<(&'s Alias, Option<&'m str>)> {
        if let Some(a) = self.exact.get(model) {
            return Some((a, None));
        }
        self.wildcards.iter().find_map(|(prefix, alias)| {
            model
                .strip_prefix(prefix.as_str())
                .filter(|rest| !rest.is_empty())
                .map(|rest| (alias, Some(rest)))
        })
    }

    /// The PII policy of the alias `model` names, if it sets one.
    pub fn pii_policy(&self, model: &str) -> Option<crate::privacy::PiiAction> {
        self.resolve(model).and_then(|(a, _)| a.pii)
    }

    /// The response cache settings of the alias `model` names (none set if it names none).
    pub fn cache_settings(&self, model: &str) -> crate::cache::AliasCache {
        self.resolve(model)
            .map(|(a, _)| a.cache)
            .unwrap_or_default()
    }

    /// Whether `model` names an alias (exact or wildcard).
    pub fn knows(&self, model: &str) -> bool {
        self.resolve(model).is_some()
    }

    /// The upstream models that may serve `model` (for pricing an estimate before a
    /// deployment is chosen); `None` for an unknown model.
    pub fn candidate_models(&self, model: &str) -> Option<Vec<String>> {
        let (alias, suffix) = self.resolve(model)?;
        Some(
            alias
                .deployments
                .iter()
                .map(|d| d.upstream_model(model, suffix))
                .collect(),
        )
    }

    /// An exact alias by name.
    fn alias(&self, name: &str) -> Option<&Alias> {
        self.exact.get(name)
    }

    /// Every deployment, in config order.
    pub fn deployments(&self) -> &[Arc<Deployment>] {
        &self.deployments
    }

    /// Sets the per-deployment gauges from the current state (called before each scrape).
    pub fn refresh_gauges(&self) {
        let now = Instant::now();
        for d in &self.deployments {
            self.metrics.set_deployment(
                &d.name,
                d.health.breaker_state(now).gauge(),
                d.health.in_flight(),
                d.health.ttft_estimate(),
            );
        }
    }

    /// Every deployment's run-time state (admin API).
    pub fn status(&self) -> Vec<DeploymentStatus> {
        let now = Instant::now();
        let wall = std::time::SystemTime::now();
        let ms_until = |t: Option<Instant>| {
            t.filter(|t| *t > now)
                .map(|t| u64::try_from(t.duration_since(now).as_millis()).unwrap_or(u64::MAX))
        };
        self.deployments
            .iter()
            .map(|d| {
                let h = &d.health;
                let upstream = h.upstream_limits();
                let usage = self.limiter.usage(&d.name, now);
                let load = *h.server_load.lock();
                DeploymentStatus {
                    name: d.name.clone(),
                    provider: d.provider.label(),
                    model: d.model.clone(),
                    breaker: h.breaker_state(now).label(),
                    in_flight: h.in_flight(),
                    ttft_estimate_ms: h.ttft_estimate().map(|t| t.as_secs_f64() * 1000.0),
                    upstream_requests_remaining: upstream.requests_remaining,
                    upstream_requests_reset_ms: ms_until(upstream.requests_reset),
                    upstream_tokens_remaining: upstream.tokens_remaining,
                    upstream_tokens_reset_ms: ms_until(upstream.tokens_reset),
                    rate_limited_for_ms: ms_until(upstream.blocked_until),
                    rpm_limit: d.limits.rpm,
                    tpm_limit: d.limits.tpm,
                    requests_last_minute: usage.requests,
                    tokens_last_minute: usage.tokens,
                    server_running: load.map(|l| l.running),
                    server_waiting: load.map(|l| l.waiting),
                    server_kv_cache_usage: load.map(|l| l.kv_cache_usage),
                    monthly_commit: d.monthly_commit.map(|c| c.to_string()),
                    spent_this_month: (d.monthly_commit.is_some() || d.price.is_some())
                        .then(|| h.spent_this_month(wall).to_string()),
                }
            })
            .collect()
    }

    /// Usage of `deployment` over the last minute from the local limiter.
    pub fn minute_usage(&self, deployment: &str) -> limiter::MinuteUsage {
        self.limiter.usage(deployment, Instant::now())
    }

    /// Picks a deployment for `model` (weighted random), optionally only embedding-capable ones.
    pub fn pick(&self, model: &str, embeddings: bool) -> Result<Target<'_>, GatewayError> {
        let (alias, suffix) = self
            .resolve(model)
            .ok_or_else(|| GatewayError::ModelNotFound(model.to_string()))?;
        let candidates: Vec<&Arc<Deployment>> = alias
            .deployments
            .iter()
            .filter(|d| !embeddings || d.embeddings)
            .collect();
        let total: u32 = candidates.iter().map(|d| d.weight).sum();
        if candidates.is_empty() || total == 0 {
            return Err(if embeddings {
                GatewayError::bad_param(
                    format!("The model `{model}` does not serve embeddings."),
                    "model",
                )
            } else {
                GatewayError::ModelNotFound(model.to_string())
            });
        }
        let mut ticket = rand::Rng::gen_range(&mut rand::thread_rng(), 0..total);
        let mut chosen = candidates[0];
        for d in &candidates {
            if ticket < d.weight {
                chosen = d;
                break;
            }
            ticket -= d.weight;
        }
        Ok(Target {
            alias,
            deployment: chosen.clone(),
            upstream_model: chosen.upstream_model(model, suffix),
        })
    }

    /// Alias names a client may use (wildcards are not listed: their names are open-ended).
    /// Whether an alias (exact or wildcard) serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.resolve(model).is_some()
    }

    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exact.keys().cloned().collect();
        names.sort();
        names
    }
}

fn build_deployment(
    d: &DeploymentConfig,
    credentials: &HashMap<String, String>,
    routing: &RoutingConfig,
) -> Result<Deployment, GatewayError> {
    let http = |c: &HttpDeploymentConfig,
                default_base: Option<&str>|
     -> Result<HttpUpstream, GatewayError> {
        let base = c.base_url.as_deref().or(default_base).ok_or_else(|| {
            GatewayError::Internal(format!("deployment `{}` needs a base_url", c.name))
        })?;
        let secret = match &c.api_key_credential {
            Some(name) => Secret::new(credentials.get(name).cloned().ok_or_else(|| {
                GatewayError::Internal(format!(
                    "deployment `{}` names credential `{name}`, which is not in the store",
                    c.name
                ))
            })?),
            None => Secret::from_env(c.api_key_env.as_deref()),
        };
        Ok(HttpUpstream::new(
            base,
            secret,
            Duration::from_millis(c.connect_timeout_ms),
            Duration::from_millis(c.first_byte_timeout_ms),
        )?
        .with_idle_timeout(
            (c.idle_timeout_ms > 0).then(|| Duration::from_millis(c.idle_timeout_ms)),
        ))
    };
    let (name, model, weight, embeddings, provider): (&str, &str, u32, bool, Arc<dyn Provider>) =
        match d {
            DeploymentConfig::Openai(c) => (
                &c.name,
                &c.model,
                c.weight,
                c.embeddings,
                Arc::new(OpenAiProvider::new(
                    http(c, Some(OPENAI_BASE_URL))?,
                    "openai",
                )),
            ),
            DeploymentConfig::OpenaiCompatible(c) => (
                &c.name,
                &c.model,
                c.weight,
                c.embeddings,
                Arc::new(OpenAiProvider::new(http(c, None)?, "openai_compatible")),
            ),
            DeploymentConfig::Vllm(c) => (
                &c.name,
                &c.model,
                c.weight,
                c.embeddings,
                Arc::new(OpenAiProvider::new(http(c, None)?, "vllm")),
            ),
            DeploymentConfig::Anthropic(c) => (
                &c.name,
                &c.model,
                c.weight,
                false,
                Arc::new(AnthropicProvider::new(
                    http(c, Some(ANTHROPIC_BASE_URL))?,
                    c.anthropic_version.clone(),
                )),
            ),
            DeploymentConfig::Mock(c) => (
                &c.name,
                &c.model,
                c.weight,
                true,
                Arc::new(MockProvider {
                    style: if c.style == "echo" {
                        MockStyle::Echo
                    } else {
                        MockStyle::Lorem
                    },
                    chunks: c.chunks,
                    chunk_delay: Duration::from_millis(c.chunk_delay_ms),
                    first_chunk_delay: Duration::from_millis(c.first_chunk_delay_ms),
                }),
            ),
        };
    let pii_exempt = match d {
        DeploymentConfig::Openai(c)
        | DeploymentConfig::OpenaiCompatible(c)
        | DeploymentConfig::Vllm(c)
        | DeploymentConfig::Anthropic(c) => c.pii_exempt,
        DeploymentConfig::Mock(_) => false,
    };
    let (limits, price, monthly_commit, metrics_url, stream_idle_timeout) = match d {
        DeploymentConfig::Openai(c)
        | DeploymentConfig::OpenaiCompatible(c)
        | DeploymentConfig::Vllm(c)
        | DeploymentConfig::Anthropic(c) => (
            c.limits.clone(),
            c.price.clone(),
            c.monthly_commit,
            c.metrics_url
                .clone()
                .map(|u| (u, Duration::from_millis(c.metrics_poll_ms.max(100)))),
            (c.idle_timeout_ms > 0).then(|| Duration::from_millis(c.idle_timeout_ms)),
        ),
        DeploymentConfig::Mock(c) => (
            c.limits.clone(),
            c.price.clone(),
            c.monthly_commit,
            None,
            None,
        ),
    };
    Ok(Deployment {
        name: name.to_string(),
        model: model.to_string(),
        weight,
        embeddings,
        provider,
        limits,
        price,
        monthly_commit,
        metrics_url,
        health: Arc::new(Health::new(&routing.breaker)),
        stream_idle_timeout,
        pii_exempt,
    })
}

/// The built-in deployments and aliases, added unless the config already uses their names.
fn add_builtins(
    config: &Config,
    deployments: &mut Vec<DeploymentConfig>,
    aliases: &mut Vec<ModelAliasConfig>,
) {
    let mut add = |deployment: DeploymentConfig, alias: &str| {
        if deployments.iter().any(|d| d.name() == deployment.name())
            || aliases.iter().any(|a| a.name == alias)
        {
            return;
        }
        aliases.push(ModelAliasConfig {
            name: alias.to_string(),
            deployments: vec![deployment.name().to_string()],
            strategy: None,
            context_window_fallback: None,
            content_policy_fallback: None,
            hedge: false,
            pii: None,
            cache: None,
            cache_bill_hits: None,
        });
        deployments.push(deployment);
    };
    if config.server.mock_models_enabled() {
        let mock = |name: &str, model: &str, style: &str, chunks, delay, first| {
            DeploymentConfig::Mock(MockDeploymentConfig {
                name: name.to_string(),
                model: model.to_string(),
                style: style.to_string(),
                weight: 1,
                chunks,
                chunk_delay_ms: delay,
                first_chunk_delay_ms: first,
                limits: Default::default(),
                price: None,
                monthly_commit: None,
            })
        };
        add(
            mock("builtin-mock-fast", "mock/fast", "lorem", 20, 0, 0),
            "mock/fast",
        );
        add(
            mock(
                "builtin-mock-realistic",
                "mock/realistic",
                "lorem",
                40,
                25,
                250,
            ),
            "mock/realistic",
        );
        add(
            mock("builtin-mock-echo", "mock/echo", "echo", 0, 0, 0),
            "mock/echo",
        );
        add(
            mock("builtin-mock-embed", "mock/embed", "lorem", 1, 0, 0),
            "mock/embed",
        );
    }
    if config.server.env_providers_enabled() {
        let http = |name: &str, env: &str| HttpDeploymentConfig {
            name: name.to_string(),
            model: "*".to_string(),
            base_url: None,
            api_key_env: Some(env.to_string()),
            api_key_credential: None,
            weight: 1,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 600_000,
            idle_timeout_ms: 0,
            embeddings: true,
            anthropic_version: None,
            limits: Default::default(),
            price: None,
            monthly_commit: None,
            metrics_url: None,
            metrics_poll_ms: 1_000,
            pii_exempt: false,
        };
        if std::env::var("OPENAI_API_KEY").is_ok_and(|k| !k.is_empty()) {
            add(
                DeploymentConfig::Openai(http("builtin-openai", "OPENAI_API_KEY")),
                "openai/*",
            );
        }
        if std::env::var("ANTHROPIC_API_KEY").is_ok_and(|k| !k.is_empty()) {
            add(
                DeploymentConfig::Anthropic(http("builtin-anthropic", "ANTHROPIC_API_KEY")),
                "anthropic/*",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn router(toml: &str) -> ModelRouter {
        ModelRouter::from_config(&Config::from_toml(toml).unwrap(), &HashMap::new()).unwrap()
    }

    #[test]
    fn wildcards_forward_the_suffix_and_exact_names_win() {
        let r = router(
            r#"
[server]
mock_models = false
env_providers = false
[[deployments]]
type = "openai_compatible"
name = "local"
model = "*"
base_url = "http://127.0.0.1:1/v1"
[[deployments]]
type = "mock"
name = "m"
[[models]]
name = "local/*"
deployments = ["local"]
[[models]]
name = "local/special"
deployments = ["m"]
"#,
        );
        let t = r.pick("local/llama-3", false).unwrap();
        assert_eq!(t.upstream_model, "llama-3");
        assert_eq!(t.alias.name, "local/*");
        assert_eq!(r.pick("local/special", false).unwrap().deployment.name, "m");
        assert!(matches!(
            r.pick("local/", false),
            Err(GatewayError::ModelNotFound(_))
        ));
        assert!(matches!(
            r.pick("gpt-4o", false),
            Err(GatewayError::ModelNotFound(_))
        ));
    }

    #[test]
    fn weights_spread_the_load() {
        let r = router(
            r#"
[server]
mock_models = false
[[deployments]]
type = "mock"
name = "a"
weight = 1
[[deployments]]
type = "mock"
name = "b"
weight = 3
[[models]]
name = "x"
deployments = ["a", "b"]
"#,
        );
        let b = (0..4000)
            .filter(|_| r.pick("x", false).unwrap().deployment.name == "b")
            .count();
        // Expect about 3000; a binomial with n=4000, p=0.75 stays within ±200 essentially always.
        assert!((2800..3200).contains(&b), "{b}");
    }

    const THREE: &str = r#"
[server]
mock_models = false
[[deployments]]
type = "mock"
name = "a"
price = { input_per_mtok = "3", output_per_mtok = "15" }
[[deployments]]
type = "mock"
name = "b"
price = { input_per_mtok = "0.25", output_per_mtok = "1.25" }
[[deployments]]
type = "mock"
name = "c"
price = { input_per_mtok = "1", output_per_mtok = "2" }
monthly_commit = "100"
[[models]]
name = "x"
deployments = ["a", "b", "c"]
"#;

    fn input() -> strategy::RankInput {
        strategy::RankInput {
            tenant: std::sync::Arc::from("t"),
            prompt_tokens: 1000,
            expected_output_tokens: 100,
            now: Instant::now(),
            wall: std::time::SystemTime::now(),
            near_requests: 2,
            near_tokens: 2000,
            load_stale_after: Duration::from_secs(10),
        }
    }

    fn pick_with(r: &ModelRouter, s: Strategy, tried: u64) -> strategy::Pick {
        let alias = r.alias("x").unwrap();
        strategy::pick(
            s,
            &alias.deployments,
            tried,
            &input(),
            &*r.limiter,
            &mut rand::thread_rng(),
        )
    }

    #[test]
    fn strategies_choose_as_documented() {
        use strategy::Pick;
        let r = router(THREE);
        assert_eq!(pick_with(&r, Strategy::Ordered, 0), Pick::Deployment(0));
        assert_eq!(pick_with(&r, Strategy::Ordered, 0b001), Pick::Deployment(1));
        assert_eq!(pick_with(&r, Strategy::LowestCost, 0), Pick::Deployment(1));
        assert_eq!(
            pick_with(&r, Strategy::LowestCost, 0b010),
            Pick::Deployment(2)
        );
        assert_eq!(pick_with(&r, Strategy::CommitAware, 0), Pick::Deployment(2));
        // Commit spent: the cheapest.
        let alias = r.alias("x").unwrap();
        alias.deployments[2]
            .health
            .add_spend(Decimal::from(100), std::time::SystemTime::now());
        assert_eq!(pick_with(&r, Strategy::CommitAware, 0), Pick::Deployment(1));
        // Least in flight: the busy one is avoided, ties go to config order.
        let _busy = alias.deployments[0].health.start();
        assert_eq!(
            pick_with(&r, Strategy::LeastInFlight, 0),
            Pick::Deployment(1)
        );
        assert_eq!(pick_with(&r, Strategy::Ordered, 0b111), Pick::Exhausted);
    }

    #[test]
    fn open_breakers_and_limits_make_deployments_unavailable() {
        use strategy::{Pick, Unavailable};
        let r = router(THREE);
        let alias = r.alias("x").unwrap();
        let now = Instant::now();
        for d in &alias.deployments[..2] {
            for _ in 0..5 {
                d.health
                    .breaker
                    .record(now, breaker::CallResult::Failure, false);
            }
        }
        assert_eq!(pick_with(&r, Strategy::LowestCost, 0), Pick::Deployment(2));
        alias.deployments[2]
            .health
            .block_for(Some(Duration::from_secs(5)), now);
        assert!(matches!(
            pick_with(&r, Strategy::LowestCost, 0),
            Pick::Unavailable(Unavailable::RateLimited(_))
        ));
        assert_eq!(
            pick_with(&r, Strategy::LowestCost, 0b100),
            Pick::Unavailable(Unavailable::BreakerOpen)
        );
    }

    #[test]
    fn the_last_resort_is_the_deployment_that_succeeded_most_recently() {
        let r = router(THREE);
        let alias = r.alias("x").unwrap();
        let now = Instant::now();
        for d in &alias.deployments {
            for _ in 0..5 {
                d.health
                    .breaker
                    .record(now, breaker::CallResult::Failure, false);
            }
        }
        let last_resort = |candidates| {
            strategy::last_resort(&alias.deployments, candidates, &input(), &*r.limiter)
        };
        // None ever succeeded: config order.
        assert_eq!(last_resort(0b111), Some(0));
        alias.deployments[2].health.mark_success(now);
        alias.deployments[1]
            .health
            .mark_success(now + Duration::from_millis(5));
        assert_eq!(last_resort(0b111), Some(1));
        assert_eq!(last_resort(0b101), Some(2));
        assert_eq!(last_resort(0), None);
        // A deployment over a rate limit is not forced.
        alias.deployments[1]
            .health
            .block_for(Some(Duration::from_secs(5)), now);
        assert_eq!(last_resort(0b111), Some(2));
    }

    #[test]
    fn the_route_log_counts_retries_and_fallbacks() {
        let r = router(THREE);
        let d = &r.alias("x").unwrap().deployments;
        let mut log = RouteLog::default();
        for (i, outcome) in [
            (0, AttemptOutcome::Status(503)),
            (0, AttemptOutcome::Status(503)),
            (1, AttemptOutcome::BreakerOpen),
            (2, AttemptOutcome::HedgeCancelled),
            (1, AttemptOutcome::Timeout),
            (2, AttemptOutcome::Ok),
        ] {
            log.attempts.push(Attempt {
                deployment: d[i].clone(),
                outcome,
                elapsed: Duration::ZERO,
            });
        }
        assert_eq!((log.retries(), log.fallbacks()), (1, 2));
        assert_eq!(log.attempts_sent(), 5);
        assert_eq!(
            log.trace(),
            "a:503,a:503,b:breaker_open,c:hedge_cancelled,b:timeout,c:ok"
        );
        assert!(log.is_eventful());
    }

    #[test]
    fn builtin_mock_models_exist_by_default() {
        let r = router("");
        assert!(r.model_names().contains(&"mock/fast".to_string()));
    }

    #[test]
    fn production_serves_no_builtin_models_unless_enabled() {
        let names = |toml: &str| router(toml).model_names();
        let production = names("[server]\nproduction = true");
        assert!(
            !production.iter().any(|n| n.starts_with("mock/")),
            "{production:?}"
        );
        let enabled = names("[server]\nproduction = true\nmock_models = true");
        assert!(enabled.contains(&"mock/fast".to_string()), "{enabled:?}");
    }
}
