//! What the HTTP providers share: the transport, timeouts, and turning an upstream error
//! response into a [`GatewayError`] without leaking the credential.
//!
//! Two transports carry requests: the lean HTTP/1.1 client (`http1.rs`) for plain `http://`
//! upstreams (vLLM, local servers), reqwest for `https://`. Everything after the response
//! head (status mapping, error bodies, redaction, retry-after, the first-body-byte timeout)
//! is shared.

use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::future::Future as _;

use super::http1::Http1Client;
use super::{BodyStream, UpstreamResponse};
use crate::error::GatewayError;

/// Largest upstream error body read to extract a message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A credential read from the environment; `Debug` never shows it.
#[derive(Clone, Default)]
pub struct Secret(Option<String>);

impl Secret {
    /// Reads `var` from the environment (absent or empty means no credential).
    pub fn from_env(var: Option<&str>) -> Secret {
        Secret(
            var.and_then(|v| std::env::var(v).ok())
                .filter(|v| !v.is_empty()),
        )
    }

    /// A credential given directly (decrypted from the store).
    pub fn new(value: String) -> Secret {
        Secret(Some(value).filter(|v| !v.is_empty()))
    }

    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// `e` with the secret replaced in its message.
    pub fn redact_error(&self, e: GatewayError) -> GatewayError {
        match e {
            GatewayError::UpstreamUnavailable(m) => {
                GatewayError::UpstreamUnavailable(self.redact(&m))
            }
            GatewayError::UpstreamTimeout(m) => GatewayError::UpstreamTimeout(self.redact(&m)),
            GatewayError::UpstreamProtocol(m) => GatewayError::UpstreamProtocol(self.redact(&m)),
            GatewayError::Internal(m) => GatewayError::Internal(self.redact(&m)),
            other => other,
        }
    }

    /// The secret when it is long enough to be told apart from ordinary text.
    fn redactable(&self) -> Option<&str> {
        self.0.as_deref().filter(|s| s.len() >= 4)
    }

    /// `text` with every occurrence of the secret replaced.
    pub fn redact(&self, text: &str) -> String {
        match self.redactable() {
            Some(s) => text.replace(s, super::redact::REDACTED),
            None => text.to_string(),
        }
    }

    /// `body` with every occurrence of the secret replaced ([`super::redact::Redacted`]).
    pub fn redact_stream(&self, body: BodyStream) -> BodyStream {
        match self.redactable() {
            Some(s) => Box::pin(super::redact::Redacted::new(body, s)),
            None => body,
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Secret([REDACTED])"
        } else {
            "Secret(None)"
        })
    }
}

/// How requests reach an upstream.
enum Transport {
    /// `https://` (and any URL the lean client does not handle).
    Reqwest(reqwest::Client),
    /// Plain `http://`: the lean client, whose body reads the socket itself.
    Http1(Http1Client),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Reqwest(_) => f.write_str("Reqwest"),
            Transport::Http1(c) => c.fmt(f),
        }
    }
}

/// An HTTP upstream endpoint: transport, base URL, credential, timeouts.
#[derive(Debug)]
pub struct HttpUpstream {
    transport: Transport,
    pub base_url: String,
    pub secret: Secret,
    pub first_byte_timeout: Duration,
    /// Longest pause between body chunks once the first arrived (`None`: unbounded).
    pub idle_timeout: Option<Duration>,
}

impl HttpUpstream {
    pub fn new(
        base_url: &str,
        secret: Secret,
        connect_timeout: Duration,
        first_byte_timeout: Duration,
    ) -> Result<Self, GatewayError> {
        Self::with_transport(base_url, secret, connect_timeout, first_byte_timeout, true)
    }

