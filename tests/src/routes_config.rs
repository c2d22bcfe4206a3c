//! Gateway configurations for end-to-end routing tests: a `[[deployments]]` entry per mock
//! upstream (or per address nobody listens on), `[[models]]` aliases over them, and the
//! gateway started with only those (no built-in models, short backoff).

// Test support: failing loudly is the point.
#![allow(clippy::expect_used)]

use crate::harness::{Harness, UPSTREAM_KEY_ENV};
use crate::mock_upstream::{MockOptions, MockUpstream};

/// A fresh mock upstream with default options.
pub async fn upstream() -> MockUpstream {
    MockUpstream::start(MockOptions::default())
        .await
        .expect("mock upstream")
}

/// A `[[deployments]]` entry for `up` (`kind`: openai, anthropic, vllm).
pub fn dep(kind: &str, name: &str, up: &MockUpstream, model: &str, extra: &str) -> String {
    let base = if kind == "anthropic" {
        up.base_url()
    } else {
        format!("{}/v1", up.base_url())
    };
    dep_at(kind, name, &base, model, extra)
}

/// A `[[deployments]]` entry at `base_url` (an address nobody listens on makes an
/// unreachable deployment: `http://127.0.0.1:1/v1`).
pub fn dep_at(kind: &str, name: &str, base_url: &str, model: &str, extra: &str) -> String {
    let timeout = if extra.contains("first_byte_timeout_ms") {
        ""
    } else {
        "first_byte_timeout_ms = 3000\n"
    };
    format!(
        "\n[[deployments]]\ntype = \"{kind}\"\nname = \"{name}\"\nmodel = \"{model}\"\n\
         base_url = \"{base_url}\"\napi_key_env = \"{UPSTREAM_KEY_ENV}\"\n{timeout}{extra}\n"
    )
}

/// A `[[models]]` entry.
pub fn alias(name: &str, deployments: &[&str], extra: &str) -> String {
    let list: Vec<String> = deployments.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "\n[[models]]\nname = \"{name}\"\ndeployments = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// Starts the gateway with `body` (deployments, models, routing tables) after a header that
/// turns off the built-in models and makes backoff short.
pub async fn gateway(routing: &str, body: &str) -> Harness {
    let config = format!(
        "[server]\nmock_models = false\nenv_providers = false\n\n\
         [routing.retry]\nbase_backoff_ms = 5\nmax_backoff_ms = 20\n{routing}\n{body}"
    );
    Harness::start_with_config(upstream().await, &config).await
}
