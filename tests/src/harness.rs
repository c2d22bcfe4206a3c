//! A harness that starts the real gateway in-process on a loopback socket, in front of the
//! protocol-faithful mock upstream, with a fresh SQLite store, one tenant key and an in-memory
//! event sink the tests can inspect.

// Test support: a failure to start is a test failure, so expect() with a message is right here.
#![allow(clippy::expect_used)]

use std::sync::{Arc, Once};

use tollgate_gateway::app::{self, AppState};
use tollgate_gateway::auth::keys;
use tollgate_gateway::config::Config;
use tollgate_gateway::events::{self, EventSink, MemorySink};
use tollgate_gateway::relay::CompletionRecord;
use tollgate_gateway::store::sqlite::SqliteStore;
use tollgate_gateway::store::{MetaStore, NewKey};

use crate::mock_upstream::{MockOptions, MockUpstream};

/// Environment variable the harness's deployments read their upstream key from.
pub const UPSTREAM_KEY_ENV: &str = "TOLLGATE_TEST_UPSTREAM_KEY";
/// The upstream key itself: tests check it never reaches a client.
pub const UPSTREAM_KEY: &str = "sk-upstream-SECRET-5f1c2e9a7b3d";

/// The admin token of harness gateways.
pub const ADMIN_TOKEN: &str = "admin-test-token-7f3e";

static SET_KEY: Once = Once::new();

/// The standard test config: `oa/<scenario>` reaches the mock's OpenAI API as an `openai`
/// deployment, `vl/<scenario>` and `oc/<scenario>` the same API as `vllm` and
/// `openai_compatible` deployments, and `an/<scenario>` its Anthropic API; `extra` is
/// appended (more deployments/aliases). Busy polling is on here, so that every end-to-end
/// test also runs through it (the other suites run with it off, the default).
pub fn mock_config(upstream_base: &str, extra: &str) -> String {
    format!(
        r#"
[server]
max_body_bytes = 65536
env_providers = false
busy_poll_us = 50

[[deployments]]
type = "openai"
name = "oa"
model = "*"
base_url = "{upstream_base}/v1"
api_key_env = "{UPSTREAM_KEY_ENV}"
embeddings = true
first_byte_timeout_ms = 1500

[[deployments]]
type = "anthropic"
name = "an"
model = "*"
base_url = "{upstream_base}"
api_key_env = "{UPSTREAM_KEY_ENV}"
first_byte_timeout_ms = 1500

[[deployments]]
type = "vllm"
name = "vl"
model = "*"
base_url = "{upstream_base}/v1"
api_key_env = "{UPSTREAM_KEY_ENV}"

[[deployments]]
type = "openai_compatible"
name = "oc"
model = "*"
base_url = "{upstream_base}/v1"
api_key_env = "{UPSTREAM_KEY_ENV}"

[[models]]
name = "oa/*"
deployments = ["oa"]

[[models]]
name = "vl/*"
deployments = ["vl"]

[[models]]
name = "oc/*"
deployments = ["oc"]

[[models]]
name = "an/*"
deployments = ["an"]
{extra}
"#
    )
}

/// A running gateway and its mock upstream.
pub struct Harness {
    pub base_url: String,
    pub key: String,
    pub sink: Arc<MemorySink>,
    /// The sink the gateway reports to (the [`MemorySink`] unless started with
    /// [`Harness::start_with_events`]).
    pub events: Arc<dyn EventSink>,
    pub state: Arc<AppState>,
    pub upstream: MockUpstream,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Starts the mock upstream and the gateway with [`mock_config`].
    pub async fn start() -> Harness {
        Harness::start_with(MockOptions::default(), "").await
    }

    /// Starts with mock options and extra config.
    pub async fn start_with(opts: MockOptions, extra: &str) -> Harness {
        Harness::launch(opts, extra, false).await
    }

    /// Starts with the event sink that `events` configures (the body of an `[events]` table,
    /// e.g. `type = "kafka"`) instead of the in-memory one; [`Harness::events`] is that sink
    /// and [`Harness::sink`] stays empty.
    pub async fn start_with_events(opts: MockOptions, extra: &str, events: &str) -> Harness {
        Harness::launch(opts, &format!("{extra}\n[events]\n{events}\n"), true).await
    }

    async fn launch(opts: MockOptions, extra: &str, configured_sink: bool) -> Harness {
        let upstream = MockUpstream::start(opts)
            .await
            .expect("mock upstream starts");
        let config = mock_config(&upstream.base_url(), extra);
        Harness::launch_with(upstream, &config, configured_sink).await
    }

