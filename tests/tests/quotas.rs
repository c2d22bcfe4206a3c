//! Quotas and rate limits through real gateway processes.
//!
//! - Two gateways sharing one real Redis (and PostgreSQL for the store): one tenant fires
//!   many concurrent streams through both; the tokens admitted within the minute and the
//!   streams in flight at once are measured against the limits (the overshoot is reported),
//!   and a second tenant's requests keep succeeding throughout. Needs `TOLLGATE_REDIS_URL`
//!   and `TOLLGATE_DATABASE_URL` (set by the test command); skipped, saying so, without.
//! - Redis stopped mid-load and restarted (a private `redis-server` on a free port): no
//!   request fails because of it, and the metrics show the limiter degrading and recovering.
//! - Embedded (memory limiter): a hard token limit cuts a running stream with a well-formed
//!   error event, a soft one lets it finish and refuses the next request; a spend budget
//!   refuses with `insufficient_quota` once the ledger and the settlements reach it; 429s
//!   come in each API's own error shape with `retry-after` and `x-ratelimit-*` headers.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)] // test code: failing loudly and reporting measurements is the point

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_tests::harness::{sse_events, ADMIN_TOKEN};
use tollgate_tests::process::{free_port, fresh_postgres_database, tollgate, GatewayProcess};

