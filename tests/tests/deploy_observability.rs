//! The `deploy/` configuration against the real binaries, services and Prometheus (needs the
//! services of `scripts/services.sh` and Debian's `prometheus` package; under CI their absence
//! is a failure):
//!
//! - `tollgate serve` with `deploy/tollgate.toml` (production mode, PostgreSQL store, Kafka
//!   events, Redis limits), only its addresses changed through `TOLLGATE__` variables (and
//!   topics and key prefix made unique to this test);
//! - `tollgate-pipeline` with `deploy/pipeline.env`, addresses changed the same way
//!   (ClickHouse left out: its tables are shared by every test on the server);
//! - Debian's `prometheus` with `deploy/prometheus/` (targets changed to the two processes'
//!   metrics listeners, and the intervals to 1 s so the test does not wait 15 s per scrape).
//!
//! It checks `/readyz`'s checks on the production path, that Prometheus scrapes both
//! processes and evaluates every alert rule without error, that the expected series arrive
//! through its HTTP API, and that every metric name the dashboard's and the alerts' queries
//! use is exported by the gateway or the pipeline.
//!
//! A second test needs no service: `/readyz` with an unreachable Redis.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a test failure"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use serde_json::Value;
use tollgate_tests::process::{bin_dir, free_port, fresh_postgres_database, GatewayProcess};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn unique() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}_{:x}", std::process::id(), n % 0xffff_ffff)
}