    /// Starts the gateway with exactly `config` (TOML whose deployments point at mock
    /// upstreams the test started, reading their key from [`UPSTREAM_KEY_ENV`]); `upstream`
    /// becomes [`Harness::upstream`].
    pub async fn start_with_config(upstream: MockUpstream, config: &str) -> Harness {
        Harness::launch_with(upstream, config, false).await
    }

    async fn launch_with(upstream: MockUpstream, config: &str, configured_sink: bool) -> Harness {
        SET_KEY.call_once(|| std::env::set_var(UPSTREAM_KEY_ENV, UPSTREAM_KEY));
        // The binary loads the tokenizers at startup; do the same before serving. Otherwise
        // the first request of a test process loads them on its serving thread in the middle
        // of its stream (the relay counts the prompt right after the first output goes out):
        // about half a second in a debug build, more on a slower or busy machine, during which
        // that thread relays nothing. Once loaded, this returns at once.
        tokio::task::spawn_blocking(tollgate_gateway::tokens::warm_up)
            .await
            .expect("tokenizers load");
        let config = Config::from_toml(config).expect("config");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(dir.path()).await.expect("store"));
        let tenant = store.create_tenant("acme", None).await.expect("tenant");
        let k = keys::generate();
        let spec = NewKey {
            tenant_id: tenant.id.clone(),
            name: "test".to_string(),
            ..Default::default()
        };
        store
            .create_key(&spec, &k.hash, &k.display_prefix)
            .await
            .expect("key");
        let sink = Arc::new(MemorySink::default());
        let events: Arc<dyn EventSink> = if configured_sink {
            events::from_config(&config.events, dir.path())
                .await
                .expect("event sink")
        } else {
            sink.clone()
        };
        let state = AppState::start(
            config,
            store,
            events.clone(),
            None,
            Some(ADMIN_TOKEN.to_string()),
        )
        .await
        .expect("state");
        state
            .metrics
            .register(events.collectors())
            .expect("event metrics");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serve_state = state.clone();
        tokio::spawn(async move {
            let _ = app::serve(listener, serve_state, async {
                let _ = rx.await;
            })
            .await;
        });
        Harness {
            base_url: format!("http://{addr}"),
            key: k.secret,
            sink,
            events,
            state,
            upstream,
            shutdown: Some(tx),
            _dir: dir,
        }
    }

    /// Waits (bounded) until `n` completion records exist, and returns them.
    pub async fn completions(&self, n: usize) -> Vec<CompletionRecord> {
        for _ in 0..200 {
            let r = self.sink.records();
            if r.len() >= n {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.sink.records()
    }

    /// Creates another tenant with one key; returns (tenant id, secret key).
    pub async fn add_tenant(&self, name: &str) -> (String, String) {
        let store = &self.state.store;
        let tenant = store.create_tenant(name, None).await.expect("tenant");
        let k = keys::generate();
        let spec = NewKey {
            tenant_id: tenant.id.clone(),
            name: "test".to_string(),
            ..Default::default()
        };
        store
            .create_key(&spec, &k.hash, &k.display_prefix)
            .await
            .expect("key");
        (tenant.id, k.secret)
    }

    /// The data directory of this gateway (event log, spool).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// POSTs JSON to `path` with the tenant key and extra request headers.
    pub async fn post_with(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(&self.key)
            .header("anthropic-version", "2023-06-01")
            .json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request sent")
    }

    /// POSTs JSON to `path` with the tenant key as a bearer token.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(&self.key)
            .header("anthropic-version", "2023-06-01")
            .json(body)
            .send()
            .await
            .expect("request sent")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Reads a streamed response until it holds at least `n` SSE events; returns what was read.
pub async fn read_events(resp: &mut reqwest::Response, n: usize) -> String {
    let mut received = String::new();
    while sse_events(&received).len() < n {
        let chunk = resp
            .chunk()
            .await
            .expect("stream readable")
            .expect("stream still open");
        received.push_str(std::str::from_utf8(&chunk).expect("UTF-8 stream"));
    }
    received
}

/// Reads an SSE body into `(event name, data)` pairs (comments skipped).
pub fn sse_events(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for frame in body.replace("\r\n", "\n").split("\n\n") {
        let mut event = String::new();
        let mut data: Vec<&str> = Vec::new();
        for line in frame.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !data.is_empty() {
            out.push((event, data.join("\n")));
        }
    }
    out
}
