//! Hostile clients against the real binary: connections that send nothing, or only an
//! HTTP/2 preface, bodies that trickle in with or without a key, more connections than the
//! caps (and than the file-descriptor limit), and ambiguous `Authorization` headers. Each
//! gateway runs with small limits so that the test is cheap; the assertions are about
//! outcomes (closed, refused, answered), with generous bounds only against hanging forever.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tollgate_tests::harness::ADMIN_TOKEN;
use tollgate_tests::process::{admin_tenant_key, GatewayProcess};

/// How long anything the server must do on its own may take before the test gives up: far
/// above every limit configured here, so only a server that never does it fails.
const HANG: Duration = Duration::from_secs(30);

/// A gateway with the given `TOLLGATE__SERVER__*` settings (`(KEY, value)`, KEY without the
/// prefix); the data directory lives as long as the process.
async fn gateway(settings: &[(&str, &str)]) -> (GatewayProcess, tempfile::TempDir) {
    gateway_wrapped(&[], settings).await
}

async fn gateway_wrapped(
    wrapper: &[&str],
    settings: &[(&str, &str)],
) -> (GatewayProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let names: Vec<String> = settings
        .iter()
        .map(|(k, _)| format!("TOLLGATE__SERVER__{k}"))
        .collect();
    let mut env: Vec<(&str, &str)> = vec![("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)];
    env.extend(
        names
            .iter()
            .map(String::as_str)
            .zip(settings.iter().map(|(_, v)| *v)),
    );
    let gw = GatewayProcess::start_wrapped(
        wrapper,
        &["--data-dir", &data],
        &env,
        dir.path().join("gw.log"),
    )
    .await;
    (gw, dir)
}

fn addr(gw: &GatewayProcess) -> SocketAddr {
    gw.base_url
        .trim_start_matches("http://")
        .parse()
        .expect("a socket address")
}

/// A connection to `to` from the loopback address `from` (all of 127/8 is loopback).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the server closes the connection (an end of stream, or a reset: a server that
/// closes with unread bytes resets); returns what came before. Fails after [`HANG`].
async fn read_until_closed(conn: &mut TcpStream, what: &str) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(HANG, async {
        let mut chunk = [0u8; 4096];
        loop {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{what}: the connection was left open");
    String::from_utf8_lossy(&received).into_owned()
}

/// Reads one response head and as much body as `content-length` says. Fails after [`HANG`].
async fn read_response(conn: &mut TcpStream) -> (u16, String, String) {
    let mut received = Vec::new();
    let read = tokio::time::timeout(HANG, async {
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&received).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return (head.to_string(), body.to_string());
                }
            }
            let n = conn.read(&mut chunk).await.expect("the response arrives");
            assert!(n > 0, "closed before a response: {text}");
            received.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("no response");
    let (head, body) = read;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, head.to_ascii_lowercase(), body)
}

/// The status of `GET /healthz` on a new connection from `from`; 0 when there is no answer
/// (refused, closed, or nothing within a few seconds: callers retry).
async fn healthz_from(from: &str, to: SocketAddr) -> u16 {
    let attempt = async {
        let socket = TcpSocket::new_v4().ok()?;
        socket.bind(format!("{from}:0").parse().ok()?).ok()?;
        let mut conn = socket.connect(to).await.ok()?;
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut received = Vec::new();
        conn.read_to_end(&mut received).await.ok()?;
        let text = String::from_utf8_lossy(&received).into_owned();
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// The value of the metric line starting with `series` (0 when absent).
async fn metric(gw: &GatewayProcess, series: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", gw.base_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Retries `check` every 50 ms until it holds; fails after [`HANG`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + HANG;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const HTTP2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test]
async fn silent_sockets_and_a_bare_http2_preface_are_closed() {
    let (gw, _dir) = gateway(&[
        ("FIRST_BYTE_TIMEOUT_MS", "1000"),
        ("HEADER_READ_TIMEOUT_MS", "1000"),
    ])
    .await;
    let to = addr(&gw);
    assert!(
        gw.log_text().contains("open files limit"),
        "the start-up line reports the descriptor limit: {}",
        gw.log_text()
    );
    let mut silent = TcpStream::connect(to).await.unwrap();
    let mut preface = TcpStream::connect(to).await.unwrap();
    preface.write_all(HTTP2_PREFACE_AND_SETTINGS).await.unwrap();
    read_until_closed(&mut silent, "a socket that sends nothing").await;
    read_until_closed(&mut preface, "a socket that sends only a preface").await;
    eventually("both are counted", || async {
        metric(
            &gw,
            "tollgate_server_connections_timed_out_total{reason=\"first_byte\"}",
        )
        .await
            >= 1.0
            && metric(
                &gw,
                "tollgate_server_connections_timed_out_total{reason=\"first_request\"}",
            )
            .await
                >= 1.0
    })
    .await;
    assert_eq!(healthz_from("127.0.0.1", to).await, 200);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_its_requests() {
    let (gw, _dir) = gateway(&[("IDLE_TIMEOUT_MS", "1000")]).await;
    let stream = TcpStream::connect(addr(&gw)).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let request = hyper::Request::get(format!("{}/healthz", gw.base_url))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    // The server ends the connection (GOAWAY, then close): the client's side finishes.
    let ended = tokio::time::timeout(HANG, conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was left open");
    // The client kept its side open all along.
    drop(sender);
}

#[tokio::test]
async fn sockets_over_the_cap_are_refused_and_the_server_keeps_answering() {
    let (gw, _dir) = gateway(&[
        ("FIRST_BYTE_TIMEOUT_MS", "1000"),
        ("MAX_CONNECTIONS", "8"),
        ("MAX_CONNECTIONS_PER_IP", "0"),
    ])
    .await;
    let to = addr(&gw);
    let mut idle = Vec::new();
    for _ in 0..24 {
        idle.push(TcpStream::connect(to).await.unwrap());
    }
    let mut refused = 0;
    for conn in &mut idle {
        let got = read_until_closed(conn, "an idle socket").await;
        if got.starts_with("HTTP/1.1 503") {
            assert!(got.contains("too_many_connections"), "{got}");
            refused += 1;
        }
    }
    assert!(refused > 0, "no socket over the cap of 8 was refused");
    // All of them closed, the server answers a new connection.
    eventually("/healthz answers", || async {
        healthz_from("127.0.0.1", to).await == 200
    })
    .await;
    let counted = metric(
        &gw,
        "tollgate_server_connections_refused_total{reason=\"max_connections\"}",
    )
    .await;
    assert!(counted >= f64::from(refused), "{counted} < {refused}");
}

#[tokio::test]
async fn one_address_over_its_cap_is_refused_and_others_are_served() {
    let (gw, _dir) = gateway(&[
        ("FIRST_BYTE_TIMEOUT_MS", "60000"),
        ("MAX_CONNECTIONS_PER_IP", "3"),
    ])
    .await;
    let to = addr(&gw);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = connect_from("127.0.0.3", to).await;
        // Served once, so the server has surely counted it before the next one comes.
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut conn).await.0, 200);
        held.push(conn);
    }
    let mut over = connect_from("127.0.0.3", to).await;
    let got = read_until_closed(&mut over, "a fourth connection").await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    let (_, head) = got.split_once("\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{got}"
    );
    assert_eq!(healthz_from("127.0.0.4", to).await, 200);
    assert!(
        metric(
            &gw,
            "tollgate_server_connections_refused_total{reason=\"max_connections_per_ip\"}"
        )
        .await
            >= 1.0
    );
    drop(held);
}

/// Sends the head of a `POST path` with a 1 MB body and `extra` headers, then the body's first
/// bytes; the rest would follow slowly.
async fn slow_post(to: SocketAddr, path: &str, extra: &str) -> TcpStream {
    let mut conn = TcpStream::connect(to).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
         content-length: 1000000\r\n{extra}\r\n{{\"model\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

#[tokio::test]
async fn slow_bodies_without_a_key_are_refused_before_they_are_read() {
    let (gw, _dir) = gateway(&[("BODY_READ_TIMEOUT_MS", "60000")]).await;
    let to = addr(&gw);
    for (path, extra) in [
        ("/v1/chat/completions", ""),
        ("/v1/messages", "anthropic-version: 2023-06-01\r\n"),
        (
            "/v1/chat/completions",
            "authorization: Bearer tg_not_a_key\r\n",
        ),
    ] {
        let mut conn = slow_post(to, path, extra).await;
        // Almost all of the megabyte is still to come: the answer does not wait for it.
        let (status, head, body) = read_response(&mut conn).await;
        assert_eq!(status, 401, "{path} {extra}: {head}{body}");
        assert!(head.contains("connection: close"), "{head}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        if path == "/v1/messages" {
            assert_eq!(json["type"], "error", "{body}");
            assert_eq!(json["error"]["type"], "authentication_error", "{body}");
        } else {
            assert_eq!(json["error"]["code"], "invalid_api_key", "{body}");
        }
        // More of the body does not keep the connection: it is closed.
        let _ = conn.write_all(b"\"mock/fast\"").await;
        read_until_closed(&mut conn, "a refused upload").await;
    }
}

#[tokio::test]
async fn a_slow_body_with_a_key_gets_a_408_and_its_connection_closed() {
    let (gw, _dir) = gateway(&[("BODY_READ_TIMEOUT_MS", "1000")]).await;
    let (key, _) = admin_tenant_key(&gw.base_url, "slow").await;
    let to = addr(&gw);
    for path in ["/v1/chat/completions", "/v1/messages"] {
        let extra = format!("authorization: Bearer {key}\r\nanthropic-version: 2023-06-01\r\n");
        let mut conn = slow_post(to, path, &extra).await;
        let (status, head, body) = read_response(&mut conn).await;
        assert_eq!(status, 408, "{path}: {head}{body}");
        assert!(head.contains("connection: close"), "{head}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        if path == "/v1/messages" {
            assert_eq!(json["error"]["type"], "timeout_error", "{body}");
        } else {
            assert_eq!(json["error"]["code"], "request_timeout", "{body}");
        }
        read_until_closed(&mut conn, "a timed-out upload").await;
    }
}

#[tokio::test]
async fn keys_are_read_from_any_bearer_spelling_and_two_keys_are_refused() {
    let (gw, _dir) = gateway(&[]).await;
    let (key, _) = admin_tenant_key(&gw.base_url, "spelling").await;
    let (other, _) = admin_tenant_key(&gw.base_url, "other").await;
    let client = reqwest::Client::new();
    let chat = serde_json::json!({
        "model": "mock/fast",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5
    });
    let messages = serde_json::json!({
        "model": "mock/fast",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5
    });
    let send = |path: &str, headers: Vec<(&str, String)>| {
        let mut request = client
            .post(format!("{}{path}", gw.base_url))
            .header("anthropic-version", "2023-06-01")
            .json(if path == "/v1/messages" {
                &messages
            } else {
                &chat
            });
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    for scheme in ["BEARER", "bearer", "Bearer", "bEaReR"] {
        let (status, body) = send(
            "/v1/chat/completions",
            vec![("authorization", format!("{scheme} {key}"))],
        )
        .await;
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    // Another scheme in Authorization does not hide x-api-key.
    let (status, body) = send(
        "/v1/messages",
        vec![
            ("authorization", "Basic dXNlcjpwYXNz".to_string()),
            ("x-api-key", key.clone()),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The same key twice is fine; two different keys are refused, in each API's shape.
    let (status, body) = send(
        "/v1/chat/completions",
        vec![
            ("authorization", format!("Bearer {key}")),
            ("x-api-key", key.clone()),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let two = || {
        vec![
            ("authorization", format!("Bearer {key}")),
            ("x-api-key", other.clone()),
        ]
    };
    let (status, body) = send("/v1/chat/completions", two()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("two different API keys"),
        "{body}"
    );
    let (status, body) = send("/v1/messages", two()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

/// More connections than the process has file descriptors (run under `prlimit`, with a cap
/// set above what the descriptors allow): `accept` fails with EMFILE for a while; the server
/// neither spins nor dies, and answers again once the idle sockets are gone.
#[tokio::test]
async fn running_out_of_file_descriptors_does_not_stop_the_server() {
    let (gw, _dir) = gateway_wrapped(
        &["prlimit", "--nofile=160:160", "--"],
        &[
            ("FIRST_BYTE_TIMEOUT_MS", "1000"),
            ("MAX_CONNECTIONS", "100000"),
            ("MAX_CONNECTIONS_PER_IP", "0"),
            ("THREADS", "1"),
        ],
    )
    .await;
    let to = addr(&gw);
    let mut idle = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(to).await {
            Ok(conn) => idle.push(conn),
            // The backlog may be full: enough is open.
            Err(_) => break,
        }
    }
    eventually("accept fails for lack of descriptors", || async {
        gw.log_text().contains("accept failed")
    })
    .await;
    for conn in &mut idle {
        read_until_closed(conn, "an idle socket").await;
    }
    eventually("/healthz answers", || async {
        healthz_from("127.0.0.1", to).await == 200
    })
    .await;
    assert!(
        metric(&gw, "tollgate_server_accept_errors_total").await >= 1.0,
        "accept errors are counted"
    );
}
