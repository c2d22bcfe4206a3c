//! Tenants, keys and admin against both metadata stores: SQLite (embedded) and a real
//! PostgreSQL server started by `scripts/services.sh` (tests named `postgres_*`; they say
//! so and skip only when `TOLLGATE_DATABASE_URL` is unset, which the test command sets).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)] // test code: failing loudly and reporting measurements is the point

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_gateway::store::postgres::PostgresStore;
use tollgate_gateway::store::sqlite::SqliteStore;
use tollgate_gateway::store::{Invalidation, MetaStore, NewKey};
use tollgate_tests::harness::{Harness, ADMIN_TOKEN};
use tollgate_tests::process::{fresh_postgres_database, tollgate, GatewayProcess};

const PROVIDER_SECRET: &str = "sk-provider-VERY-SECRET-0a9b8c7d6e";
const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes, base64

fn skip(test: &str) {
    tollgate_tests::service_missing(
        test,
        "TOLLGATE_DATABASE_URL is not set (run scripts/services.sh up postgres)",
    );
}

async fn admin_call(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}/admin/v1{path}"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn chat_status(base: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "mock/fast", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Creates a tenant and a key through the admin API; returns the secret.
async fn tenant_and_key(base: &str, tenant: &str) -> String {
    let (s, _) = admin_call(
        base,
        reqwest::Method::POST,
        "/tenants",
        Some(json!({"name": tenant})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = admin_call(
        base,
        reqwest::Method::POST,
        "/keys",
        Some(json!({"tenant": tenant, "name": "k"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    v["secret"].as_str().unwrap().to_string()
}

/// Revokes through `a` and measures how long `b` keeps accepting the key.
async fn revocation_delay(a: &str, b: &str, revoke_body: Value, key: &str) -> Duration {
    assert_eq!(chat_status(b, key).await, 200, "warm b's cache first");
    let (s, v) = admin_call(a, reqwest::Method::POST, "/keys/revoke", Some(revoke_body)).await;
    assert_eq!(s, 200, "{v}");
    let revoked_at = Instant::now();
    loop {
        let status = chat_status(b, key).await;
        if status == 401 {
            return revoked_at.elapsed();
        }
        assert_eq!(status, 200);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "never refused"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn two_gateways_share_a_store(store_args: &[&str], env: &[(&str, &str)], label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN));
    env.push(("TOLLGATE__SERVER__PRODUCTION", "true"));
    // Production turns the built-in models off by default; these gateways serve `mock/fast`.
    env.push(("TOLLGATE__SERVER__MOCK_MODELS", "true"));
    let a = GatewayProcess::start(store_args, &env, dir.path().join("a.log")).await;
    let b = GatewayProcess::start(store_args, &env, dir.path().join("b.log")).await;
    let key = tenant_and_key(&a.base_url, "acme").await;
    assert_eq!(chat_status(&a.base_url, &key).await, 200);
    let delay = revocation_delay(&a.base_url, &b.base_url, json!({"key": key}), &key).await;
    println!("{label}: a key revoked on gateway A was refused by gateway B after {delay:?}");
    assert!(
        delay < Duration::from_secs(1),
        "{label}: revocation took {delay:?}"
    );

    // Rotation by secret: the new key works on B, the old one is refused there.
    let old = tenant_and_key(&a.base_url, "globex").await;
    assert_eq!(chat_status(&b.base_url, &old).await, 200);
    let (s, v) = admin_call(
        &a.base_url,
        reqwest::Method::POST,
        "/keys/rotate",
        Some(json!({"key": old})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let new = v["secret"].as_str().unwrap().to_string();
    assert_eq!(chat_status(&b.base_url, &new).await, 200);
    let started = Instant::now();
    while chat_status(&b.base_url, &old).await != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{label}: rotated key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Suspending the tenant stops its keys on B too.
    let (s, _) = admin_call(
        &a.base_url,
        reqwest::Method::POST,
        "/tenants/globex/suspend",
        None,
    )
    .await;
    assert_eq!(s, 200);
    let started = Instant::now();
    while chat_status(&b.base_url, &new).await != 403 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{label}: suspended tenant still served"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "{label}: suspension reached gateway B after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn postgres_two_gateway_processes_refuse_a_revoked_key_within_a_second() {
    let Some(url) = fresh_postgres_database().await else {
        return skip("postgres_two_gateway_processes");
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    two_gateways_share_a_store(
        &["--database-url", &url, "--data-dir", &data],
        &[],
        "postgres",
    )
    .await;
}

#[tokio::test]
async fn sqlite_two_gateway_processes_refuse_a_revoked_key_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    two_gateways_share_a_store(&["--data-dir", &data], &[], "sqlite").await;
}

#[tokio::test]
async fn postgres_migrations_apply_from_scratch_and_are_idempotent() {
    let Some(url) = fresh_postgres_database().await else {
        return skip("postgres_migrations");
    };
    let first = PostgresStore::connect(&url).await.unwrap();
    let t = first.create_tenant("acme", None).await.unwrap();
    drop(first);
    let again = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(again.tenant("acme").await.unwrap().unwrap().id, t.id);
    assert_eq!(again.list_tenants().await.unwrap().len(), 1);
}

async fn store_contract(store: Arc<dyn MetaStore>) {
    let mut watch = store.watch().await.unwrap();
    let t = store.create_tenant("acme", None).await.unwrap();
    let k = tollgate_gateway::auth::keys::generate();
    let spec = NewKey {
        tenant_id: t.id.clone(),
        name: "x".into(),
        ..Default::default()
    };
    let summary = store
        .create_key(&spec, &k.hash, &k.display_prefix)
        .await
        .unwrap();
    assert_eq!(
        store.key_id_by_hash(&k.hash).await.unwrap().as_deref(),
        Some(summary.id.as_str())
    );
    store.revoke_key(&summary.id).await.unwrap();
    let inv = tokio::time::timeout(Duration::from_secs(2), watch.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inv, Invalidation::Key(k.hash.clone()));
    store.set_tenant_status(&t.id, "suspended").await.unwrap();
    let inv = tokio::time::timeout(Duration::from_secs(2), watch.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inv, Invalidation::Tenant(t.id.clone()));
    let missing = NewKey {
        tenant_id: "ten_nope".into(),
        ..Default::default()
    };
    assert!(store.create_key(&missing, "h", "p").await.is_err());
}

#[tokio::test]
async fn postgres_store_publishes_invalidations_on_commit() {
    let Some(url) = fresh_postgres_database().await else {
        return skip("postgres_store");
    };
    store_contract(Arc::new(PostgresStore::connect(&url).await.unwrap())).await;
}

#[tokio::test]
async fn sqlite_store_publishes_invalidations_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    store_contract(Arc::new(SqliteStore::open(dir.path()).await.unwrap())).await;
}

#[tokio::test]
async fn admin_api_manages_plans_prices_discounts_limits_and_audits_everything() {
    let h = Harness::start().await;
    let b = h.base_url.as_str();
    use reqwest::Method as M;
    // Auth: no token, wrong token.
    let resp = reqwest::Client::new()
        .get(format!("{b}/admin/v1/tenants"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = reqwest::Client::new()
        .get(format!("{b}/admin/v1/tenants"))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "a tenant key is not an admin token");

    let (s, plan) = admin_call(
        b,
        M::POST,
        "/plans",
        Some(json!({"name": "pro", "monthly_fee": "49.99", "rpm_limit": 600})),
    )
    .await;
    assert_eq!(s, 201, "{plan}");
    assert_eq!(plan["monthly_fee"], "49.99");
    let (s, t) = admin_call(
        b,
        M::POST,
        "/tenants",
        Some(json!({"name": "initech", "plan": "pro"})),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(t["plan_id"], plan["id"]);
    // Bad input: duplicate, unknown tenant, unknown plan, malformed values — nothing changes.
    assert_eq!(
        admin_call(b, M::POST, "/tenants", Some(json!({"name": "initech"})))
            .await
            .0,
        409
    );
    assert_eq!(
        admin_call(
            b,
            M::POST,
            "/tenants",
            Some(json!({"name": "x", "plan": "gold"}))
        )
        .await
        .0,
        404
    );
    assert_eq!(
        admin_call(b, M::POST, "/tenants", Some(json!({"name": ""})))
            .await
            .0,
        400
    );
    assert_eq!(
        admin_call(b, M::POST, "/keys", Some(json!({"tenant": "nobody"})))
            .await
            .0,
        404
    );
    let (s, v) = admin_call(
        b,
        M::POST,
        "/keys",
        Some(json!({"tenant": "initech", "rpm_limit": 0})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = admin_call(
        b,
        M::POST,
        "/prices",
        Some(json!({"model": "gpt-4o", "input_per_mtok": "-1",
        "cached_input_per_mtok": "1", "output_per_mtok": "1"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("input_per_mtok"))
    );
    let (s, v) = admin_call(
        b,
        M::POST,
        "/prices",
        Some(json!({"model": "gpt-4o", "input_per_mtok": "two",
        "cached_input_per_mtok": "1", "output_per_mtok": "1"})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("input_per_mtok"));
    // Out of range or finer than the price book keeps: refused, naming the field (such a
    // price once made the embedded pipeline panic on the next request).
    for (field, value, says) in [
        (
            "input_per_mtok",
            "79228162514264337593543950335",
            "at most 1000000",
        ),
        ("output_per_mtok", "1000000.000000000001", "at most"),
        ("cached_input_per_mtok", "0.0000000000001", "decimal places"),
    ] {
        let mut body = json!({"model": "gpt-4o", "input_per_mtok": "1",
            "cached_input_per_mtok": "1", "output_per_mtok": "1"});
        body[field] = json!(value);
        let (s, v) = admin_call(b, M::POST, "/prices", Some(body)).await;
        assert_eq!((s, v["error"]["param"].as_str()), (400, Some(field)), "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    let (s, v) = admin_call(
        b,
        M::POST,
        "/plans",
        Some(json!({"name": "huge", "monthly_fee": "10000000000000"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("monthly_fee")),
        "{v}"
    );
    assert_eq!(
        admin_call(
            b,
            M::POST,
            "/prices",
            Some(json!({"model": "m", "typo": 1}))
        )
        .await
        .0,
        400
    );
    let (_, tenants) = admin_call(b, M::GET, "/tenants", None).await;
    assert_eq!(
        tenants["data"].as_array().unwrap().len(),
        2,
        "acme and initech only"
    );

    // Effective-dated prices, exact decimals, tenant override; discount.
    for (from, input) in [
        ("2026-01-01T00:00:00Z", json!("2.50")),
        ("2026-06-01T00:00:00Z", json!(2.1)),
    ] {
        let (s, v) = admin_call(
            b,
            M::POST,
            "/prices",
            Some(json!({"model": "gpt-4o", "effective_from": from,
            "input_per_mtok": input, "cached_input_per_mtok": "1.25", "output_per_mtok": "10"})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, _) = admin_call(b, M::POST, "/prices", Some(json!({"model": "gpt-4o", "tenant": "initech",
        "effective_from": "2026-01-01T00:00:00Z", "input_per_mtok": "2", "cached_input_per_mtok": "1",
        "output_per_mtok": "8"}))).await;
    assert_eq!(s, 201);
    let (_, prices) = admin_call(b, M::GET, "/prices?model=gpt-4o", None).await;
    let inputs: Vec<&str> = prices["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["input_per_mtok"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["2.50", "2.1", "2"]);
    assert_eq!(
        admin_call(
            b,
            M::POST,
            "/discounts",
            Some(json!({"tenant": "initech", "percent": "10"}))
        )
        .await
        .0,
        201
    );
    assert_eq!(
        admin_call(
            b,
            M::POST,
            "/discounts",
            Some(json!({"tenant": "initech", "percent": "120"}))
        )
        .await
        .0,
        400
    );

    // Key limits and model allow-lists take effect immediately.
    let (s, issued) = admin_call(
        b,
        M::POST,
        "/keys",
        Some(json!({"tenant": "initech", "name": "svc",
        "allowed_models": ["mock/*"], "tpm_limit": 1000, "spend_limit": "12.5"})),
    )
    .await;
    assert_eq!(s, 201);
    let secret = issued["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("tg_"));
    assert_eq!(issued["key"]["spend_limit"], "12.5");
    assert_eq!(chat_status(b, &secret).await, 200);
    let resp = reqwest::Client::new()
        .post(format!("{b}/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&json!({"model": "oa/normal", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "model outside the allow-list");
    let (s, _) = admin_call(
        b,
        M::PUT,
        "/keys/limits",
        Some(json!({"key": issued["key"]["id"], "allowed_models": ["oa/*"]})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        chat_status(b, &secret).await,
        403,
        "allow-list change applies at once"
    );
    let (_, keys) = admin_call(b, M::GET, "/keys?tenant=initech", None).await;
    assert!(
        !keys.to_string().contains(&secret),
        "secrets are never listed"
    );
    assert!(!keys.to_string().contains("key_hash"));

    // Usage for the caller's tenant (the ledger is empty until the pipeline fills it).
    let v: Value = reqwest::Client::new()
        .get(format!("{b}/v1/usage"))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "usage");
    assert_eq!(v["total"]["cost"], "0");
    let resp = reqwest::Client::new()
        .get(format!("{b}/v1/usage?period=2026-13"))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Every change is audited, newest first.
    let (_, audit) = admin_call(b, M::GET, "/audit?limit=100", None).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "plan.create",
        "tenant.create",
        "price.add",
        "discount.add",
        "key.create",
        "key.limits",
    ] {
        assert!(actions.contains(&a), "{a} not audited: {actions:?}");
    }
    assert_eq!(actions[0], "key.limits");
}

#[tokio::test]
async fn provider_credentials_are_encrypted_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let env = [
        ("TOLLGATE_MASTER_KEY", MASTER_KEY),
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    // CLI: the secret comes from stdin.
    let mut child = std::process::Command::new(tollgate_tests::process::tollgate_bin())
        .args([
            "--data-dir",
            data,
            "credentials",
            "add",
            "openai-prod",
            "--provider",
            "openai",
        ])
        .envs(env)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(PROVIDER_SECRET.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let listed = tollgate(&["--data-dir", data, "credentials", "list"], &env);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("openai-prod") && !listed.contains(PROVIDER_SECRET));
    // Not in the database file in clear.
    let db = std::fs::read(dir.path().join("tollgate.db")).unwrap();
    assert!(!db
        .windows(PROVIDER_SECRET.len())
        .any(|w| w == PROVIDER_SECRET.as_bytes()));

    // A gateway using the stored credential sends it upstream and never shows it anywhere.
    let upstream = tollgate_tests::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[deployments]]
type = "openai"
name = "prod"
model = "*"
base_url = "{}/v1"
api_key_credential = "openai-prod"

[[models]]
name = "prod/*"
deployments = ["prod"]
"#,
            upstream.base_url()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let gw = GatewayProcess::start(
        &["--data-dir", data],
        &[("TOLLGATE_CONFIG", cfg), env[0], env[1]],
        dir.path().join("gw.log"),
    )
    .await;
    let key_out = tollgate(
        &["--data-dir", data, "keys", "create", "--tenant", "default"],
        &env,
    );
    let key = String::from_utf8_lossy(&key_out.stdout).trim().to_string();
    let client = reqwest::Client::new();
    let mut seen = String::new();
    for model in [
        "prod/normal",
        "prod/bad-request",
        "prod/server-error",
        "prod/error-midstream",
    ] {
        for stream in [false, true] {
            let r = client.post(format!("{}/v1/chat/completions", gw.base_url)).bearer_auth(&key)
                .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
                .send().await.unwrap();
            seen.push_str(&format!("{:?}", r.headers()));
            seen.push_str(&r.text().await.unwrap());
        }
    }
    let (_, creds) = admin_call(&gw.base_url, reqwest::Method::GET, "/credentials", None).await;
    seen.push_str(&creds.to_string());
    let (_, audit) = admin_call(&gw.base_url, reqwest::Method::GET, "/audit", None).await;
    seen.push_str(&audit.to_string());
    seen.push_str(
        &client
            .get(format!("{}/metrics", gw.base_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let sent = upstream.requests();
    assert!(sent
        .iter()
        .all(|r| r.header("authorization") == Some(&format!("Bearer {PROVIDER_SECRET}"))));
    assert!(
        !seen.contains(PROVIDER_SECRET),
        "credential leaked to a client"
    );
    assert!(
        !gw.log_text().contains(PROVIDER_SECRET),
        "credential leaked to the log"
    );

    // Master-key rotation re-encrypts; the old key no longer opens the store.
    let new_master = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    let out = tollgate(
        &["--data-dir", data, "credentials", "rotate-master"],
        &[
            ("TOLLGATE_MASTER_KEY_OLD", MASTER_KEY),
            ("TOLLGATE_MASTER_KEY", new_master),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(gw);
    let bad = tollgate(
        &["--data-dir", data, "serve", "--listen", "127.0.0.1:1"],
        &[
            ("TOLLGATE_CONFIG", cfg),
            ("TOLLGATE_MASTER_KEY", MASTER_KEY),
        ],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("different master key"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let gw = GatewayProcess::start(
        &["--data-dir", data],
        &[
            ("TOLLGATE_CONFIG", cfg),
            ("TOLLGATE_MASTER_KEY", new_master),
        ],
        dir.path().join("gw2.log"),
    )
    .await;
    assert_eq!(
        client
            .post(format!("{}/v1/chat/completions", gw.base_url))
            .bearer_auth(&key)
            .json(&json!({"model": "prod/normal", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_master_key_of_the_wrong_length_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = tollgate(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:1",
        ],
        &[("TOLLGATE_MASTER_KEY", "c2hvcnQ=")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TOLLGATE_MASTER_KEY must be 32 bytes"),
        "{err}"
    );
    assert!(!err.contains("c2hvcnQ"), "the key itself is not echoed");
}

/// `tollgate --data-dir <dir> <args>`, which must succeed: its standard output, trimmed.
fn cli_ok(dir: &str, args: &[&str]) -> String {
    let mut all = vec!["--data-dir", dir];
    all.extend_from_slice(args);
    let out = tollgate(&all, &[]);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `tollgate --data-dir <dir> <args>`, which must fail: its standard error.
fn cli_fail(dir: &str, args: &[&str]) -> String {
    let mut all = vec!["--data-dir", dir];
    all.extend_from_slice(args);
    let out = tollgate(&all, &[]);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn cli_manages_tenants_and_keys_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let ok = |args: &[&str]| cli_ok(d, args);
    let fail = |args: &[&str]| cli_fail(d, args);
    let id = ok(&["tenants", "create", "acme"]);
    assert!(id.starts_with("ten_"));
    assert!(fail(&["tenants", "create", "acme"]).contains("already exists"));
    let secret = ok(&[
        "keys",
        "create",
        "--tenant",
        "acme",
        "--rpm",
        "60",
        "--models",
        "mock/*,gpt-4o",
    ]);
    assert!(secret.starts_with("tg_") && !secret.contains('\n'));
    assert!(fail(&["keys", "create", "--tenant", "nobody"]).contains("no tenant"));
    assert!(fail(&["keys", "create", "--tenant", "acme", "--rpm", "0"]).contains("rpm_limit"));
    assert!(fail(&[
        "prices",
        "set",
        "--model",
        "m",
        "--input",
        "abc",
        "--cached-input",
        "1",
        "--output",
        "1"
    ])
    .contains("abc"));
    let listed = ok(&["keys", "list", "--tenant", "acme"]);
    assert!(listed.contains("\"rpm_limit\":60") && !listed.contains(&secret));
    ok(&["keys", "revoke", &secret]);
    assert!(fail(&["keys", "revoke", &secret]).contains("already revoked"));
    let mut typo = secret.clone().into_bytes();
    typo[8] = if typo[8] == b'a' { b'b' } else { b'a' };
    assert!(fail(&["keys", "revoke", std::str::from_utf8(&typo).unwrap()]).contains("checksum"));
    ok(&["tenants", "suspend", "acme"]);
    assert!(ok(&["tenants", "list"]).contains("\"suspended\""));
    let audit = ok(&["audit"]);
    assert!(audit.contains("key.revoke") && audit.contains("tenant.suspend"));
}

/// Runs `tollgate --data-dir DATA ARGS` with `stdin` as its standard input.
fn tollgate_with_stdin(
    data: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(tollgate_tests::process::tollgate_bin())
        .args(["--data-dir", data])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn cli_takes_the_api_words_plain_dates_and_closed_sets_and_reads_only_existing_stores() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let missing = missing.to_str().unwrap();
    // A read command on a directory without a store fails, and creates nothing.
    for args in [
        &["tenants", "list"][..],
        &["keys", "list"],
        &["audit"],
        &[
            "invoices", "export", "--period", "2026-11", "--format", "csv", "--out", "o",
        ],
        &["reconcile", "--period", "2026-11"],
    ] {
        let mut all = vec!["--data-dir", missing];
        all.extend_from_slice(args);
        let out = tollgate(&all, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains(&format!("no Tollgate store in {missing}")) && err.contains("--data-dir"),
            "{args:?}: {err}"
        );
    }
    assert!(!std::path::Path::new(missing).exists());
    // A creating command makes the store; reads then work.
    let d = missing;
    let ok = |args: &[&str]| cli_ok(d, args);
    let fail = |args: &[&str]| cli_fail(d, args);
    ok(&["tenants", "create", "acme"]);
    assert!(ok(&["tenants", "list"]).contains("acme"));
    // The admin API's field names as flags.
    let plan: Value = serde_json::from_str(&ok(&[
        "plans",
        "create",
        "pro",
        "--rpm-limit",
        "10",
        "--tpm-limit",
        "1000",
    ]))
    .unwrap();
    assert_eq!(
        (plan["rpm_limit"].as_i64(), plan["tpm_limit"].as_i64()),
        (Some(10), Some(1000))
    );
    let price: Value = serde_json::from_str(&ok(&[
        "prices",
        "set",
        "--model",
        "m",
        "--input-per-mtok",
        "1.5",
        "--cached-input-per-mtok",
        "0.5",
        "--output-per-mtok",
        "3",
        "--effective-from",
        "2026-12-01",
    ]))
    .unwrap();
    assert_eq!(price["input_per_mtok"], "1.5", "{price}");
    assert_eq!(price["effective_from"], "2026-12-01T00:00:00Z", "{price}");
    let key = ok(&[
        "keys",
        "create",
        "--tenant",
        "acme",
        "--rpm-limit",
        "7",
        "--allowed-models",
        "m",
        "--expires-at",
        "2099-01-01",
    ]);
    let listed = ok(&["keys", "list", "--tenant", "acme"]);
    assert!(
        listed.contains("\"rpm_limit\":7") && !listed.contains(&key),
        "{listed}"
    );
    assert!(listed.contains("2099-01-01T00:00:00Z"), "{listed}");
    // Plain dates: midnight UTC.
    let discount: Value = serde_json::from_str(&ok(&[
        "discounts",
        "add",
        "--tenant",
        "acme",
        "--percent",
        "10",
        "--from",
        "2026-12-01",
        "--effective-to",
        "2027-01-01",
    ]))
    .unwrap();
    assert_eq!(
        discount["effective_from"], "2026-12-01T00:00:00Z",
        "{discount}"
    );
    assert_eq!(
        discount["effective_to"], "2027-01-01T00:00:00Z",
        "{discount}"
    );
    assert!(fail(&[
        "discounts",
        "add",
        "--tenant",
        "acme",
        "--percent",
        "1",
        "--from",
        "2026-12"
    ])
    .contains("2027-01-01T00:00:00Z"));
    // Closed sets are the parser's: the allowed values are listed.
    let err = fail(&["credentials", "add", "x", "--provider", "opnai"]);
    assert!(
        err.contains("opnai") && err.contains("openai_compatible"),
        "{err}"
    );
    let out = dir.path().join("out");
    let err = fail(&[
        "invoices",
        "export",
        "--period",
        "2026-11",
        "--format",
        "pdf",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("pdf") && err.contains("html"), "{err}");
    assert!(!out.exists());
}

#[tokio::test]
async fn a_credential_is_replaced_only_when_asked_in_the_cli_and_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let env = [
        ("TOLLGATE_MASTER_KEY", MASTER_KEY),
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let add = |args: &[&str]| {
        let mut all = vec!["credentials", "add", "up"];
        all.extend_from_slice(args);
        tollgate_with_stdin(data, &all, &env, "sk-first")
    };
    assert!(add(&["--provider", "openai"]).status.success());
    let again = add(&["--provider", "anthropic"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(
        err.contains("exists already") && err.contains("--replace"),
        "{err}"
    );
    let listed = tollgate(&["--data-dir", data, "credentials", "list"], &env);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("\"provider\":\"openai\""));
    let replaced = add(&["--provider", "anthropic", "--replace"]);
    assert!(
        replaced.status.success(),
        "{}",
        String::from_utf8_lossy(&replaced.stderr)
    );
    let listed = tollgate(&["--data-dir", data, "credentials", "list"], &env);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("\"provider\":\"anthropic\""));

    let gw = GatewayProcess::start(&["--data-dir", data], &env, dir.path().join("gw.log")).await;
    let body = |provider: &str, replace: Option<bool>| {
        let mut b = json!({"name": "up", "provider": provider, "secret": "sk-second"});
        if let Some(r) = replace {
            b["replace"] = json!(r);
        }
        b
    };
    for replace in [None, Some(false)] {
        let (status, v) = admin_call(
            &gw.base_url,
            reqwest::Method::POST,
            "/credentials",
            Some(body("vllm", replace)),
        )
        .await;
        assert_eq!(status, 409, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("\"replace\": true"),
            "{v}"
        );
    }
    let (status, v) = admin_call(
        &gw.base_url,
        reqwest::Method::POST,
        "/credentials",
        Some(body("opnai", Some(true))),
    )
    .await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("provider")),
        "{v}"
    );
    let (status, v) = admin_call(
        &gw.base_url,
        reqwest::Method::POST,
        "/credentials",
        Some(body("vllm", Some(true))),
    )
    .await;
    assert_eq!((status, v["provider"].as_str()), (201, Some("vllm")), "{v}");
    // The API's date fields read plain dates like the CLI's flags.
    let (status, v) = admin_call(
        &gw.base_url,
        reqwest::Method::POST,
        "/discounts",
        Some(json!({"tenant": "default", "percent": "5", "effective_from": "2026-12-01"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["effective_from"], "2026-12-01T00:00:00Z", "{v}");
}

#[test]
fn environment_overrides_that_fail_or_do_nothing_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // A value that does not parse stops start-up with the variable's name.
    let out = tollgate(
        &["--data-dir", data, "serve", "--listen", "127.0.0.1:1"],
        &[("TOLLGATE__SERVER__THREADS", "abc")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("TOLLGATE__SERVER__THREADS=abc: "), "{err}");
    // So does a key the section does not have.
    let out = tollgate(
        &["--data-dir", data, "serve", "--listen", "127.0.0.1:1"],
        &[("TOLLGATE__SERVER__THREADZ", "2")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("TOLLGATE__SERVER__THREADZ=2: ") && err.contains("threadz"),
        "{err}"
    );
    // One underscore, or a misspelt name: a warning naming it, and what was meant.
    let out = tollgate(
        &["--data-dir", data, "tenants", "create", "acme"],
        &[
            ("TOLLGATE_SERVER__THREADS", "2"),
            ("TOLLGATE_ADMIN_TOKN", "t"),
            ("TOLLGATE__SERVR__THREADS", "2"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for needle in [
        "TOLLGATE_SERVER__THREADS is ignored",
        "two underscores: TOLLGATE__SERVER__THREADS",
        "TOLLGATE_ADMIN_TOKN is ignored",
        "did you mean TOLLGATE_ADMIN_TOKEN?",
        "TOLLGATE__SERVR__THREADS is ignored",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // Known names are not warned about.
    let out = tollgate(
        &["--data-dir", data, "tenants", "list"],
        &[
            ("TOLLGATE_ADMIN_TOKEN", "t"),
            ("TOLLGATE__SERVER__THREADS", "2"),
        ],
    );
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("ignored"));
}

#[tokio::test]
async fn usage_reports_the_ledger_by_model_and_day_with_exact_decimals() {
    let h = Harness::start().await;
    let tenant = h.state.store.tenant("acme").await.unwrap().unwrap();
    // Ledger rows as the billing pipeline writes them (two days, two models, another tenant's
    // row and a row from the previous month that must not count).
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        h.data_dir().join("tollgate.db").display()
    ))
    .await
    .unwrap();
    let rows = [
        (
            &tenant.id[..],
            "gpt-4o",
            "2026-11-02T10:01:00Z",
            2,
            1000,
            200,
            50,
            "0.0012345",
        ),
        (
            &tenant.id[..],
            "gpt-4o",
            "2026-11-02T10:02:00Z",
            1,
            10,
            0,
            5,
            "0.0000001",
        ),
        (
            &tenant.id[..],
            "claude",
            "2026-11-03T00:00:00Z",
            3,
            300,
            0,
            30,
            "0.1",
        ),
        (
            "ten_other",
            "gpt-4o",
            "2026-11-02T10:01:00Z",
            9,
            9,
            9,
            9,
            "9",
        ),
        (
            &tenant.id[..],
            "gpt-4o",
            "2026-10-31T23:59:00Z",
            7,
            7,
            7,
            7,
            "7",
        ),
    ];
    for (t, model, minute, req, inp, cached, out, cost) in rows {
        sqlx::query("INSERT INTO usage_minutes (tenant_id, model, minute, requests, input_tokens, cached_input_tokens, output_tokens, cost) VALUES (?,?,?,?,?,?,?,?)")
            .bind(t).bind(model).bind(minute).bind(req).bind(inp).bind(cached).bind(out).bind(cost)
            .execute(&pool).await.unwrap();
    }
    let v: Value = reqwest::Client::new()
        .get(format!("{}/v1/usage?period=2026-11", h.base_url))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"]["requests"], 6, "{v}");
    assert_eq!(v["total"]["input_tokens"], 1310);
    assert_eq!(v["total"]["cost"], "0.1012346", "exact decimal sum");
    let by_model: Vec<(&str, &str)> = v["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["model"].as_str().unwrap(), m["cost"].as_str().unwrap()))
        .collect();
    assert_eq!(by_model, [("claude", "0.1"), ("gpt-4o", "0.0012346")]);
    let days: Vec<(&str, &str)> = v["by_day"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["date"].as_str().unwrap(), d["model"].as_str().unwrap()))
        .collect();
    assert_eq!(days, [("2026-11-02", "gpt-4o"), ("2026-11-03", "claude")]);
}

#[tokio::test]
async fn the_admin_api_refuses_bad_input_in_openai_shape_and_checks_the_token_first() {
    let h = Harness::start().await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{}/admin/v1{p}", h.base_url);
    let shape = |v: &Value| v["error"]["type"] == "invalid_request_error";
    // The token is checked before the body is read: a bad token with a bad body is a 401.
    let r = client
        .post(url("/tenants"))
        .bearer_auth("not-the-token")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(url("/tenants"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(shape(&v), "{v}");
    for bad in [
        "/audit?limit=lots",
        "/audit?limit=99999999999999999999999",
        "/invoices",
        "/invoices?period=2026-01&period=2026-02",
    ] {
        let r = client
            .get(url(bad))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let v: Value = r.json().await.unwrap();
        assert!(shape(&v), "{bad}: {v}");
    }
    // Too large, wrong content type: still the JSON error shape.
    let r = client
        .post(url("/tenants"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(vec![b' '; 200_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    // The content type is not looked at: a JSON body is read as JSON whatever it says (or
    // without one), and anything else is a 400 in the JSON error shape, never plain text.
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let send = |body: String| {
            let mut req = client.post(url("/tenants")).bearer_auth(ADMIN_TOKEN);
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            req.body(body).send()
        };
        let r = send("name=x".to_string()).await.unwrap();
        assert_eq!(r.status(), 400, "{content_type:?}");
        let v: Value = r.json().await.unwrap();
        assert!(shape(&v), "{content_type:?}: {v}");
        let name = format!("ct-{}", content_type.unwrap_or("none").len());
        let r = send(json!({ "name": name }).to_string()).await.unwrap();
        assert_eq!(r.status(), 201, "{content_type:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["name"], name.as_str(), "{content_type:?}");
    }
    // The tenant API: the key first, then the query, both in OpenAI's shape.
    let usage = |q: &str| format!("{}/v1/usage{q}", h.base_url);
    let r = client
        .get(usage("?period=2026-01&period=2026-02"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(usage("?period=2026-01&period=2026-02"))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(shape(&v), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_model_lists_are_checked_and_a_restricted_key_sees_only_its_models() {
    let h = Harness::start().await;
    let b = h.base_url.as_str();
    use reqwest::Method as M;
    let (s, _) = admin_call(b, M::POST, "/tenants", Some(json!({"name": "globex"}))).await;
    assert_eq!(s, 201);
    for (body, param) in [
        (
            json!({"tenant": "globex", "allowed_models": [""]}),
            "allowed_models",
        ),
        (
            json!({"tenant": "globex", "allowed_models": []}),
            "allowed_models",
        ),
        (json!({"tenant": "globex", "name": "k".repeat(201)}), "name"),
        (
            json!({"tenant": "globex", "name": "a\nforged log line"}),
            "name",
        ),
    ] {
        let (s, v) = admin_call(b, M::POST, "/keys", Some(body.clone())).await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {v}"
        );
    }
    let (s, v) = admin_call(
        b,
        M::POST,
        "/tenants",
        Some(json!({"name": "x".repeat(500)})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("name")),
        "{v}"
    );

    // A key for one exact model served by a wildcard alias sees that model only.
    let (s, key) = admin_call(
        b,
        M::POST,
        "/keys",
        Some(json!({"tenant": "globex", "allowed_models": ["oa/normal"]})),
    )
    .await;
    assert_eq!(s, 201, "{key}");
    let secret = key["secret"].as_str().unwrap();
    let models: Value = reqwest::Client::new()
        .get(format!("{b}/v1/models"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["oa/normal"]);
    // An unrestricted key sees more than that.
    let all: Value = reqwest::Client::new()
        .get(format!("{b}/v1/models"))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(all["data"].as_array().unwrap().len(), 1, "{all}");
}