/// A mock model streaming `chunks` tokens `delay_ms` apart.
fn config(dir: &Path, chunks: usize, delay_ms: u64) -> String {
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
env_providers = false

[[deployments]]
type = "mock"
name = "slow"
model = "mock-slow"
chunks = {chunks}
chunk_delay_ms = {delay_ms}

[[models]]
name = "slow"
deployments = ["slow"]
"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

async fn admin(base: &str, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .request(method, format!("{base}/admin/v1{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A tenant with one key and the given tenant-wide limits; returns the key.
async fn tenant(base: &str, name: &str, limits: Option<Value>) -> String {
    let (s, v) = admin(
        base,
        reqwest::Method::POST,
        "/tenants",
        json!({"name": name}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    if let Some(limits) = limits {
        let (s, v) = admin(
            base,
            reqwest::Method::PUT,
            &format!("/tenants/{name}/limits"),
            limits,
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = admin(
        base,
        reqwest::Method::POST,
        "/keys",
        json!({"tenant": name, "name": "k"}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    v["secret"].as_str().unwrap().to_string()
}

/// One streamed chat: (status, headers, body).
async fn stream(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    max_tokens: Option<u32>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut body = json!({
        "model": "slow",
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Count for me, please."}]
    });
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

/// Total tokens in a stream's final usage chunk.
fn usage_tokens(body: &str) -> u64 {
    sse_events(body)
        .iter()
        .filter_map(|(_, data)| serde_json::from_str::<Value>(data).ok())
        .filter_map(|v| v["usage"]["total_tokens"].as_u64())
        .next_back()
        .unwrap_or(0)
}

fn redis_and_postgres(test: &str) -> Option<String> {
    match std::env::var("TOLLGATE_REDIS_URL") {
        Ok(url) if std::env::var_os("TOLLGATE_DATABASE_URL").is_some() => Some(url),
        _ => {
            tollgate_tests::service_missing(test, "TOLLGATE_REDIS_URL / TOLLGATE_DATABASE_URL are not set (run scripts/services.sh up postgres redis)");
            None
        }
    }
}

fn unique_prefix() -> String {
    format!(
        "tgtest{}x{}:",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

#[tokio::test]
async fn redis_two_gateways_hold_a_tenant_to_its_limits_and_spare_the_other_tenant() {
    let Some(redis) = redis_and_postgres("redis_two_gateways") else {
        return;
    };
    let db = fresh_postgres_database().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 30, 8);
    let data = dir.path().to_str().unwrap().to_string();
    let prefix = unique_prefix();
    let env = [
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
        ("TOLLGATE__SERVER__PRODUCTION", "true"),
        ("TOLLGATE__LIMITS__BACKEND", "redis"),
        ("TOLLGATE__LIMITS__REDIS_URL", redis.as_str()),
        ("TOLLGATE__LIMITS__KEY_PREFIX", prefix.as_str()),
        // A loaded test machine must not make the gateways fall back to their local limiters
        // (each would then admit its own share): this test measures the shared limits.
        ("TOLLGATE__LIMITS__REDIS_TIMEOUT_MS", "5000"),
        ("TOLLGATE_CONFIG", cfg.as_str()),
    ];
    let args = ["--database-url", &db, "--data-dir", &data];
    // In production the metrics are served on a port of their own only.
    let metrics = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let (mut env_a, mut env_b) = (env.to_vec(), env.to_vec());
    env_a.push(("TOLLGATE__SERVER__METRICS_LISTEN", &metrics[0]));
    env_b.push(("TOLLGATE__SERVER__METRICS_LISTEN", &metrics[1]));
    let a = GatewayProcess::start(&args, &env_a, dir.path().join("a.log")).await;
    let b = GatewayProcess::start(&args, &env_b, dir.path().join("b.log")).await;

    const TPM: u64 = 1_200;
    const CONCURRENT: i64 = 8;
    let greedy = tenant(
        &a.base_url,
        "greedy",
        Some(json!({"tpm_limit": TPM, "max_concurrent": CONCURRENT})),
    )
    .await;
    let calm = tenant(&a.base_url, "calm", None).await;

    let client = reqwest::Client::new();
    // Ten clients, each sending eight streams back to back, alternately through A and B:
    // more at once than the concurrency limit, more tokens than the minute allows.
    let mut tasks = Vec::new();
    for worker in 0..10 {
        let (client, key) = (client.clone(), greedy.clone());
        let bases = [a.base_url.clone(), b.base_url.clone()];
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..8 {
                let base = &bases[(worker + i) % 2];
                results.push(stream(&client, base, &key, Some(30)).await);
            }
            results
        }));
    }
    // The other tenant, meanwhile, is never refused.
    let mut calm_ok = 0;
    for i in 0..10 {
        let base = if i % 2 == 0 { &a.base_url } else { &b.base_url };
        let (s, _, body) = stream(&client, base, &calm, Some(10)).await;
        assert_eq!(s, 200, "the calm tenant was refused: {body}");
        calm_ok += 1;
    }
    let mut admitted_tokens = 0;
    let (mut ok, mut refused, mut tpm_refusals, mut conc_refusals) = (0, 0, 0, 0);
    for (status, headers, body) in futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
    {
        match status {
            200 => {
                ok += 1;
                admitted_tokens += usage_tokens(&body);
                assert_eq!(
                    headers["x-ratelimit-limit-tokens"].to_str().unwrap(),
                    TPM.to_string()
                );
                assert!(headers.contains_key("x-ratelimit-remaining-tokens"));
            }
            429 => {
                refused += 1;
                let v: Value = serde_json::from_str(&body).unwrap();
                let param = v["error"]["param"].as_str().unwrap();
                match param {
                    "tenant_tokens_per_minute" => {
                        tpm_refusals += 1;
                        assert_eq!(v["error"]["type"], "tokens");
                    }
                    "tenant_concurrent_requests" => {
                        conc_refusals += 1;
                        assert_eq!(v["error"]["type"], "requests");
                    }
                    other => panic!("unexpected limit {other}: {body}"),
                }
                assert_eq!(v["error"]["code"], "rate_limit_exceeded");
                assert!(headers.contains_key("retry-after"));
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    for (gw, metrics) in [(&a, &metrics[0]), (&b, &metrics[1])] {
        assert_eq!(
            metric(
                &format!("http://{metrics}"),
                "tollgate_limiter_transitions_total"
            )
            .await,
            0.0,
            "a gateway fell back to its local limiter: {}",
            gw.log_text()
        );
    }
    // Each admitted stream reserved its prompt estimate + 30 output tokens, and the admitted
    // estimates never exceed the limit. What the provider reported can exceed that by the
    // estimate's error (here the mock reports what the estimate counts: ±1 token), and the
    // sliding window frees the previous minute's share as the current minute advances (a run
    // straddling a minute boundary may admit up to a few percent more in a 60 s span).
    let overshoot = admitted_tokens as i64 - TPM as i64;
    println!(
        "two gateways, one Redis: {ok} streams admitted ({admitted_tokens} tokens reported, \
         limit {TPM}/min, overshoot {overshoot}), {refused} refused ({tpm_refusals} by tokens/min, \
         {conc_refusals} by concurrency, limit {CONCURRENT}); other tenant {calm_ok}/10 served"
    );
    assert!(
        ok > 0 && refused > 0,
        "the load must both pass and hit the limits"
    );
    assert!(
        tpm_refusals > 0,
        "80 × ~45 tokens must cross 1200 tokens/min"
    );
    assert!(
        conc_refusals > 0,
        "10 clients at once must cross 8 streams at once"
    );
    assert!(
        admitted_tokens <= TPM + TPM / 20 + 2 * ok,
        "{admitted_tokens} tokens admitted against a limit of {TPM}"
    );
}

/// A private Redis on a free port, killed on drop.
struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/services.sh installs it)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateRedis { child, port }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn metric(base: &str, name: &str) -> f64 {
    let response = reqwest::get(format!("{base}/metrics")).await.unwrap();
    // A metric absent from an error page would read as 0.
    assert_eq!(response.status().as_u16(), 200, "{base}/metrics");
    let text = response.text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn redis_outage_mid_load_fails_open_and_the_limiter_recovers() {
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        tollgate_tests::service_missing(
            "redis_outage",
            "redis-server is not installed (scripts/services.sh up redis installs it)",
        );
        return;
    }
    let port = free_port();
    let redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 5, 2);
    let data = dir.path().to_str().unwrap().to_string();
    let env = [
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
        ("TOLLGATE__LIMITS__BACKEND", "redis"),
        ("TOLLGATE__LIMITS__REDIS_URL", url.as_str()),
        ("TOLLGATE__LIMITS__LOCAL_SHARE", "0.5"),
        ("TOLLGATE_CONFIG", cfg.as_str()),
    ];
    let gw = GatewayProcess::start(&["--data-dir", &data], &env, dir.path().join("gw.log")).await;
    let key = tenant(
        &gw.base_url,
        "steady",
        Some(json!({"rpm_limit": 100000, "tpm_limit": 10000000})),
    )
    .await;
    let client = reqwest::Client::new();
    let load = {
        let (client, base, key) = (client.clone(), gw.base_url.clone(), key.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(6) {
                let (s, _, body) = stream(&client, &base, &key, Some(5)).await;
                statuses.push((s, body));
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(redis); // Redis goes away mid-load.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let degraded_during = metric(&gw.base_url, "tollgate_limiter_degraded").await;
    let _redis = PrivateRedis::start(port); // and comes back on the same port.
    let statuses = load.await.unwrap();
    // Give the one-second probe time to notice.
    let started = Instant::now();
    while metric(&gw.base_url, "tollgate_limiter_degraded").await != 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the limiter never returned to Redis"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let to_local = metric(
        &gw.base_url,
        "tollgate_limiter_transitions_total{to=\"local\"}",
    )
    .await;
    let to_redis = metric(
        &gw.base_url,
        "tollgate_limiter_transitions_total{to=\"redis\"}",
    )
    .await;
    let failed: Vec<_> = statuses.iter().filter(|(s, _)| *s != 200).collect();
    println!(
        "Redis outage: {} requests during the run, {} failed; degraded gauge during the outage {degraded_during}; transitions to local {to_local}, back to Redis {to_redis}",
        statuses.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "requests failed: {:?}", failed.first());
    assert_eq!(degraded_during, 1.0);
    assert!(to_local >= 1.0 && to_redis >= 1.0);
    // Served from Redis again: a request succeeds and counts there.
    let (s, _, _) = stream(&client, &gw.base_url, &key, Some(5)).await;
    assert_eq!(s, 200);
}

/// Prices the slow model in the store of `data_dir` (before a gateway starts: it reads the
/// price book at start and every 30 s): 100 per million input tokens, 1 000 per million
/// output tokens, so a 20-token reply costs 0.02 plus its prompt.
fn price_the_slow_model(data_dir: &Path) {
    let out = tollgate(
        &[
            "--data-dir",
            data_dir.to_str().unwrap(),
            "prices",
            "set",
            "--model",
            "mock-slow",
            "--input",
            "100",
            "--cached-input",
            "0",
            "--output",
            "1000",
            "--effective-from",
            "2020-01-01T00:00:00Z",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An embedded gateway (memory limiter) serving the slow model.
async fn embedded(dir: &Path, chunks: usize, extra_env: &[(&str, &str)]) -> GatewayProcess {
    let cfg = config(dir, chunks, 1);
    let data = dir.to_str().unwrap().to_string();
    let mut env = vec![
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
        ("TOLLGATE_CONFIG", cfg.as_str()),
    ];
    env.extend_from_slice(extra_env);
    GatewayProcess::start(&["--data-dir", &data], &env, dir.join("gw.log")).await
}

#[tokio::test]
async fn a_hard_token_limit_cuts_a_running_stream_and_a_soft_one_lets_it_finish() {
    let dir = tempfile::tempdir().unwrap();
    let gw = embedded(
        dir.path(),
        400,
        &[
            ("TOLLGATE__LIMITS__DEFAULT_MAX_OUTPUT_TOKENS", "50"),
            ("TOLLGATE__LIMITS__STREAM_INCREMENT_TOKENS", "50"),
        ],
    )
    .await;
    let hard = tenant(&gw.base_url, "hard", Some(json!({"tpm_limit": 300}))).await;
    let soft = tenant(
        &gw.base_url,
        "soft",
        Some(json!({"tpm_limit": 300, "enforcement": "soft"})),
    )
    .await;
    let client = reqwest::Client::new();

    // No max_tokens: 50 output tokens reserved, then 50 more at a time until the 300
    // tokens/min limit refuses; the stream ends there with an error event and no [DONE].
    let (s, _, body) = stream(&client, &gw.base_url, &hard, None).await;
    assert_eq!(s, 200);
    let events = sse_events(&body);
    let content = events
        .iter()
        .filter(|(_, d)| d.contains("\"delta\":{\"content\""))
        .count();
    let last = &events.last().unwrap().1;
    let err: Value = serde_json::from_str(last).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per minute"),
        "{last}"
    );
    assert!(!body.contains("[DONE]"));
    println!("hard limit: the stream was cut after {content} of 400 content events");
    assert!((200..300).contains(&content), "cut after {content} events");

    // Soft: the same stream runs to its end, and the next request is refused.
    let (s, _, body) = stream(&client, &gw.base_url, &soft, None).await;
    assert_eq!(s, 200);
    assert!(body.contains("[DONE]"));
    assert!(!body.contains("\"error\""));
    let reported = usage_tokens(&body);
    assert!(reported > 400, "{reported}");
    // The settlement lands in the background, right after the stream.
    let started = Instant::now();
    loop {
        let (s, h, body) = stream(&client, &gw.base_url, &soft, Some(5)).await;
        if s == 429 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["param"], "tenant_tokens_per_minute");
            assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() <= 60);
            assert_eq!(h["x-ratelimit-remaining-tokens"].to_str().unwrap(), "0");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "never refused");
    }

    // The cut stream is recorded as such (the completion event's status).
    let text = gw.log_text();
    assert!(!text.contains("panicked"), "{text}");
}

#[tokio::test]
async fn spend_budgets_refuse_with_insufficient_quota_in_each_api_shape() {
    let dir = tempfile::tempdir().unwrap();
    price_the_slow_model(dir.path());
    let gw = embedded(dir.path(), 20, &[]).await;
    let key = tenant(&gw.base_url, "budget", Some(json!({"spend_limit": "0.1"}))).await;
    let client = reqwest::Client::new();
    let mut costs: Vec<f64> = Vec::new();
    let refusal = loop {
        let (s, _, body) = stream(&client, &gw.base_url, &key, Some(20)).await;
        if s == 429 {
            break body;
        }
        assert_eq!(s, 200, "{body}");
        let usage = sse_events(&body)
            .iter()
            .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["usage"].is_object())
            .unwrap()["usage"]
            .clone();
        // Exact enough for a bound: prices are whole numbers per million tokens.
        costs.push(
            (usage["prompt_tokens"].as_f64().unwrap() * 100.0
                + usage["completion_tokens"].as_f64().unwrap() * 1000.0)
                / 1e6,
        );
        assert!(costs.len() < 20, "the budget never refused");
        // Settlements land in the background.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: Value = serde_json::from_str(&refusal).unwrap();
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(v["error"]["param"], "tenant_spend_per_period");
    let total: f64 = costs.iter().sum();
    let largest = costs.iter().cloned().fold(0.0, f64::max);
    println!(
        "spend budget 0.1: {} requests served before insufficient_quota, {total:.4} spent",
        costs.len()
    );
    // Each request reserves its estimate (≈ 0.021); what it really cost can exceed that by
    // the estimate's error, which is the only way past the budget. Settlements the ledger
    // already holds may be counted twice for up to `ledger_lag_ms` (refusing early, never
    // late): at least two requests fit.
    assert!(costs.len() >= 2, "{costs:?}");
    assert!(
        total <= 0.1 + largest,
        "{total} spent against a budget of 0.1"
    );

    // The same refusal on /v1/messages, in Anthropic's shape.
    let r = client
        .post(format!("{}/v1/messages", gw.base_url))
        .header("x-api-key", &key)
        .json(&json!({"model": "slow", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("spend this billing period"));
}

#[tokio::test]
async fn redis_tenant_budgets_start_from_the_balance_the_pipeline_publishes() {
    use tollgate_pipeline::sink::redis::RedisBalances;
    use tollgate_pipeline::sink::{Balance, BalanceStore};
    let Ok(redis) = std::env::var("TOLLGATE_REDIS_URL") else {
        tollgate_tests::service_missing(
            "redis_tenant_budgets",
            "TOLLGATE_REDIS_URL is not set (run scripts/services.sh up redis)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    price_the_slow_model(dir.path());
    let prefix = unique_prefix();
    let cfg = config(dir.path(), 20, 1);
    let gw = GatewayProcess::start(
        &["--data-dir", &data],
        &[
            ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("TOLLGATE_CONFIG", cfg.as_str()),
            ("TOLLGATE__LIMITS__BACKEND", "redis"),
            ("TOLLGATE__LIMITS__REDIS_URL", redis.as_str()),
            ("TOLLGATE__LIMITS__KEY_PREFIX", prefix.as_str()),
            // The balances below stand for a pipeline with no lag.
            ("TOLLGATE__LIMITS__LEDGER_LAG_MS", "0"),
        ],
        dir.path().join("gw.log"),
    )
    .await;
    let key = tenant(
        &gw.base_url,
        "ledgered",
        Some(json!({"spend_limit": "1.0"})),
    )
    .await;
    let (_, t) = admin(
        &gw.base_url,
        reqwest::Method::GET,
        "/tenants/ledgered",
        Value::Null,
    )
    .await;
    let tenant_id = t["id"].as_str().unwrap().to_string();
    let period = tollgate_pipeline::fact::billing_period(
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap(),
    );
    // The pipeline's publish path: its Lua script, its key, its prefix.
    let balances = RedisBalances::connect(&redis, &prefix).await.unwrap();
    let publish = |spend: &str, version: u64| Balance {
        tenant_id: tenant_id.clone(),
        period: period.clone(),
        currency: "USD".into(),
        spend: spend.parse().unwrap(),
        requests: 1,
        input_tokens: 0,
        cached_input_tokens: 0,
        output_tokens: 0,
        version,
    };
    balances.publish(&[publish("0.99", 10)]).await.unwrap();
    let client = reqwest::Client::new();
    // ≈ 0.0214 estimated on top of 0.99 crosses 1.0.
    let (s, _, body) = stream(&client, &gw.base_url, &key, Some(20)).await;
    assert_eq!(s, 429, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("used 0.99"),
        "{body}"
    );
    // A newer balance (the ledger after, say, a credit) lets requests through again; an older
    // one never moves it back.
    balances.publish(&[publish("0.5", 11)]).await.unwrap();
    balances.publish(&[publish("0.99", 9)]).await.unwrap();
    let (s, _, body) = stream(&client, &gw.base_url, &key, Some(20)).await;
    assert_eq!(s, 200, "{body}");
    // Until the ledger holds that request, its settled cost counts on top of the balance...
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _, body) = stream(&client, &gw.base_url, &key, Some(20)).await;
    assert_eq!(s, 200, "{body}");
    // ...and once a balance written after it arrives, only the balance counts: the settled
    // seconds it covers are dropped (here the balance says 0.98, so 0.98 + 0.02 > 1.0).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    balances.publish(&[publish("0.98", 12)]).await.unwrap();
    let (s, _, body) = stream(&client, &gw.base_url, &key, Some(20)).await;
    assert_eq!(s, 429, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("used 0.98,"),
        "{body}"
    );
}

#[tokio::test]
async fn limit_rows_are_validated_listed_and_removed_through_the_api_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let gw = embedded(dir.path(), 5, &[]).await;
    let base = &gw.base_url;
    tenant(base, "acme", None).await;
    let put = |body: Value, t: &'static str| {
        let base = base.clone();
        async move {
            admin(
                &base,
                reqwest::Method::PUT,
                &format!("/tenants/{t}/limits"),
                body,
            )
            .await
        }
    };
    let (s, v) = put(json!({"rpm_limit": -1}), "acme").await;
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (400, Some("invalid_request_error")),
        "{v}"
    );
    let (s, v) = put(json!({"enforcement": "sometimes"}), "acme").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = put(json!({"spend_limit": "-0.5"}), "acme").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = put(json!({"tpm_limit": 10}), "nobody").await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = put(
        json!({"model": "slow", "tpm_limit": 10, "enforcement": "soft"}),
        "acme",
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["enforcement"], "soft");
    let (s, v) = put(json!({"max_concurrent": 3}), "acme").await;
    assert_eq!(s, 200, "{v}");

    let data = dir.path().to_str().unwrap();
    let out = tollgate(
        &["--data-dir", data, "limits", "list", "--tenant", "acme"],
        &[],
    );
    assert!(out.status.success());
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let models: Vec<&str> = rows.iter().map(|r| r["model"].as_str().unwrap()).collect();
    assert_eq!(models, vec!["*", "slow"]);
    assert_eq!(rows[0]["max_concurrent"], 3);

    let (s, _) = admin(
        base,
        reqwest::Method::DELETE,
        "/tenants/acme/limits?model=slow",
        Value::Null,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = admin(
        base,
        reqwest::Method::DELETE,
        "/tenants/acme/limits?model=slow",
        Value::Null,
    )
    .await;
    assert_eq!(s, 404);
    let out = tollgate(
        &["--data-dir", data, "limits", "tenant", "acme", "--rpm", "0"],
        &[],
    );
    assert!(!out.status.success(), "a zero limit must be refused");
    let (_, v) = admin(
        base,
        reqwest::Method::GET,
        "/tenants/acme/limits",
        Value::Null,
    )
    .await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
}

#[tokio::test]
async fn embeddings_count_against_the_same_limits() {
    let dir = tempfile::tempdir().unwrap();
    let gw = embedded(dir.path(), 5, &[]).await;
    let key = tenant(&gw.base_url, "embedder", Some(json!({"rpm_limit": 1}))).await;
    let client = reqwest::Client::new();
    let embed = || {
        client
            .post(format!("{}/v1/embeddings", gw.base_url))
            .bearer_auth(&key)
            .json(&json!({"model": "mock/embed", "input": ["one text", "another text"]}))
            .send()
    };
    let ok = embed().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(ok.headers()["x-ratelimit-remaining-requests"], "0");
    let refused = embed().await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["param"], "tenant_requests_per_minute");
}
