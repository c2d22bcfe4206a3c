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
    dep_at(kind, name, &up.base_url(), model, extra)
}

/// A `[[deployments]]` entry for the server at `url` (`http://host:port`; see
/// [`unreachable`] for one that refuses connections).
pub fn dep_at(kind: &str, name: &str, url: &str, model: &str, extra: &str) -> String {
    let base = if kind == "anthropic" {
        url.to_string()
    } else {
        format!("{url}/v1")
    };
    let timeout = if extra.contains("first_byte_timeout_ms") {
        ""
    } else {
        "first_byte_timeout_ms = 3000\n"
    };
    format!(
        "\n[[deployments]]\ntype = \"{kind}\"\nname = \"{name}\"\nmodel = \"{model}\"\n\
         base_url = \"{base}\"\napi_key_env = \"{UPSTREAM_KEY_ENV}\"\n{timeout}{extra}\n"
    )
}

/// `n` loopback addresses nobody listens on (bound, then closed): connections are refused.
pub fn unreachable(n: usize) -> Vec<String> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter()
        .map(|l| format!("http://{}", l.local_addr().expect("address")))
        .collect()
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
