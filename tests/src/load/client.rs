//! One keep-alive HTTP/1.1 connection per worker, driven by hyper's connection-level client
//! (no pool, no per-request allocation beyond the request itself), and the timing of one
//! request over it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{HeaderMap, Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::sse::SseScanner;
use super::WireFormat;

/// What every request sends: built once, cloned per request (the body is a shared `Bytes`).
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    /// Resolved once, so a reconnect costs no DNS lookup.
    pub addr: SocketAddr,
    /// Origin-form target (`/v1/chat/completions?...`).
    pub path: Uri,
    /// Includes `host`, since the connection-level client does not add it.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub format: WireFormat,
    /// Parse the body as SSE (otherwise it is read to the end and counted).
    pub stream: bool,
    pub timeout: Duration,
}

/// Why a request did not count as a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// TCP connect or HTTP handshake failed.
    Connect,
    /// Writing the request or reading the response failed.
    Io,
    /// The request did not finish within `--timeout-s`.
    Timeout,
    /// Non-2xx status (the body is still drained so the connection can be reused).
    Status(u16),
    /// 2xx, but the stream ended without its terminator (or a non-stream body was empty).
    Incomplete,
}

/// Timings of a successful request, in microseconds from just before it was sent.
#[derive(Debug, Clone, Copy)]
pub struct Success {
    pub headers_us: u64,
    /// First SSE `data:` line (streaming) or first body byte (non-streaming).
    pub ttft_us: u64,
    pub total_us: u64,
    pub data_events: u64,
    pub bytes: u64,
}

/// Result of one request.
pub type Outcome = Result<Success, Failure>;

/// A worker's connection, opened lazily and reopened after any failure.
pub struct Connection {
    sender: Option<SendRequest<Full<Bytes>>>,
    /// Connections opened so far (1 for a well-behaved keep-alive server).
    pub opened: u64,
}

impl Connection {
    /// A connection that opens on first use.
    pub fn new() -> Self {
        Self {
            sender: None,
            opened: 0,
        }
    }

    /// Sends one request and reads its whole response, bounded by the template's timeout.
    pub async fn request(&mut self, t: &RequestTemplate) -> Outcome {
        let started = Instant::now();
        match tokio::time::timeout(t.timeout, self.exchange(t, started)).await {
            Ok(outcome) => {
                if matches!(outcome, Err(Failure::Connect | Failure::Io)) {
                    self.sender = None;
                }
                outcome
            }
            Err(_) => {
                // The connection may be mid-response: never reuse it.
                self.sender = None;
                Err(Failure::Timeout)
            }
        }
    }

    /// Makes sure there is a connection ready for a request; returns whether it is one that
    /// already served requests (and so may have been closed by the server meanwhile).
    async fn ensure_ready(&mut self, t: &RequestTemplate) -> Result<bool, Failure> {
        // A kept-alive connection the server has since closed usually shows up here, before a
        // request is written, and is replaced without counting an error.
        if let Some(sender) = self.sender.as_mut() {
            if sender.ready().await.is_ok() {
                return Ok(true);
            }
        }
        self.sender = Some(self.connect(t.addr).await?);
        Ok(false)
    }

    async fn connect(&mut self, addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Failure> {
        self.opened += 1;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|_| Failure::Connect)?;
        // Without it every streamed chunk can wait on Nagle plus the peer's delayed ACK.
        stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            // Ends when the server closes or the sender is dropped; errors surface on the
            // request that was using the connection.
            let _ = conn.await;
        });
        sender.ready().await.map_err(|_| Failure::Connect)?;
        Ok(sender)
    }

    async fn exchange(&mut self, t: &RequestTemplate, started: Instant) -> Outcome {
        let reused = self.ensure_ready(t).await?;
        let mut req = Request::new(Full::new(t.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = t.path.clone();
        *req.headers_mut() = t.headers.clone();

        let sender = self.sender.as_mut().ok_or(Failure::Connect)?;
        let response = match sender.try_send_request(req).await {
            Ok(response) => response,
            Err(mut e) => match e.take_message() {
                // Closed by the server between `ready` and the write: the request never left,
                // so send it once more on a fresh connection (what any client pool does).
                Some(req) if reused => {
                    let mut sender = self.connect(t.addr).await?;
                    let response = sender.send_request(req).await.map_err(|_| Failure::Io);
                    self.sender = Some(sender);
                    response?
                }
                _ => return Err(Failure::Io),
            },
        };
        let headers_us = micros(started);
        let status = response.status();
        let mut body = response.into_body();

        let mut scanner = t.stream.then(|| SseScanner::new(t.format));
        let mut ttft_us = None;
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| Failure::Io)?;
            let Some(data) = frame.data_ref() else {
                continue; // trailers
            };
            bytes += data.len() as u64;
            let first = match scanner.as_mut() {
                Some(s) => s.feed(data),
                None => ttft_us.is_none() && !data.is_empty(),
            };
            if first {
                ttft_us = Some(micros(started));
            }
        }
        let total_us = micros(started);

        if !status.is_success() {
            return Err(Failure::Status(status.as_u16()));
        }
        let (complete, data_events) = match scanner.as_mut() {
            Some(s) => {
                if s.finish() {
                    ttft_us = Some(total_us);
                }
                (s.terminated(), s.data_events())
            }
            None => (bytes > 0, 0),
        };
        match ttft_us {
            Some(ttft_us) if complete => Ok(Success {
                headers_us,
                ttft_us,
                total_us,
                data_events,
                bytes,
            }),
            _ => Err(Failure::Incomplete),
        }
    }
}

impl Default for Connection {
    fn default() -> Self {
        Self::new()
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}