async fn create_topic(bootstrap: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

/// `tollgate --database-url URL ARGS`, its standard output trimmed.
fn cli(database_url: &str, args: &[&str]) -> String {
    let out = Command::new(bin_dir().join("tollgate"))
        .args(["--database-url", database_url])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Metric names used in `text`: every `tollgate_...` identifier.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tollgate_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Sample names in a Prometheus text exposition, and the family names of its histograms
/// (`x` for `x_bucket`, `x_sum`, `x_count`), which alert texts name.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.strip_suffix(" histogram"),
            None if l.starts_with('#') || l.is_empty() => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(str::to_string)
        .collect()
}

async fn get_text(url: &str) -> String {
    let r = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.text().await.unwrap()
}

/// Polls the Prometheus query `q` until it returns at least one series (≤ 60 s).
async fn query_until_present(prom: &str, q: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r: Value = client
            .get(format!("{prom}/api/v1/query"))
            .query(&[("query", q)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["status"], "success", "{q}: {r}");
        let result = r["data"]["result"].as_array().cloned().unwrap_or_default();
        if !result.is_empty() {
            return result;
        }
        assert!(Instant::now() < deadline, "no series for `{q}` within 60 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_http_ok(url: &str, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(url).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not answer at {url}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn chat(base: &str, key: &str, stream: bool) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({
            "model": "demo",
            "stream": stream,
            "messages": [{"role": "user", "content": "Hello there"}],
        }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn deploy_configs_with_services_and_prometheus_scrape_every_metric_the_dashboard_and_alerts_use(
) {
    const TEST: &str = "deploy_configs_with_services_and_prometheus";
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let (Some(kafka), Some(redis)) = (var("TOLLGATE_KAFKA_BOOTSTRAP"), var("TOLLGATE_REDIS_URL"))
    else {
        tollgate_tests::service_missing(
            TEST,
            "needs TOLLGATE_DATABASE_URL, TOLLGATE_KAFKA_BOOTSTRAP and TOLLGATE_REDIS_URL \
             (scripts/services.sh up)",
        );
        return;
    };
    let Some(database_url) = fresh_postgres_database().await else {
        tollgate_tests::service_missing(TEST, "TOLLGATE_DATABASE_URL is not set");
        return;
    };
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        tollgate_tests::service_missing(
            TEST,
            "no `prometheus` on PATH (Debian package prometheus; scripts/test.sh installs it)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let id = unique();
    let topics = ["requests", "chunks", "completions"].map(|t| format!("llm.{t}.deploy_{id}"));
    for t in &topics {
        create_topic(&kafka, t).await;
    }

    // A tenant with two keys (the second limited to 1 request a minute, to see a refusal)
    // and a price for the demo model, so that cost is counted.
    cli(&database_url, &["tenants", "create", "deploy-test"]);
    let key = cli(
        &database_url,
        &["keys", "create", "--tenant", "deploy-test"],
    );
    let limited = cli(
        &database_url,
        &["keys", "create", "--tenant", "deploy-test"],
    );
    cli(&database_url, &["limits", "set", &limited, "--rpm", "1"]);
    cli(
        &database_url,
        &[
            "prices",
            "set",
            "--model",
            "demo-model",
            "--input",
            "1.25",
            "--cached-input",
            "0.5",
            "--output",
            "5",
        ],
    );

    // The gateway: deploy/tollgate.toml, addresses (and this test's topics) from the env.
    let gw_metrics = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("gateway");
    std::fs::create_dir_all(&data_dir).unwrap();
    let config = repo().join("deploy/tollgate.toml");
    let prefix = format!("tollgate-deploy-{id}:");
    let gw = GatewayProcess::start(
        &["--data-dir", data_dir.to_str().unwrap()],
        &[
            ("TOLLGATE_CONFIG", config.to_str().unwrap()),
            ("TOLLGATE__STORE__DATABASE_URL", &database_url),
            ("TOLLGATE__EVENTS__BOOTSTRAP_SERVERS", &kafka),
            ("TOLLGATE__EVENTS__REQUESTS_TOPIC", &topics[0]),
            ("TOLLGATE__EVENTS__CHUNKS_TOPIC", &topics[1]),
            ("TOLLGATE__EVENTS__COMPLETIONS_TOPIC", &topics[2]),
            ("TOLLGATE__LIMITS__REDIS_URL", &redis),
            ("TOLLGATE__LIMITS__KEY_PREFIX", &prefix),
            ("TOLLGATE__SERVER__METRICS_LISTEN", &gw_metrics),
        ],
        dir.path().join("gateway.log"),
    )
    .await;
    let log = gw.log_text();
    assert!(
        !log.contains("Created tenant"),
        "production mode created a default tenant: {log}"
    );

    // /readyz on the production path: every check named, all ok.
    let ready: Value = reqwest::get(format!("{}/readyz", gw.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready,
        serde_json::json!({
            "status": "ready",
            "checks": {
                "store": {"status": "ok"},
                "events": {"status": "ok"},
                "limiter": {"status": "ok", "backend": "redis"},
            },
        })
    );
    // Production: no metrics on the API port.
    let on_api = reqwest::get(format!("{}/metrics", gw.base_url))
        .await
        .unwrap();
    assert_eq!(on_api.status(), 404);

    // The pipeline: deploy/pipeline.env with this test's addresses.
    let pl_metrics = format!("127.0.0.1:{}", free_port());
    let mut pipeline = Command::new(bin_dir().join("tollgate-pipeline"));
    for line in read("deploy/pipeline.env").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap();
        let v = match k {
            "KAFKA_BOOTSTRAP" => kafka.clone(),
            "DATABASE_URL" => database_url.clone(),
            "REDIS_URL" => redis.clone(),
            "CLICKHOUSE_URL" => continue,
            "TOLLGATE_PIPELINE_METRICS_LISTEN" => pl_metrics.clone(),
            "RUST_LOG" => v.to_string(),
            other => panic!("deploy/pipeline.env sets {other}, which this test does not know"),
        };
        pipeline.env(k, v);
    }
    let pl_log = dir.path().join("pipeline.log");
    pipeline
        .env_remove("CLICKHOUSE_URL")
        .args(["--topic", &topics[2], "--requests-topic", &topics[0]])
        .args([
            "--chunks-topic",
            &topics[1],
            "--group",
            &format!("deploy-{id}"),
        ])
        .args(["--redis-prefix", &prefix, "--epoch-ms", "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&pl_log).unwrap());
    let _pipeline = Killed(pipeline.spawn().unwrap());
    wait_http_ok(
        &format!("http://{pl_metrics}/healthz"),
        "tollgate-pipeline",
        &pl_log,
    )
    .await;

    // Prometheus: the repo's scrape config and rules, targets pointed at the two processes.
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let scrape = read("deploy/prometheus/prometheus.yml");
    for target in ["\"gateway:9464\"", "\"pipeline:9465\""] {
        assert!(scrape.contains(target), "{target} not in prometheus.yml");
    }
    let scrape = scrape
        .replace("\"gateway:9464\"", &format!("\"{gw_metrics}\""))
        .replace("\"pipeline:9465\"", &format!("\"{pl_metrics}\""))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    std::fs::write(prom_dir.join("prometheus.yml"), scrape).unwrap();
    std::fs::write(
        prom_dir.join("alerts.yml"),
        read("deploy/prometheus/alerts.yml"),
    )
    .unwrap();
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let prom_log = dir.path().join("prometheus.log");
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                prom_dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&prom_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let prom = format!("http://{prom_addr}");
    wait_http_ok(&format!("{prom}/-/ready"), "prometheus", &prom_log).await;

    // Traffic: streamed and whole answers, a client error, a limit refusal (4 completions).
    for stream in [true, false, true] {
        let r = chat(&gw.base_url, &key, stream).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base_url))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "no-such-model", "messages": []}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    assert_eq!(chat(&gw.base_url, &limited, false).await.status(), 200);
    assert_eq!(chat(&gw.base_url, &limited, false).await.status(), 429);

    // Prometheus sees both targets up and the series arrive.
    for job in ["tollgate-gateway", "tollgate-pipeline"] {
        let up = query_until_present(&prom, &format!("up{{job=\"{job}\"}} == 1")).await;
        assert_eq!(up.len(), 1, "{job}: {up:?}");
    }
    for q in [
        "tollgate_requests_total{model=\"demo\",outcome=\"completed\"}",
        "tollgate_cost_total{model=\"demo\",currency=\"USD\"} > 0",
        "tollgate_time_to_first_token_seconds_count{model=\"demo\"}",
        "tollgate_events_published_total{topic=\"completions\"} > 0",
        "tollgate_limit_refusals_total > 0",
        "tollgate_limiter_degraded == 0",
        "tollgate_pipeline_events_committed_total >= 4",
        "tollgate_pipeline_ledger_commit_seconds_count > 0",
        "tollgate_pipeline_watermark_lag_seconds",
    ] {
        query_until_present(&prom, q).await;
    }
    // Every rule of alerts.yml evaluates without error, and none fires on a healthy stack.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules: Value = reqwest::get(format!("{prom}/api/v1/rules"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let all: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert_eq!(
            all.len(),
            read("deploy/prometheus/alerts.yml")
                .matches("- alert:")
                .count(),
            "{rules}"
        );
        let evaluated = all
            .iter()
            .all(|r| r["lastEvaluation"].as_str() != Some("0001-01-01T00:00:00Z"));
        if evaluated {
            for r in &all {
                assert_eq!(r["health"], "ok", "rule {} failed: {r}", r["name"]);
                assert_eq!(
                    r["state"], "inactive",
                    "rule {} is not inactive: {r}",
                    r["name"]
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "rules not evaluated: {rules}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every metric the dashboard and the alerts query is exported by one of the two.
    let mut have = exported(&get_text(&format!("http://{gw_metrics}/metrics")).await);
    have.extend(exported(
        &get_text(&format!("http://{pl_metrics}/metrics")).await,
    ));
    let mut used = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("deploy/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let dashboard: Value = serde_json::from_str(&text).unwrap();
        let exprs: Vec<String> = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t["expr"].as_str().map(str::to_string))
            .collect();
        assert!(!exprs.is_empty(), "{}: no queries", path.display());
        used.extend(exprs.iter().flat_map(|e| metric_names(e)));
    }
    used.extend(metric_names(&read("deploy/prometheus/alerts.yml")));
    let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or the alerts but exported by neither: {missing:?}"
    );
    assert!(used.len() > 20, "{used:?}");
}

#[tokio::test]
async fn readyz_names_an_unreachable_redis_and_stays_ready() {
    // A port nothing listens on: Redis "unreachable".
    let closed = free_port();
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProcess::start(
        &["--data-dir", dir.path().to_str().unwrap()],
        &[
            ("TOLLGATE__LIMITS__BACKEND", "redis"),
            (
                "TOLLGATE__LIMITS__REDIS_URL",
                &format!("redis://127.0.0.1:{closed}"),
            ),
        ],
        dir.path().join("gateway.log"),
    )
    .await;
    let r = reqwest::get(format!("{}/readyz", gw.base_url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(
        body["checks"]["limiter"],
        serde_json::json!({"status": "unreachable", "backend": "redis"})
    );
    assert_eq!(body["checks"]["store"]["status"], "ok");
    assert_eq!(body["checks"]["events"]["status"], "ok");
}

#[test]
fn metric_names_are_found_in_queries() {
    let names = metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(tollgate_ttft_bucket[5m]))) / my_tollgate_x + tollgate_a{b=\"tollgate_c\"}",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["tollgate_a", "tollgate_c", "tollgate_ttft_bucket"]
    );
}
