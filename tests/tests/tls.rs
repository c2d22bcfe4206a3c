//! TLS on the gateway's listener, with the real binary: TLS 1.3 only by default, ALPN h2 and
//! http/1.1 (a stream over each), a certificate replaced on disk is served without a restart
//! (and a broken replacement leaves the previous one in use), and with `client_ca_file` a
//! client without a certificate from that CA is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::{json, Value};
use tollgate_tests::harness::ADMIN_TOKEN;
use tollgate_tests::process::{free_port, tollgate_bin};

/// A test CA and what it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tollgate test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A certificate for `name` (PEM cert, PEM key, DER cert).
    fn issue(&self, name: &str, client: bool) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

struct Gateway {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tollgate serve` with `[server.tls]` = `tls` (TOML lines) and waits until it answers
/// `client` over HTTPS.
async fn start(dir: &Path, tls: &str, client: &reqwest::Client) -> Gateway {
    let config = dir.join("tollgate.toml");
    std::fs::write(&config, format!("[server.tls]\n{tls}\n")).unwrap();
    let port = free_port();
    let log = dir.join("gw.log");
    let child = Command::new(tollgate_bin())
        .args(["--data-dir", dir.join("data").to_str().unwrap()])
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let gw = Gateway { child, port, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(gw.url("/healthz")).send().await {
            if r.status().is_success() {
                return gw;
            }
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not answer over TLS: {}",
            std::fs::read_to_string(&gw.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Gateway {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
}

fn https_client(ca_pem: &str) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
}

/// The leaf certificate the gateway presents to a client allowing only `versions`, or the
/// handshake's error.
async fn handshake(
    port: u16,
    ca_der: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Vec<u8>, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await?;
    let (_, conn) = stream.get_ref();
    Ok(conn.peer_certificates().unwrap()[0].to_vec())
}

/// A streamed chat completion through `client`: the text of the events and the HTTP version.
async fn stream_chat(client: &reqwest::Client, gw: &Gateway, key: &str) -> (String, String) {
    let resp = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "mock/fast", "stream": true,
            "messages": [{"role": "user", "content": "hello over tls"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let version = format!("{:?}", resp.version());
    (resp.text().await.unwrap(), version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_13_serves_h2_and_http1_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ca_pem = ca.cert.pem();
    let (cert, key, first_der) = ca.issue("gateway one", false);
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let client = https_client(&ca_pem).build().unwrap();
    let tls = format!(
        "cert_file = {:?}\nkey_file = {:?}\nreload_interval_ms = 100",
        cert_file.to_str().unwrap(),
        key_file.to_str().unwrap()
    );
    let gw = start(dir.path(), &tls, &client).await;
    let ca_der = ca.cert.der().to_vec();

    // TLS 1.3 only by default.
    let served = handshake(gw.port, &ca_der, &[&rustls::version::TLS13])
        .await
        .unwrap();
    assert_eq!(served, first_der);
    assert!(
        handshake(gw.port, &ca_der, &[&rustls::version::TLS12])
            .await
            .is_err(),
        "TLS 1.2 is refused by default"
    );
    // Plain HTTP on the TLS port gets nothing served.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{}/healthz", gw.port))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // A key, then a stream over HTTP/2 (ALPN) and over HTTP/1.1.
    let tenant = client
        .post(gw.url("/admin/v1/tenants"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "acme-tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(tenant.status(), 201);
    let key: Value = client
        .post(gw.url("/admin/v1/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"tenant": "acme-tls"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = key["secret"].as_str().unwrap();
    let (text, version) = stream_chat(&client, &gw, secret).await;
    assert_eq!(version, "HTTP/2.0");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let http1 = https_client(&ca_pem).http1_only().build().unwrap();
    let (text, version) = stream_chat(&http1, &gw, secret).await;
    assert_eq!(version, "HTTP/1.1");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // A broken replacement (a key that is not the certificate's) leaves the first one in use.
    let (second_cert, second_key, second_der) = ca.issue("gateway two", false);
    std::fs::write(&cert_file, &second_cert).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let served = handshake(gw.port, &ca_der, &[&rustls::version::TLS13])
        .await
        .unwrap();
    assert_eq!(served, first_der, "a mismatched pair is not used");
    // The matching key arrives: the new certificate is served, without a restart.
    std::fs::write(&key_file, &second_key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let served = handshake(gw.port, &ca_der, &[&rustls::version::TLS13])
            .await
            .unwrap();
        if served == second_der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served: {}",
            std::fs::read_to_string(&gw.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(client.get(gw.url("/healthz")).send().await.is_ok());
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(log.contains("TLS certificate reloaded"), "{log}");
    assert!(log.contains("not reloaded"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_cas_only_clients_with_a_certificate_from_them_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ca_pem = ca.cert.pem();
    let (cert, key, _) = ca.issue("gateway", false);
    let (client_cert, client_key, _) = ca.issue("internal caller", true);
    let other_ca = Ca::new();
    let (stranger_cert, stranger_key, _) = other_ca.issue("stranger", true);
    let files = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let tls = format!(
        "cert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nmin_version = \"1.2\"",
        files("cert.pem", &cert),
        files("key.pem", &key),
        files("clients.pem", &ca_pem)
    );
    let identity = |cert: &str, key: &str| {
        reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap()
    };
    let caller = https_client(&ca_pem)
        .identity(identity(&client_cert, &client_key))
        .build()
        .unwrap();
    let gw = start(dir.path(), &tls, &caller).await;
    assert_eq!(
        caller
            .get(gw.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let anonymous = https_client(&ca_pem).build().unwrap();
    assert!(anonymous.get(gw.url("/healthz")).send().await.is_err());
    let stranger = https_client(&ca_pem)
        .identity(identity(&stranger_cert, &stranger_key))
        .build()
        .unwrap();
    assert!(stranger.get(gw.url("/healthz")).send().await.is_err());
    // min_version = "1.2" lets a TLS 1.2 client in (with its certificate).
    let (tls12_cert, tls12_key, _) = ca.issue("tls12 caller", true);
    let tls12 = https_client(&ca_pem)
        .identity(identity(&tls12_cert, &tls12_key))
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    assert_eq!(
        tls12.get(gw.url("/healthz")).send().await.unwrap().status(),
        200
    );
}