    /// `lean`: use the lean client where it applies (always, outside tests).
    fn with_transport(
        base_url: &str,
        secret: Secret,
        connect_timeout: Duration,
        first_byte_timeout: Duration,
        lean: bool,
    ) -> Result<Self, GatewayError> {
        let base_url = base_url.trim_end_matches('/').to_string();
        let lean = lean
            .then(|| Http1Client::for_base_url(&base_url, connect_timeout))
            .flatten();
        let transport = match lean {
            Some(client) => Transport::Http1(client),
            None => Transport::Reqwest(
                reqwest::Client::builder()
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .pool_max_idle_per_host(1024)
                    .build()
                    .map_err(|e| {
                        GatewayError::Internal(format!("cannot build HTTP client: {e}"))
                    })?,
            ),
        };
        Ok(HttpUpstream {
            transport,
            base_url,
            secret,
            first_byte_timeout,
            idle_timeout: None,
        })
    }

    /// Bounds the pause between body chunks (a stalled stream ends with an error).
    pub fn with_idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Whether requests go through the lean HTTP/1.1 client (plain `http://` upstreams).
    pub fn is_lean_http1(&self) -> bool {
        matches!(self.transport, Transport::Http1(_))
    }

    /// POSTs `body` to the base URL + `path` with `headers`, and waits (bounded) for the
    /// response headers and the first body byte. A non-2xx answer is an error.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<UpstreamResponse, GatewayError> {
        let started = std::time::Instant::now();
        match &self.transport {
            Transport::Reqwest(client) => {
                let mut request = client.post(format!("{}{path}", self.base_url)).body(body);
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                let response =
                    match tokio::time::timeout(self.first_byte_timeout, request.send()).await {
                        Err(_) => return Err(self.head_timeout()),
                        Ok(Err(e)) => return Err(self.transport_error(&e)),
                        Ok(Ok(r)) => r,
                    };
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let secret = self.secret.clone();
                let body = response.bytes_stream().map(move |r| {
                    r.map_err(|e| {
                        GatewayError::UpstreamUnavailable(secret.redact(&format!(
                            "connection lost mid-response: {}",
                            error_chain(&e)
                        )))
                    })
                });
                self.respond(started, status, headers, body).await
            }
            Transport::Http1(client) => {
                let sent = client.post(path, headers, &body);
                let response = match tokio::time::timeout(self.first_byte_timeout, sent).await {
                    Err(_) => return Err(self.head_timeout()),
                    Ok(Err(e)) => return Err(self.secret.redact_error(e)),
                    Ok(Ok(r)) => r,
                };
                let secret = self.secret.clone();
                let body = response
                    .body
                    .map(move |r| r.map_err(|e| secret.redact_error(e)));
                self.respond(started, response.status, response.headers, body)
                    .await
            }
        }
    }

    fn head_timeout(&self) -> GatewayError {
        GatewayError::UpstreamTimeout(format!(
            "no response within {} ms",
            self.first_byte_timeout.as_millis()
        ))
    }

    /// What both transports do with a response whose head has arrived: a non-2xx status
    /// becomes an error (message from the body, redacted), and the first body byte is
    /// awaited within what is left of the first-byte timeout.
    async fn respond<S>(
        &self,
        started: std::time::Instant,
        status: u16,
        headers: HeaderMap,
        mut body: S,
    ) -> Result<UpstreamResponse, GatewayError>
    where
        S: Stream<Item = Result<Bytes, GatewayError>> + Send + Unpin + 'static,
    {
        if !(200..300).contains(&status) {
            // Bounded in size and in time: an error head followed by a stalled body must not
            // hang the request (what arrived in time is used as the message).
            let remaining = self.first_byte_timeout.saturating_sub(started.elapsed());
            let mut text = Vec::new();
            let _ = tokio::time::timeout(
                remaining.max(std::time::Duration::from_millis(100)),
                async {
                    text = read_bounded(&mut body, MAX_ERROR_BODY).await;
                },
            )
            .await;
            // Redacted before anything is cut out of it (a cut could split the credential),
            // and each field after (nothing else reaches the client).
            let text = self.secret.redact(&String::from_utf8_lossy(&text));
            let detail = upstream_detail(status, text.as_bytes());
            let redact = |f: Option<String>| f.map(|v| self.secret.redact(&v));
            return Err(GatewayError::Upstream {
                status,
                message: self.secret.redact(&detail.message),
                retry_after_s: retry_after_secs(&headers),
                param: redact(detail.param),
                code: redact(detail.code),
            });
        }
        // The first body byte is still "before the response": an upstream that sends headers
        // and then nothing is a timeout the client can be told about (and a later issue can
        // retry), not a stream that hangs forever.
        let remaining = self.first_byte_timeout.saturating_sub(started.elapsed());
        let first = match tokio::time::timeout(remaining, body.next()).await {
            Err(_) => {
                return Err(GatewayError::UpstreamTimeout(format!(
                    "no response body within {} ms",
                    self.first_byte_timeout.as_millis()
                )))
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(first) => first,
        };
        let body: BodyStream = match self.idle_timeout {
            None => Box::pin(futures_util::stream::iter(first).chain(body)),
            Some(idle) => Box::pin(IdleTimeout::new(
                futures_util::stream::iter(first).chain(body),
                idle,
            )),
        };
        let body = self.secret.redact_stream(body);
        Ok(UpstreamResponse { headers, body })
    }

    fn transport_error(&self, e: &reqwest::Error) -> GatewayError {
        // The URL in reqwest's message is the base URL (never holds the key); still redact.
        let text = self.secret.redact(&error_chain(e));
        if e.is_timeout() {
            GatewayError::UpstreamTimeout(text)
        } else {
            GatewayError::UpstreamUnavailable(text)
        }
    }
}

