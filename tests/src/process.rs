//! Real `tollgate` processes for tests that need more than one gateway (shared databases,
//! revocation across instances) or the binary's own start-up behaviour.
//!
//! The binaries are found in `TOLLGATE_BIN_DIR`, else `$CARGO_TARGET_DIR/debug`, else the
//! workspace's `target/debug` (the test command builds them before running the tests).

// Test support: a failure to start is a test failure, so expect() with a message is right here.
#![allow(clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the workspace's binaries are.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TOLLGATE_BIN_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("debug");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

/// The `tollgate` binary.
pub fn tollgate_bin() -> PathBuf {
    bin_dir().join("tollgate")
}

/// A free loopback port (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs `tollgate ARGS` to completion.
pub fn tollgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("tollgate runs")
}

/// Runs `tollgate ARGS` and returns its standard output, trimmed; a failure panics with what
/// the command printed on standard error.
pub fn tollgate_ok(args: &[&str]) -> String {
    let out = tollgate(args, &[]);
    assert!(
        out.status.success(),
        "tollgate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `GET /v1/usage` of the gateway at `base` with `key`: the tenant's ledger totals.
pub async fn usage(base: &str, key: &str) -> serde_json::Value {
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/usage"))
        .bearer_auth(key)
        .send()
        .await
        .expect("GET /v1/usage");
    assert_eq!(r.status(), 200, "GET /v1/usage");
    r.json().await.expect("a JSON usage report")
}

/// A `tollgate serve` process, killed on drop.
pub struct GatewayProcess {
    pub child: Child,
    pub base_url: String,
    pub log: PathBuf,
}

impl GatewayProcess {
    /// Starts `tollgate serve` with extra `args` and `env`, and waits (≤ 30 s) for `/readyz`.
    pub async fn start(args: &[&str], env: &[(&str, &str)], log: PathBuf) -> GatewayProcess {
        GatewayProcess::start_wrapped(&[], args, env, log).await
    }

    /// Like [`GatewayProcess::start`], run through `wrapper` (a command and its arguments that
    /// runs the rest of its command line, such as `prlimit --nofile=128 --`).
    pub async fn start_wrapped(
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> GatewayProcess {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(tollgate_bin());
                cmd
            }
            None => Command::new(tollgate_bin()),
        };
        cmd.args(args)
            .args(["serve", "--listen", &listen])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("tollgate serve starts");
        let p = GatewayProcess {
            child,
            base_url: format!("http://{listen}"),
            log,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", p.base_url)).send().await {
                if r.status().is_success() {
                    return p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not become ready: {}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh, empty PostgreSQL database on the server of `TOLLGATE_DATABASE_URL` (as started by
/// `scripts/services.sh`), or `None` when that variable is unset.
pub async fn fresh_postgres_database() -> Option<String> {
    let base = std::env::var("TOLLGATE_DATABASE_URL").ok()?;
    let name = format!("tollgate_test_{}", std::process::id()) + &format!("_{}", rand_suffix());
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    let output = Command::new("psql")
        .arg(&base)
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "cannot create a test database: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(format!("{prefix}/{name}"))
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}")
}

/// Creates tenant `name` and a key of it through the admin API of the gateway at `base`
/// (started with `TOLLGATE_ADMIN_TOKEN` = [`crate::harness::ADMIN_TOKEN`]); returns the key's
/// secret and the tenant's id.
pub async fn admin_tenant_key(base: &str, name: &str) -> (String, String) {
    let client = reqwest::Client::new();
    let tenant = client
        .post(format!("{base}/admin/v1/tenants"))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .json(&serde_json::json!({"name": name}))
        .send()
        .await
        .expect("tenant request");
    assert_eq!(tenant.status().as_u16(), 201, "tenant {name}");
    let tenant: serde_json::Value = tenant.json().await.expect("tenant body");
    let key: serde_json::Value = client
        .post(format!("{base}/admin/v1/keys"))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .json(&serde_json::json!({"tenant": name, "name": "k"}))
        .send()
        .await
        .expect("key request")
        .json()
        .await
        .expect("key body");
    (
        key["secret"].as_str().expect("secret").to_string(),
        tenant["id"].as_str().expect("tenant id").to_string(),
    )
}
