//! The audit trail of requests (`[audit]`), end to end against the real binaries and a real
//! ClickHouse (and Kafka for the restart test): audited tenants' requests land in
//! `audit_log` with capped, redacted bodies; other tenants' do not; the admin API and the CLI
//! find a request by id; a tenant's own key reads its tenant's rows and never another's
//! (`GET /v1/audit/requests`); the audit consumer killed between its insert and its commit
//! leaves every row exactly once.
//!
//! Needs `TOLLGATE_CLICKHOUSE_URL` (and `TOLLGATE_KAFKA_BOOTSTRAP`, `TOLLGATE_DATABASE_URL`
//! for the restart test), as `scripts/services.sh up` provides; under `CI=true` a missing
//! service fails the test.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)] // test code: failing loudly is the point

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_tests::process::{bin_dir, tollgate, tollgate_ok, GatewayProcess};

const ADMIN_TOKEN: &str = "audit-test-admin-token";
/// A credential-shaped secret put in a prompt.
const LEAKED: &str = "sk-proj-LEAKEDabcdefghijklmnop0123456789";
const MAX_BODY: usize = 800;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The ClickHouse URL and a new database of its own for `test`; `None` (a failure under CI)
/// without `TOLLGATE_CLICKHOUSE_URL`.
async fn fresh_database(test: &str) -> Option<(String, String)> {
    let Some(ch) = var("TOLLGATE_CLICKHOUSE_URL") else {
        tollgate_tests::service_missing(
            test,
            "set TOLLGATE_CLICKHOUSE_URL (scripts/services.sh up)",
        );
        return None;
    };
    let db = format!("tollgate_audit_{}", tollgate_tests::kafka::unique_suffix());
    clickhouse(&ch, &format!("CREATE DATABASE IF NOT EXISTS {db}")).await;
    Some((ch, db))
}