/// A body that fails with [`GatewayError::UpstreamTimeout`] when no chunk arrives for `idle`.
struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    expired: bool,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            expired: false,
        }
    }
}

impl<S> Stream for IdleTimeout<S>
where
    S: Stream<Item = Result<Bytes, GatewayError>> + Unpin,
{
    type Item = Result<Bytes, GatewayError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.expired {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(item) => {
                let deadline = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(deadline);
                Poll::Ready(item)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.expired = true;
                    Poll::Ready(Some(Err(GatewayError::UpstreamTimeout(format!(
                        "no data for {} ms mid-response (idle_timeout_ms)",
                        self.idle.as_millis()
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn read_bounded<S>(body: &mut S, limit: usize) -> Vec<u8>
where
    S: Stream<Item = Result<Bytes, GatewayError>> + Unpin,
{
    let mut out = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(chunk.get(..chunk.len().min(room)).unwrap_or_default());
        if out.len() >= limit {
            break;
        }
    }
    out
}

/// What an upstream error body says.
struct UpstreamDetail {
    message: String,
    param: Option<String>,
    code: Option<String>,
}

/// The provider's message, `param` and `code` from an OpenAI- or Anthropic-shaped error body.
/// Errors that are the client's (4xx other than 401/403/429) keep the provider's message as
/// is; others say it came from upstream.
fn upstream_detail(status: u16, body: &[u8]) -> UpstreamDetail {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        parsed.as_ref().and_then(|v| {
            v.pointer(&format!("/error/{name}"))
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
    };
    let message = field("message").or_else(|| {
        parsed.as_ref().and_then(|v| {
            v.get("message")
                .or_else(|| v.get("detail"))
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
    });
    let message = message.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        text.chars()
            .take(300)
            .collect::<String>()
            .trim()
            .to_string()
    });
    let clients_fault = (400..500).contains(&status) && ![401, 403, 429].contains(&status);
    UpstreamDetail {
        message: if clients_fault {
            message
        } else {
            format!("Upstream provider returned {status}: {message}")
        },
        param: field("param").filter(|_| clients_fault),
        code: field("code").filter(|_| clients_fault),
    }
}

/// `retry-after` (seconds, or `retry-after-ms` rounded up).
pub fn retry_after_secs(headers: &HeaderMap) -> Option<u64> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some((ms / 1000.0).ceil().max(0.0) as u64);
    }
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| s.ceil().max(0.0) as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SECRET: &str = "sk-test-SECRET-1234";

    /// Answers every request on every connection with `response`, then keeps the connection.
    async fn canned(response: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut tmp).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&tmp[..n]);
                        // Requests here carry `{}` as their body.
                        if buf.ends_with(b"\r\n\r\n{}") {
                            buf.clear();
                            if stream.write_all(response).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        format!("http://{addr}/v1")
    }

    /// The same request through both transports.
    async fn both(base: &str) -> [Result<Vec<u8>, GatewayError>; 2] {
        let mut out = Vec::new();
        for lean in [true, false] {
            let up = HttpUpstream::with_transport(
                base,
                Secret::new(SECRET.to_string()),
                Duration::from_secs(1),
                Duration::from_millis(300),
                lean,
            )
            .unwrap();
            assert_eq!(up.is_lean_http1(), lean);
            let auth = format!("Bearer {SECRET}");
            let headers = [
                ("content-type", "application/json"),
                ("authorization", &auth),
            ];
            let result = match up.post("/chat", &headers, Bytes::from_static(b"{}")).await {
                Err(e) => Err(e),
                Ok(r) => {
                    let mut body = r.body;
                    let mut bytes = Vec::new();
                    while let Some(piece) = body.next().await {
                        bytes.extend_from_slice(&piece.unwrap());
                    }
                    Ok(bytes)
                }
            };
            out.push(result);
        }
        let b = out.pop().unwrap();
        let a = out.pop().unwrap();
        [a, b]
    }

    #[tokio::test]
    async fn both_transports_relay_the_same_body() {
        let base = canned(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
              9\r\ndata: 1\n\n\r\nc\r\ndata: [DONE]\r\n0\r\n\r\n",
        )
        .await;
        for r in both(&base).await {
            assert_eq!(r.unwrap(), b"data: 1\n\ndata: [DONE]");
        }
    }

    #[tokio::test]
    async fn both_transports_map_error_answers_the_same_way() {
        let base = canned(
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after-ms: 1500\r\ncontent-length: 91\r\n\r\n\
              {\"error\":{\"message\":\"slow down, sk-test-SECRET-1234\",\"type\":\"rate_limit_error\",\"code\":\"x\"}}",
        )
        .await;
        for r in both(&base).await {
            match r {
                Err(GatewayError::Upstream {
                    status: 429,
                    message,
                    retry_after_s: Some(2),
                    param: None,
                    code: None,
                }) => assert_eq!(
                    message,
                    "Upstream provider returned 429: slow down, [REDACTED]"
                ),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn both_transports_time_out_on_headers_without_a_body() {
        let base = canned(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
        for r in both(&base).await {
            assert!(
                matches!(&r, Err(GatewayError::UpstreamTimeout(m)) if m.contains("no response body")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn secrets_are_redacted_and_never_debug_printed() {
        let s = Secret(Some("sk-live-123456".to_string()));
        assert_eq!(
            s.redact("bad key sk-live-123456 given"),
            "bad key [REDACTED] given"
        );
        assert!(!format!("{s:?}").contains("sk-live"));
    }

    #[test]
    fn extracts_messages_from_both_error_shapes() {
        let o = upstream_detail(
            400,
            br#"{"error":{"message":"bad temp","type":"invalid_request_error","param":"temperature"}}"#,
        );
        assert!(o.message.ends_with("bad temp"));
        assert_eq!(o.param.as_deref(), Some("temperature"));
        let a = upstream_detail(
            529,
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert!(a.message.ends_with("Overloaded"));
        assert!(upstream_detail(502, b"<html>bad gateway</html>")
            .message
            .contains("bad gateway"));
    }
}
