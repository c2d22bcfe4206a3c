//! Model aliases → deployments, and the choice of one deployment per request.
//!
//! An alias is an exact name (`gpt-4o`) or a prefix wildcard (`openai/*`) whose matched suffix
//! becomes the upstream model of deployments configured with `model = "*"`. Selection is
//! weighted random across the alias's deployments. (Retries, fallbacks, breakers and the
//! other strategies arrive with the issue "Model-agnostic routing and resilience".)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::config::{
    Config, DeploymentConfig, HttpDeploymentConfig, MockDeploymentConfig, ModelAliasConfig,
};
use crate::error::GatewayError;
use crate::providers::anthropic::{AnthropicProvider, ANTHROPIC_BASE_URL};
use crate::providers::http::{HttpUpstream, Secret};
use crate::providers::mock::{MockProvider, MockStyle};
use crate::providers::openai::{OpenAiProvider, OPENAI_BASE_URL};
use crate::providers::Provider;

/// One deployment: a provider endpoint plus the upstream model it serves.
pub struct Deployment {
    pub name: String,
    /// Upstream model name, or `*` to forward a wildcard alias's suffix.
    pub model: String,
    pub weight: u32,
    pub embeddings: bool,
    pub provider: Arc<dyn Provider>,
}

/// An alias and its deployments.
pub struct Alias {
    /// The configured name (the metrics label).
    pub name: String,
    pub deployments: Vec<Arc<Deployment>>,
}

/// A resolved request target.
pub struct Target<'a> {
    pub alias: &'a Alias,
    pub deployment: Arc<Deployment>,
    pub upstream_model: String,
}

/// All aliases.
pub struct ModelRouter {
    exact: HashMap<String, Alias>,
    /// (prefix without `*`, alias), longest prefix first.
    wildcards: Vec<(String, Alias)>,
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
        for d in &deployments {
            built.insert(
                d.name().to_string(),
                Arc::new(build_deployment(d, credentials)?),
            );
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
                    .collect(),
            };
            match a.name.strip_suffix('*') {
                Some(prefix) => wildcards.push((prefix.to_string(), alias)),
                None => {
                    exact.insert(a.name, alias);
                }
            }
        }
        wildcards.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        Ok(ModelRouter { exact, wildcards })
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
        let mut ticket = rand::thread_rng().gen_range(0..total);
        let mut chosen = candidates[0];
        for d in &candidates {
            if ticket < d.weight {
                chosen = d;
                break;
            }
            ticket -= d.weight;
        }
        let upstream_model = match (chosen.model.as_str(), suffix) {
            ("*", Some(s)) => s.to_string(),
            ("*", None) => model.to_string(),
            (m, _) => m.to_string(),
        };
        Ok(Target {
            alias,
            deployment: chosen.clone(),
            upstream_model,
        })
    }

    /// The upstream models that may serve `model` (for pricing an estimate before a
    /// deployment is chosen); empty for an unknown model.
    pub fn candidate_models(&self, model: &str) -> Vec<String> {
        let Some((alias, suffix)) = self.resolve(model) else {
            return Vec::new();
        };
        alias
            .deployments
            .iter()
            .map(|d| match (d.model.as_str(), suffix) {
                ("*", Some(s)) => s.to_string(),
                ("*", None) => model.to_string(),
                (m, _) => m.to_string(),
            })
            .collect()
    }

    /// Alias names a client may use (wildcards are not listed: their names are open-ended).
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exact.keys().cloned().collect();
        names.sort();
        names
    }
}

fn build_deployment(
    d: &DeploymentConfig,
    credentials: &HashMap<String, String>,
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
        HttpUpstream::new(
            base,
            secret,
            Duration::from_millis(c.connect_timeout_ms),
            Duration::from_millis(c.first_byte_timeout_ms),
        )
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
    Ok(Deployment {
        name: name.to_string(),
        model: model.to_string(),
        weight,
        embeddings,
        provider,
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
        });
        deployments.push(deployment);
    };
    if config.server.mock_models {
        let mock = |name: &str, model: &str, style: &str, chunks, delay, first| {
            DeploymentConfig::Mock(MockDeploymentConfig {
                name: name.to_string(),
                model: model.to_string(),
                style: style.to_string(),
                weight: 1,
                chunks,
                chunk_delay_ms: delay,
                first_chunk_delay_ms: first,
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
    if config.server.env_providers {
        let http = |name: &str, env: &str| HttpDeploymentConfig {
            name: name.to_string(),
            model: "*".to_string(),
            base_url: None,
            api_key_env: Some(env.to_string()),
            api_key_credential: None,
            weight: 1,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 600_000,
            embeddings: true,
            anthropic_version: None,
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

    #[test]
    fn builtin_mock_models_exist_by_default() {
        let r = router("");
        assert!(r.model_names().contains(&"mock/fast".to_string()));
    }
}