/// The real binary over `dir` with `config` as its configuration file and the admin API on.
async fn start_gateway(dir: &std::path::Path, config: &str) -> GatewayProcess {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    GatewayProcess::start(
        &["--data-dir", dir.to_str().unwrap()],
        &[
            ("TOLLGATE_CONFIG", path.to_str().unwrap()),
            ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
        dir.join("gw.log"),
    )
    .await
}

async fn clickhouse(url: &str, sql: &str) -> String {
    let r = reqwest::Client::new()
        .post(url)
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    let ok = r.status().is_success();
    let text = r.text().await.unwrap_or_default();
    assert!(ok, "{sql}: {text}");
    text
}

/// `SELECT ... FORMAT JSONEachRow` as JSON objects.
async fn rows(url: &str, sql: &str) -> Vec<Value> {
    clickhouse(url, &format!("{sql} FORMAT JSONEachRow"))
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (≤ 60 s) until `db.audit_log` holds at least `n` rows, and returns them all.
async fn wait_for_rows(url: &str, db: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let exists = clickhouse(
            url,
            &format!(
                "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'audit_log'"
            ),
        )
        .await;
        if exists.trim() == "1" {
            let all = rows(
                url,
                &format!(
                    "SELECT event_id, tenant_id, request_id, stream, status, request_body, \
                     request_truncated, response_kind, response_body, response_truncated, \
                     output_tokens FROM {db}.audit_log"
                ),
            )
            .await;
            if all.len() >= n {
                return all;
            }
        }
        assert!(
            Instant::now() < deadline,
            "audit_log did not reach {n} rows in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends one chat request; returns its request id and the response text.
async fn chat(base: &str, key: &str, prompt: &str, stream: bool) -> (String, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": "mock/fast",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 200,
            "stream": stream,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    (id, r.text().await.unwrap())
}

fn provision(data: &str, name: &str) -> (String, String) {
    let tenant = tollgate_ok(&["--data-dir", data, "tenants", "create", name]);
    let key = tollgate_ok(&["--data-dir", data, "keys", "create", "--tenant", &tenant]);
    (tenant, key)
}

/// `GET /v1/audit/requests{query}` with `key` (none: no `Authorization`); status and body.
async fn tenant_audit(base: &str, key: Option<&str>, query: &str) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(format!("{base}/v1/audit/requests{query}"));
    if let Some(key) = key {
        r = r.bearer_auth(key);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text)
        .map_err(|e| format!("{e}: {text}"))
        .unwrap();
    (status, v)
}

/// The request ids of a 200 list answer.
fn listed_ids(status: u16, v: &Value) -> Vec<String> {
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list", "{v}");
    assert!(v["data"].is_array(), "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect()
}

fn row_of<'a>(all: &'a [Value], request_id: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|r| r["request_id"] == request_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audited_requests_reach_clickhouse_capped_and_redacted_and_are_found_by_id() {
    let Some((ch, db)) =
        fresh_database("audited_requests_reach_clickhouse_capped_and_redacted_and_are_found_by_id")
            .await
    else {
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (acme, acme_key) = provision(data, "acme");
    let (_other, other_key) = provision(data, "other");
    let gw = start_gateway(
        dir.path(),
        &format!(
            "[audit]\nenabled = true\ntenants = [\"acme\"]\nmax_body_bytes = {MAX_BODY}\n\
             retention_days = 7\nclickhouse_url = \"{ch}\"\nclickhouse_database = \"{db}\"\n"
        ),
    )
    .await;
    let base = gw.base_url.as_str();

    // A short prompt with a credential in it, not streamed.
    let (plain, plain_text) = chat(base, &acme_key, &format!("my key is {LEAKED} ok"), false).await;
    // A long prompt (over the cap), streamed.
    let long_prompt = "tell me a long story ".repeat(60);
    let (streamed, _) = chat(base, &acme_key, &long_prompt, true).await;
    // Another tenant's request is not audited.
    let (unaudited, _) = chat(base, &other_key, "not audited", false).await;
    // A request after it, so that its absence is not a matter of timing.
    let (last, _) = chat(base, &acme_key, "the last one", false).await;

    let all = wait_for_rows(&ch, &db, 3).await;
    assert_eq!(all.len(), 3, "{all:#?}");
    assert!(row_of(&all, &unaudited).is_empty(), "{all:#?}");
    assert!(all.iter().all(|r| r["tenant_id"] == acme.as_str()));

    let p = row_of(&all, &plain);
    assert_eq!(p.len(), 1, "{all:#?}");
    let p = p[0];
    let body = p["request_body"].as_str().unwrap();
    assert!(!body.contains(LEAKED), "{body}");
    assert!(body.contains("my key is [REDACTED] ok"), "{body}");
    assert_eq!(p["request_truncated"], 0);
    assert_eq!(p["response_kind"], "body");
    assert_eq!(p["response_truncated"], 0);
    assert_eq!(p["stream"], 0);
    let response: Value = serde_json::from_str(p["response_body"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {p}"));
    let sent: Value = serde_json::from_str(&plain_text).unwrap();
    assert_eq!(response, sent, "the response as the client received it");

    let s = row_of(&all, &streamed);
    assert_eq!(s.len(), 1, "{all:#?}");
    let s = s[0];
    assert_eq!(s["stream"], 1);
    assert_eq!(s["request_truncated"], 1);
    assert_eq!(s["request_body"].as_str().unwrap().len(), MAX_BODY);
    assert_eq!(s["response_kind"], "text");
    let text = s["response_body"].as_str().unwrap();
    assert!(!text.is_empty() && text.len() <= MAX_BODY, "{text}");
    if s["response_truncated"] == 1 {
        assert!(text.len() + 4 > MAX_BODY, "cut at the cap: {text}");
    }
    assert_eq!(row_of(&all, &last).len(), 1);

    // The admin API finds a request by id (tenant by name), the CLI too (tenant by id).
    let r = reqwest::Client::new()
        .get(format!(
            "{base}/admin/v1/audit/requests?tenant=acme&request_id={plain}"
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let data_rows = v["data"].as_array().unwrap();
    assert_eq!(data_rows.len(), 1, "{v}");
    assert_eq!(data_rows[0]["request_id"], plain.as_str());
    assert_eq!(data_rows[0]["request_body"], p["request_body"]);

    let out = tollgate_ok(&[
        "--data-dir",
        data,
        "audit",
        "requests",
        "--tenant",
        &acme,
        "--request-id",
        &streamed,
        "--clickhouse-url",
        &ch,
        "--clickhouse-database",
        &db,
    ]);
    // One JSON object per line.
    let v: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), 1, "{out}");
    assert_eq!(v[0]["request_id"], streamed.as_str());
    assert_eq!(v[0]["response_kind"], "text");

    // Without a ClickHouse the CLI says where the audit log is.
    let out = tollgate(
        &["--data-dir", data, "audit", "requests", "--tenant", "acme"],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ClickHouse"), "{err}");

    drop(gw);
    clickhouse(&ch, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_reads_its_own_audited_requests_and_never_another_tenants() {
    let Some((ch, db)) =
        fresh_database("a_tenant_key_reads_its_own_audited_requests_and_never_another_tenants")
            .await
    else {
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (acme, acme_key) = provision(data, "acme");
    let (globex, globex_key) = provision(data, "globex");
    let acme_spare = tollgate_ok(&["--data-dir", data, "keys", "create", "--tenant", &acme]);
    let gw = start_gateway(
        dir.path(),
        &format!(
            "[audit]\nenabled = true\nall = true\nclickhouse_url = \"{ch}\"\n\
             clickhouse_database = \"{db}\"\n"
        ),
    )
    .await;
    let base = gw.base_url.as_str();

    let email = "jane.doe@example.com";
    let (a1, _) = chat(base, &acme_key, &format!("mail {email} the answer"), false).await;
    let (a2, _) = chat(base, &acme_key, "a streamed one", true).await;
    let (b1, _) = chat(
        base,
        &globex_key,
        &format!("globex: write to {email}"),
        false,
    )
    .await;
    let all = wait_for_rows(&ch, &db, 3).await;
    assert_eq!(all.len(), 3, "{all:#?}");

    // Each key lists its own tenant's requests, newest first, and nothing else.
    let (status, v) = tenant_audit(base, Some(&acme_key), "?limit=1000").await;
    assert_eq!(listed_ids(status, &v), [a2.as_str(), a1.as_str()], "{v}");
    assert!(v["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["tenant_id"] == acme.as_str()));
    let (status, v) = tenant_audit(base, Some(&globex_key), "").await;
    assert_eq!(listed_ids(status, &v), [b1.as_str()], "{v}");
    assert_eq!(v["data"][0]["tenant_id"], globex.as_str());
    let (status, v) = tenant_audit(base, Some(&acme_key), "?limit=1").await;
    assert_eq!(listed_ids(status, &v), [a2.as_str()], "{v}");

    // By request id: one's own is found, redacted, in the admin route's shape; another
    // tenant's is an empty list, exactly like an id that does not exist.
    let (status, own) = tenant_audit(base, Some(&acme_key), &format!("?request_id={a1}")).await;
    assert_eq!(listed_ids(status, &own), [a1.as_str()], "{own}");
    let body = own["data"][0]["request_body"].as_str().unwrap();
    assert!(!body.contains(email), "{body}");
    assert!(body.contains("mail [EMAIL] the answer"), "{body}");
    let admin: Value = reqwest::Client::new()
        .get(format!(
            "{base}/admin/v1/audit/requests?tenant=acme&request_id={a1}"
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        own, admin,
        "the tenant's row and the operator's are the same"
    );
    for (key, other) in [(&acme_key, &b1), (&globex_key, &a1), (&globex_key, &a2)] {
        let (status, v) = tenant_audit(base, Some(key), &format!("?request_id={other}")).await;
        assert!(listed_ids(status, &v).is_empty(), "{other}: {v}");
    }
    let (status, v) = tenant_audit(base, Some(&globex_key), "?request_id=req_does_not_exist").await;
    assert!(listed_ids(status, &v).is_empty(), "{v}");
    // An id crafted to escape its string literal finds nothing either.
    for crafted in [
        format!("{b1}' OR tenant_id != '"),
        "x' OR 1 = 1 OR request_id = '".to_string(),
        format!("{b1}\\' OR 1 = 1 --"),
    ] {
        let q = query(&[("request_id", &crafted)]);
        let (status, v) = tenant_audit(base, Some(&acme_key), &q).await;
        assert!(listed_ids(status, &v).is_empty(), "{crafted}: {v}");
    }

    // The tenant is the key's, never a parameter; limits are bounded.
    for q in [
        format!("?tenant={globex}"),
        "?tenant=globex".to_string(),
        format!("?request_id={b1}&tenant={globex}"),
    ] {
        let (status, v) = tenant_audit(base, Some(&acme_key), &q).await;
        assert_eq!(status, 400, "{q}: {v}");
        assert_eq!(v["error"]["param"], "tenant", "{q}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    for (q, needle) in [
        ("?limit=0", "between 1 and 1000"),
        ("?limit=1001", "between 1 and 1000"),
        ("?limit=ten", "limit"),
        ("?tenant_id=x", "tenant_id"),
    ] {
        let (status, v) = tenant_audit(base, Some(&acme_key), q).await;
        assert_eq!(status, 400, "{q}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{q}: {v}");
    }

    // Without a valid key: 401, whatever is asked.
    let (status, v) = tenant_audit(base, None, "").await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = tenant_audit(base, Some("tg_not_a_key"), &format!("?request_id={a1}")).await;
    assert_eq!(status, 401, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    let (status, v) = tenant_audit(base, Some(&acme_spare), "").await;
    assert_eq!(listed_ids(status, &v).len(), 2, "{v}");
    let r = reqwest::Client::new()
        .post(format!("{base}/admin/v1/keys/revoke"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"key": acme_spare}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, v) = tenant_audit(base, Some(&acme_spare), &format!("?request_id={a1}")).await;
    assert_eq!(status, 401, "a revoked key: {v}");
    assert!(v["data"].is_null(), "{v}");

    drop(gw);
    clickhouse(&ch, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

/// `?name=value&...`, percent-encoded.
fn query(pairs: &[(&str, &str)]) -> String {
    let url = reqwest::Url::parse_with_params("http://localhost/", pairs).unwrap();
    format!("?{}", url.query().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_and_the_tenant_route_without_clickhouse_say_the_audit_log_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (_, key) = provision(data, "acme");
    let gw = start_gateway(dir.path(), "").await;
    let r = reqwest::Client::new()
        .get(format!(
            "{}/admin/v1/audit/requests?tenant=acme",
            gw.base_url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("ClickHouse"), "{v}");
    // The tenant's own route says the same, once its key is checked.
    let (status, mine) = tenant_audit(&gw.base_url, Some(&key), "").await;
    assert_eq!(status, 404, "{mine}");
    assert_eq!(mine, v);
    let (status, _) = tenant_audit(&gw.base_url, None, "").await;
    assert_eq!(status, 401);
}

fn pipeline(args: &[&str], env: &[(&str, &str)], log: &Path) -> Child {
    let mut cmd = Command::new(bin_dir().join("tollgate-pipeline"));
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("tollgate-pipeline starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_consumer_killed_between_insert_and_commit_leaves_each_row_once() {
    let test = "the_audit_consumer_killed_between_insert_and_commit_leaves_each_row_once";
    let (Some(ch), Some(kafka), Some(pg)) = (
        var("TOLLGATE_CLICKHOUSE_URL"),
        var("TOLLGATE_KAFKA_BOOTSTRAP"),
        var("TOLLGATE_DATABASE_URL"),
    ) else {
        tollgate_tests::service_missing(
            test,
            "set TOLLGATE_CLICKHOUSE_URL, TOLLGATE_KAFKA_BOOTSTRAP and TOLLGATE_DATABASE_URL \
             (scripts/services.sh up)",
        );
        return;
    };
    let id = tollgate_tests::kafka::unique_suffix();
    let [requests, chunks, completions, audit] =
        ["requests", "chunks", "completions", "audit"].map(|t| format!("llm.{t}.audit_{id}"));
    for t in [&requests, &chunks, &completions, &audit] {
        tollgate_tests::kafka::create_topic(&kafka, t, 2).await;
    }
    let db = format!("tollgate_audit_{id}");
    clickhouse(&ch, &format!("CREATE DATABASE IF NOT EXISTS {db}")).await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (_acme, key) = provision(data, "acme");
    let gw = start_gateway(
        dir.path(),
        &format!(
            "[events]\ntype = \"kafka\"\nbootstrap_servers = \"{kafka}\"\nrequests_topic = \"{requests}\"\n\
             chunks_topic = \"{chunks}\"\ncompletions_topic = \"{completions}\"\naudit_topic = \"{audit}\"\n\
             spool_dir = \"{}\"\n[audit]\nenabled = true\nall = true\n",
            dir.path().join("spool").display()
        ),
    )
    .await;
    let group = format!("tollgate-audit-test-{id}");
    let args = [
        "--kafka-bootstrap",
        kafka.as_str(),
        "--topic",
        completions.as_str(),
        "--group",
        group.as_str(),
        "--no-recovery",
        "--database-url",
        pg.as_str(),
        "--clickhouse-url",
        ch.as_str(),
        "--clickhouse-database",
        db.as_str(),
        "--audit",
        "--audit-topic",
        audit.as_str(),
    ];

    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            chat(&gw.base_url, &key, &format!("first {i}"), i % 2 == 0)
                .await
                .0,
        );
    }
    // The consumer inserts its first batch and dies before committing its position.
    let mut first = pipeline(
        &args,
        &[("TOLLGATE_PIPELINE_ABORT_AFTER_AUDIT_INSERT", "1")],
        &dir.path().join("p1.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = first.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the first consumer did not abort"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "it aborted");
    let inserted = wait_for_rows(&ch, &db, 1).await;
    assert!(!inserted.is_empty());

    for i in 0..3 {
        ids.push(
            chat(&gw.base_url, &key, &format!("second {i}"), i % 2 == 1)
                .await
                .0,
        );
    }
    // The restarted consumer re-reads the uncommitted batch and inserts only what is missing.
    let mut second = pipeline(&args, &[], &dir.path().join("p2.log"));
    let all = wait_for_rows(&ch, &db, ids.len()).await;
    let _ = second.kill();
    let _ = second.wait();
    let all_after = rows(
        &ch,
        &format!("SELECT event_id, request_id FROM {db}.audit_log"),
    )
    .await;
    assert_eq!(all.len(), ids.len(), "{all:#?}");
    assert_eq!(all_after.len(), ids.len());
    for rid in &ids {
        assert_eq!(row_of(&all_after, rid).len(), 1, "{rid}: {all_after:#?}");
    }
    drop(gw);
    clickhouse(&ch, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_past_the_retention_are_dropped_and_a_replayed_batch_is_not_inserted_twice() {
    use tollgate_pipeline::audit::AuditStore;
    use tollgate_schemas::events::{
        format_event_time, new_event_id, AuditEvent, AuditResponseKind, CompletionStatus,
        SCHEMA_VERSION,
    };

    let Some((ch, db)) = fresh_database(
        "rows_past_the_retention_are_dropped_and_a_replayed_batch_is_not_inserted_twice",
    )
    .await
    else {
        return;
    };
    let store = AuditStore::new(&ch, &db, 7);
    store.prepare().await.unwrap();
    let event = |request_id: &str, days_ago: u64| AuditEvent {
        schema_version: SCHEMA_VERSION,
        event_id: new_event_id(),
        event_time: format_event_time(
            std::time::SystemTime::now() - Duration::from_secs(days_ago * 86_400),
        ),
        request_id: request_id.into(),
        tenant_id: "ten_1".into(),
        key_id: "key_1".into(),
        route: "chat".into(),
        requested_model: "mock/fast".into(),
        model_alias: "mock/fast".into(),
        deployment: "mock".into(),
        provider: "mock".into(),
        upstream_model: "mock/fast".into(),
        stream: false,
        status: CompletionStatus::Completed,
        error: None,
        usage: Default::default(),
        received_at: format_event_time(std::time::SystemTime::now()),
        request_body: "{}".into(),
        request_bytes: 2,
        request_truncated: false,
        response_kind: AuditResponseKind::None,
        response_body: String::new(),
        response_bytes: 0,
        response_truncated: false,
    };
    let batch = [event("req_old", 10), event("req_new", 0)];
    assert_eq!(store.write(&batch).await.unwrap(), 2);
    // The same batch again (a replay after a crash before the commit): nothing inserted.
    assert_eq!(store.write(&batch).await.unwrap(), 0);
    assert_eq!(store.expire().await.unwrap(), 1);
    let left = rows(&ch, &format!("SELECT request_id FROM {db}.audit_log")).await;
    assert_eq!(left, vec![json!({"request_id": "req_new"})]);
    clickhouse(&ch, &format!("DROP DATABASE IF EXISTS {db}")).await;
}
