//! A lean HTTP/1.1 client for `http://` upstreams (vLLM, local OpenAI-compatible servers, the
//! mock upstream). `https://` upstreams keep using reqwest (see `http.rs`).
//!
//! Why not hyper's client: it runs every connection in a background task and hands each body
//! chunk to the response through a channel, so every upstream chunk costs a task hop (often a
//! cross-thread wake), and the relay, which sees `Pending` between chunks, writes each one to
//! the client separately. Here the response body ([`Http1Body`]) reads the socket itself: one
//! read per poll, every complete chunk in the buffer decoded, their payloads yielded as one
//! [`Bytes`]. A burst of upstream chunks is one relay step and one client write.
//!
//! This departs from "reqwest/hyper for upstream calls" for plain-HTTP upstreams only, for
//! what it measured (`scripts/bench-gateway.sh`, 20-chunk streams, 2 cores, same session):
//! gateway CPU per request from about 470 to 135 µs at concurrency 1 and from 250 to 60 µs
//! at 128, throughput at 128 from 0.15 to about 0.5 of the upstream's own. reqwest stays for
//! `https://`, where TLS makes the client's own costs a smaller share.
//!
//! Connections are kept alive in one pool per upstream with one set of idle connections per
//! serving thread ([`crate::server::serving_thread`]): a connection is registered with the
//! reactor of the runtime that opened it, and a request runs on one thread from start to end,
//! so each thread reuses its own (other threads, such as the main runtime's workers, share one
//! set, whichever of them a task runs on). A pooled connection is checked
//! before reuse (closed by the server, or holding unread bytes: discarded) and, because the
//! server may close it just as the request is sent (the keep-alive race), a request that
//! fails on a pooled connection before any response byte is sent again, once, on a fresh
//! connection. A body that ends cleanly returns
//! its connection to the pool; one dropped early (the client went away) closes it, which the
//! upstream sees at once: that is the cancellation.
//!
//! Upstream input never panics the gateway: heads are parsed by `httparse` within
//! [`MAX_HEAD_BYTES`], chunk-size lines within [`MAX_CHUNK_LINE_BYTES`], trailers within
//! [`MAX_TRAILER_BYTES`], and malformed framing is a [`GatewayError::UpstreamProtocol`].

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::error::GatewayError;
use crate::server::{serving_thread, PerThread};

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 128;
/// Largest chunk-size line (size and extensions) accepted.
pub const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// Largest trailer section accepted.
pub const MAX_TRAILER_BYTES: usize = 64 * 1024;
/// Most idle connections kept per upstream and serving thread.
const MAX_IDLE: usize = 512;
/// How long an idle connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Room made in the read buffer before each read.
const READ_SIZE: usize = 16 * 1024;

/// An `http://` upstream: where to connect, what to call it, and its pool.
pub struct Http1Client {
    /// `host:port` to connect to.
    connect_to: String,
    /// The `Host` header: the URL's authority as written.
    host: String,
    /// The base URL's path, without a trailing `/` (`/v1`, or empty).
    base_path: String,
    connect_timeout: Duration,
    /// Idle connections; bodies return theirs through a `Weak`, so a dropped client's pool
    /// (and its connections) goes with it.
    pool: Arc<Pool>,
}

impl std::fmt::Debug for Http1Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Client")
            .field("host", &self.host)
            .field("base_path", &self.base_path)
            .finish_non_exhaustive()
    }
}

/// A response whose head has been read; the body is read as it is polled.
pub struct Http1Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Http1Body,
}

impl Http1Client {
    /// A client for `base_url` if it is a plain `http://` URL this client handles (no user
    /// info, query or fragment); `None` otherwise (reqwest then handles it).
    pub fn for_base_url(base_url: &str, connect_timeout: Duration) -> Option<Http1Client> {
        let scheme = base_url.get(..7)?;
        if !scheme.eq_ignore_ascii_case("http://") {
            return None;
        }
        let rest = base_url.get(7..)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (rest.get(..i)?, rest.get(i..)?),
            None => (rest, ""),
        };
        let bad_char = |c: char| c.is_ascii_control() || c.is_whitespace() || !c.is_ascii();
        if authority.is_empty()
            || authority.contains(['@', '?', '#'])
            || authority.contains(bad_char)
            || path.contains(['?', '#'])
            || path.contains(bad_char)
        {
            return None;
        }
        let has_port = match authority.strip_prefix('[') {
            // `[v6]` or `[v6]:port`
            Some(v6) => v6.split_once(']')?.1.starts_with(':'),
            None => authority.contains(':'),
        };
        let connect_to = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Some(Http1Client {
            connect_to,
            host: authority.to_string(),
            base_path: path.trim_end_matches('/').to_string(),
            connect_timeout,
            pool: Arc::new(Pool::default()),
        })
    }

    /// POSTs `body` to the base path + `path` with `headers` (`host` and `content-length` are
    /// added) and reads the response head. A pooled connection that fails before any response
    /// byte arrives is replaced by a fresh one, once.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &Bytes,
    ) -> Result<Http1Response, GatewayError> {
        let head = self.request_head(path, headers, body.len())?;
        if let Some(conn) = self.pool.checkout() {
            match self.exchange(conn, &head, body).await {
                Ok(response) => return Ok(response),
                // The server closed the idle connection as the request went out: it cannot
                // have acted on the request, so sending it again is safe.
                Err(Failure::BeforeResponse(e)) => {
                    tracing::debug!("pooled upstream connection failed ({e}); retrying once");
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
        let conn = self.connect().await?;
        match self.exchange(conn, &head, body).await {
            Ok(response) => Ok(response),
            Err(Failure::BeforeResponse(e) | Failure::Fatal(e)) => Err(e),
        }
    }

    /// Idle connections to this upstream.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle.sum(VecDeque::len)
    }

    /// The request line and headers, ready to write.
    fn request_head(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        content_length: usize,
    ) -> Result<Vec<u8>, GatewayError> {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(b"POST ");
        head.extend_from_slice(self.base_path.as_bytes());
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(self.host.as_bytes());
        head.extend_from_slice(b"\r\ncontent-length: ");
        head.extend_from_slice(content_length.to_string().as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            // A CR or LF in a value would let it add headers (or a request) of its own.
            let valid_name = !name.is_empty() && name.bytes().all(is_token_byte);
            let valid_value = value
                .bytes()
                .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));
            if !valid_name || !valid_value {
                return Err(GatewayError::UpstreamUnavailable(format!(
                    "cannot send request header `{name}`: invalid characters"
                )));
            }
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        Ok(head)
    }

    async fn connect(&self) -> Result<Conn, GatewayError> {
        let connecting = TcpStream::connect(self.connect_to.as_str());
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => {
                return Err(GatewayError::UpstreamTimeout(format!(
                    "connecting to {} timed out after {} ms",
                    self.host,
                    self.connect_timeout.as_millis()
                )))
            }
            Ok(Err(e)) => {
                return Err(GatewayError::UpstreamUnavailable(format!(
                    "cannot connect to {}: {e}",
                    self.host
                )))
            }
            Ok(Ok(stream)) => stream,
        };
        // Without it every small request or chunk can wait on Nagle and delayed ACKs.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY on an upstream connection: {e}");
        }
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_SIZE),
            idle_since: Instant::now(),
            thread: serving_thread(),
        })
    }

    /// Writes the request on `conn` and reads the response head.
    async fn exchange(
        &self,
        mut conn: Conn,
        head: &[u8],
        body: &[u8],
    ) -> Result<Http1Response, Failure> {
        if let Err(e) = write_request(&mut conn.stream, head, body).await {
            return Err(Failure::BeforeResponse(GatewayError::UpstreamUnavailable(
                format!("cannot send the request: {e}"),
            )));
        }
        let head = read_head(&mut conn).await?;
        let mut body = Http1Body {
            conn: Some(conn),
            decoder: head.decoder,
            keep_alive: head.keep_alive,
            pool: Arc::downgrade(&self.pool),
        };
        if body.decoder.is_done() {
            body.release();
        }
        Ok(Http1Response {
            status: head.status,
            headers: head.headers,
            body,
        })
    }
}

/// An `UpstreamUnavailable` for a connection that failed.
fn lost(detail: &str) -> GatewayError {
    GatewayError::UpstreamUnavailable(format!("connection lost mid-response: {detail}"))
}

fn protocol(detail: impl std::fmt::Display) -> GatewayError {
    GatewayError::UpstreamProtocol(detail.to_string())
}

/// How an attempt failed.
enum Failure {
    /// Before any response byte arrived: on a pooled connection, worth one retry.
    BeforeResponse(GatewayError),
    Fatal(GatewayError),
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Writes head and body, normally in one `writev`.
async fn write_request(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut written = 0;
    let total = head.len() + body.len();
    while written < total {
        let n = match head.get(written..) {
            Some(rest) if !rest.is_empty() => {
                stream
                    .write_vectored(&[IoSlice::new(rest), IoSlice::new(body)])
                    .await?
            }
            _ => {
                let from = written.saturating_sub(head.len());
                stream.write(body.get(from..).unwrap_or_default()).await?
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

/// What a response head says.
struct Head {
    status: u16,
    headers: HeaderMap,
    decoder: Decoder,
    keep_alive: bool,
}

/// Reads until a complete final (non-1xx) response head is buffered and parses it; what
/// follows it stays in `conn.buf`.
async fn read_head(conn: &mut Conn) -> Result<Head, Failure> {
    let mut received = false;
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&conn.buf) {
                Err(e) => return Err(Failure::Fatal(e)),
                Ok(Some((len, head))) => {
                    conn.buf.advance(len);
                    match head {
                        Some(head) => return Ok(head),
                        // An interim (1xx) response: the real one follows.
                        None => continue,
                    }
                }
                Ok(None) if conn.buf.len() > MAX_HEAD_BYTES => {
                    return Err(Failure::Fatal(protocol(format!(
                        "response head over {MAX_HEAD_BYTES} bytes"
                    ))));
                }
                Ok(None) => {}
            }
        }
        conn.buf.reserve(READ_SIZE);
        let before = |received: bool, e: GatewayError| {
            if received {
                Failure::Fatal(e)
            } else {
                Failure::BeforeResponse(e)
            }
        };
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                return Err(before(
                    received,
                    GatewayError::UpstreamUnavailable(if received {
                        "upstream closed the connection in the middle of the response head"
                            .to_string()
                    } else {
                        "upstream closed the connection without responding".to_string()
                    }),
                ))
            }
            Ok(_) => {
                received = true;
                crate::server::busy_poll::activity();
            }
            Err(e) => {
                return Err(before(
                    received,
                    GatewayError::UpstreamUnavailable(format!("reading the response failed: {e}")),
                ))
            }
        }
    }
}

/// [`parse_head`]'s length only (the fuzz tests' entry point).
pub(crate) fn parse_head_len(buf: &[u8]) -> Result<Option<usize>, String> {
    parse_head(buf)
        .map(|r| r.map(|(n, _)| n))
        .map_err(|e| e.to_string())
}

/// A chunked body fed to the decoder in pieces cut at `cuts` (the fuzz tests' entry point):
/// the payload and whether the body ended.
pub(crate) fn decode_chunked(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), String> {
    let mut decoder = Decoder::Chunked(ChunkedDecoder::default());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        buf.extend_from_slice(&input[from..cut]);
        from = cut;
        let bytes = decoder.decode(&mut buf).map_err(|e| format!("{e:?}"))?;
        out.extend_from_slice(&bytes);
        if decoder.is_done() {
            break;
        }
    }
    Ok((out, decoder.is_done()))
}

/// Parses a response head at the start of `buf`: `None` if incomplete; else its length and
/// the head (`None` for an interim 1xx response, which the caller skips).
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Option<Head>)>, GatewayError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(protocol(format!("invalid response head: {e}"))),
    };
    let status = response.code.unwrap_or(0);
    if status == 101 {
        return Err(protocol("unexpected 101 Switching Protocols"));
    }
    if (100..200).contains(&status) {
        return Ok(Some((len, None)));
    }
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = response.version != Some(1);
    for h in response.headers.iter() {
        let value = h.value;
        if h.name.eq_ignore_ascii_case("content-length") {
            for part in value.split(|&b| b == b',') {
                let n =
                    parse_content_length(part).ok_or_else(|| protocol("invalid content-length"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(protocol("conflicting content-length values"));
                }
                content_length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            // Only the last coding counts: `chunked` must be applied last.
            chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection")
            && value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            close = true;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let decoder = if status == 204 || status == 304 {
        Decoder::Length(0)
    } else if transfer_encoding {
        // With both, transfer-encoding wins and the connection is not reused (RFC 9112 §6.3).
        if content_length.is_some() {
            close = true;
        }
        if chunked {
            Decoder::Chunked(ChunkedDecoder::default())
        } else {
            close = true;
            Decoder::Eof
        }
    } else if let Some(n) = content_length {
        Decoder::Length(n)
    } else {
        close = true;
        Decoder::Eof
    };
    Ok(Some((
        len,
        Some(Head {
            status,
            headers,
            decoder,
            keep_alive: !close,
        }),
    )))
}

fn parse_content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

// ------------------------------------------------------------------------------- body

/// A response body read straight from its connection.
pub struct Http1Body {
    /// `None` once the body has ended (the connection went back to the pool or was closed).
    conn: Option<Conn>,
    decoder: Decoder,
    keep_alive: bool,
    pool: Weak<Pool>,
}

impl Http1Body {
    /// The body is complete: pool the connection if it can carry another request.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                if let Some(pool) = self.pool.upgrade() {
                    pool.checkin(conn);
                }
            }
        }
    }

    /// Decodes what is buffered; `Some` when there is something to yield.
    fn decode_buffered(&mut self) -> Option<Result<Bytes, GatewayError>> {
        let conn = self.conn.as_mut()?;
        if conn.buf.is_empty() && !self.decoder.is_done() {
            return None;
        }
        match self.decoder.decode(&mut conn.buf) {
            Err(e) => {
                self.conn = None;
                Some(Err(protocol(format!("invalid chunked body: {e}"))))
            }
            Ok(out) => {
                if self.decoder.is_done() {
                    self.release();
                }
                (!out.is_empty()).then_some(Ok(out))
            }
        }
    }
}

impl Stream for Http1Body {
    type Item = Result<Bytes, GatewayError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.decode_buffered() {
                return Poll::Ready(Some(item));
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if conn.buf.capacity() - conn.buf.len() < READ_SIZE / 4 {
                conn.buf.reserve(READ_SIZE);
            }
            if let Err(e) = std::task::ready!(conn.stream.poll_read_ready(cx)) {
                this.conn = None;
                return Poll::Ready(Some(Err(lost(&e.to_string()))));
            }
            match read_some(&conn.stream, &mut conn.buf) {
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(match this.decoder {
                        // The body was "until the connection closes": it has.
                        Decoder::Eof => None,
                        _ => Some(Err(lost(
                            "upstream closed the connection before the body was complete",
                        ))),
                    });
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(lost(&e.to_string()))));
                }
            }
        }
    }
}

/// One read into the spare room of `buf`, the socket being reported readable. As in tokio's
/// own `poll_read`, a read that leaves room unfilled is taken to have drained the socket and
/// clears its readiness, so the next poll waits for the reactor instead of spending a system
/// call on `EAGAIN` (one per chunk when chunks arrive apart). A close stays visible: tokio
/// never clears read-closed readiness.
fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut read = 0;
    let result = stream.try_io(Interest::READABLE, || {
        read = stream.try_read_buf(buf)?;
        if read > 0 && read < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(read)
        }
    });
    if read > 0 {
        crate::server::busy_poll::activity();
    }
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok(read),
        other => other,
    }
}

/// How the body's end is found.
#[derive(Debug)]
enum Decoder {
    /// `content-length`: bytes still to come.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the server closes the connection.
    Eof,
}

impl Decoder {
    fn is_done(&self) -> bool {
        match self {
            Decoder::Length(n) => *n == 0,
            Decoder::Chunked(c) => c.state == ChunkState::Done,
            Decoder::Eof => false,
        }
    }

    /// Takes the body bytes that `buf` completes out of it (framing removed); what is left
    /// in `buf` is an incomplete frame, or (once done) bytes past the body's end.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Bytes, FramingError> {
        match self {
            Decoder::Length(remaining) => {
                let n = usize::try_from(*remaining).map_or(buf.len(), |r| r.min(buf.len()));
                *remaining -= n as u64;
                Ok(take_front(buf, n))
            }
            Decoder::Eof => Ok(take_front(buf, buf.len())),
            Decoder::Chunked(chunked) => {
                let (payload, consumed) = chunked.decode_in_place(buf)?;
                let out = take_front(buf, payload);
                buf.advance(consumed - payload);
                Ok(out)
            }
        }
    }
}

fn take_front(buf: &mut BytesMut, n: usize) -> Bytes {
    if n == 0 {
        Bytes::new()
    } else {
        buf.split_to(n).freeze()
    }
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last (zero-size) chunk: trailer lines until a blank one.
    Trailer,
    Done,
}

/// Decodes `Transfer-Encoding: chunked`, resumable at any byte.
#[derive(Debug)]
struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            trailer_bytes: 0,
        }
    }
}

/// Why a chunked body is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FramingError {
    BadSize,
    SizeTooLarge,
    LineTooLong,
    MissingCrlf,
    BareLf,
    TrailersTooLarge,
}

impl std::fmt::Display for FramingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FramingError::BadSize => "malformed chunk-size line",
            FramingError::SizeTooLarge => "chunk size too large",
            FramingError::LineTooLong => "chunk-size line too long",
            FramingError::MissingCrlf => "chunk data not followed by CRLF",
            FramingError::BareLf => "line ended by LF without CR",
            FramingError::TrailersTooLarge => "trailers too large",
        })
    }
}

impl ChunkedDecoder {
    /// Decodes the complete units at the start of `buf`, moving chunk payloads to its front:
    /// returns `(payload, consumed)`, the payload being `buf[..payload]` and the framing the
    /// rest of `buf[..consumed]`. An incomplete size line, CRLF or trailer stays unconsumed;
    /// a partial chunk's data is taken as far as it goes.
    fn decode_in_place(&mut self, buf: &mut [u8]) -> Result<(usize, usize), FramingError> {
        // Invariant: w <= r <= buf.len().
        let (mut r, mut w) = (0usize, 0usize);
        loop {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Size => {
                    let Some((end, next)) = line_at(buf, r, MAX_CHUNK_LINE_BYTES)? else {
                        break;
                    };
                    let size = parse_chunk_size(buf.get(r..end).unwrap_or_default())?;
                    r = next;
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(remaining) => {
                    let available = buf.len() - r;
                    if available == 0 {
                        break;
                    }
                    let n = usize::try_from(remaining).map_or(available, |r| r.min(available));
                    if w != r {
                        // In bounds: r + n <= buf.len() and w < r.
                        buf.copy_within(r..r + n, w);
                    }
                    r += n;
                    w += n;
                    let remaining = remaining - n as u64;
                    if remaining > 0 {
                        self.state = ChunkState::Data(remaining);
                        break;
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => match (buf.get(r), buf.get(r + 1)) {
                    (None, _) | (Some(b'\r'), None) => break,
                    (Some(b'\r'), Some(b'\n')) => {
                        r += 2;
                        self.state = ChunkState::Size;
                    }
                    _ => return Err(FramingError::MissingCrlf),
                },
                ChunkState::Trailer => {
                    let room = MAX_TRAILER_BYTES.saturating_sub(self.trailer_bytes);
                    let Some((end, next)) = line_at(buf, r, room).map_err(|e| match e {
                        FramingError::LineTooLong => FramingError::TrailersTooLarge,
                        other => other,
                    })?
                    else {
                        break;
                    };
                    self.trailer_bytes += next - r;
                    if end == r {
                        self.state = ChunkState::Done;
                    }
                    r = next;
                }
            }
        }
        Ok((w, r))
    }
}

/// The line starting at `from`: `(end of its content, start of the next line)`; `None` if
/// `buf` does not hold all of it yet. Lines end in CRLF (a bare LF is an error, as in hyper,
/// which caught miscounted chunk sizes before this client replaced it); a line whose content
/// exceeds `limit` bytes is an error, whether or not it is complete.
fn line_at(buf: &[u8], from: usize, limit: usize) -> Result<Option<(usize, usize)>, FramingError> {
    let rest = buf.get(from..).unwrap_or_default();
    match memchr::memchr(b'\n', rest) {
        Some(i) => {
            if i == 0 || rest.get(i - 1) != Some(&b'\r') {
                return Err(FramingError::BareLf);
            }
            let end = i - 1;
            if end > limit {
                return Err(FramingError::LineTooLong);
            }
            Ok(Some((from + end, from + i + 1)))
        }
        // The content may still end in a CR that the next read's LF completes.
        None if rest.len() > limit.saturating_add(1) => Err(FramingError::LineTooLong),
        None => Ok(None),
    }
}

/// `HEX [BWS] [; extensions]`: the size.
fn parse_chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    let mut size: u64 = 0;
    let mut digits = 0usize;
    for &b in line {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        if size > (u64::MAX >> 4) {
            return Err(FramingError::SizeTooLarge);
        }
        size = (size << 4) | u64::from(d);
        digits += 1;
    }
    if digits == 0 {
        return Err(FramingError::BadSize);
    }
    let rest = line.get(digits..).unwrap_or_default();
    let rest = match rest.iter().position(|&b| b != b' ' && b != b'\t') {
        Some(i) => rest.get(i..).unwrap_or_default(),
        None => &[],
    };
    match rest.first() {
        None => Ok(size),
        // Extensions are ignored, but may not hide control characters.
        Some(b';') if rest.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)) => Ok(size),
        Some(_) => Err(FramingError::BadSize),
    }
}

// ------------------------------------------------------------------------------- pool

/// A connection and its read buffer (empty whenever the connection is idle).
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    idle_since: Instant,
    /// The serving thread that opened it (whose reactor it is registered with).
    thread: usize,
}

impl Conn {
    /// Whether an idle connection can carry a request: the server has not closed it and has
    /// sent nothing since. Costs no system call unless the socket was reported readable.
    fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// One upstream's idle connections per serving thread, most recently used last.
#[derive(Default)]
struct Pool {
    idle: PerThread<VecDeque<Conn>>,
}

impl Pool {
    /// The most recently used idle connection of this thread that is still usable.
    fn checkout(&self) -> Option<Conn> {
        self.idle.with(serving_thread(), |idle| {
            while let Some(conn) = idle.pop_back() {
                if conn.idle_since.elapsed() >= IDLE_TIMEOUT {
                    // The rest are older still.
                    idle.clear();
                    return None;
                }
                if conn.is_usable() {
                    return Some(conn);
                }
            }
            None
        })
    }

    /// Pools `conn` with its thread's (dropped, so closed, when that set is full); expired
    /// ones are dropped.
    fn checkin(&self, mut conn: Conn) {
        conn.idle_since = Instant::now();
        self.idle.with(conn.thread, |idle| {
            while idle
                .front()
                .is_some_and(|c| c.idle_since.elapsed() >= IDLE_TIMEOUT)
            {
                idle.pop_front();
            }
            if idle.len() < MAX_IDLE {
                idle.push_back(conn);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    // ------------------------------------------------------------------ decoder

    /// Decodes `input` fed in pieces cut at `cuts`; the payload, or the first error.
    fn decode_pieces(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool, usize), FramingError> {
        let mut decoder = Decoder::Chunked(ChunkedDecoder::default());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[from..cut]);
            from = cut;
            let bytes = decoder.decode(&mut buf)?;
            out.extend_from_slice(&bytes);
        }
        Ok((out, decoder.is_done(), buf.len()))
    }

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, bool, usize), FramingError> {
        decode_pieces(input, &[])
    }

    const BODY: &[u8] = b"5\r\nhello\r\n1;name=value\r\n \r\n10\r\n0123456789abcdef\r\n0\r\n\r\n";

    #[test]
    fn decodes_a_chunked_body_split_at_every_byte_position() {
        let expected = b"hello 0123456789abcdef".to_vec();
        assert_eq!(decode_all(BODY).unwrap(), (expected.clone(), true, 0));
        for cut in 0..=BODY.len() {
            assert_eq!(
                decode_pieces(BODY, &[cut]).unwrap(),
                (expected.clone(), true, 0),
                "cut at {cut}"
            );
        }
        for a in 0..=BODY.len() {
            for b in a..=BODY.len() {
                assert_eq!(
                    decode_pieces(BODY, &[a, b]).unwrap(),
                    (expected.clone(), true, 0),
                    "cuts at {a}, {b}"
                );
            }
        }
        // One byte at a time.
        let every: Vec<usize> = (1..BODY.len()).collect();
        assert_eq!(decode_pieces(BODY, &every).unwrap(), (expected, true, 0));
    }

    #[test]
    fn a_burst_of_chunks_is_one_piece_of_payload() {
        let mut decoder = Decoder::Chunked(ChunkedDecoder::default());
        let mut buf = BytesMut::from(&b"3\r\nab\n\r\n3\r\ncd\n\r\n3\r\nef"[..]);
        let out = decoder.decode(&mut buf).unwrap();
        assert_eq!(&out[..], b"ab\ncd\nef");
        assert!(buf.is_empty());
        buf.extend_from_slice(b"\n\r\n0\r\n\r\n");
        assert_eq!(&decoder.decode(&mut buf).unwrap()[..], b"\n");
        assert!(decoder.is_done());
    }

    #[test]
    fn extensions_whitespace_leading_zeros_and_uppercase_hex_are_accepted() {
        let (out, done, _) = decode_all(b"A ; ext=\"q\" ;x\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!((out.as_slice(), done), (&b"0123456789"[..], true));
        let (out, done, _) = decode_all(b"000002\r\nab\r\n0000\r\n\r\n").unwrap();
        assert_eq!((out.as_slice(), done), (&b"ab"[..], true));
    }

    #[test]
    fn trailers_are_skipped() {
        let input = b"2\r\nok\r\n0\r\nx-checksum: abc\r\nx-other: 1\r\n\r\n";
        for cut in 0..=input.len() {
            assert_eq!(
                decode_pieces(input, &[cut]).unwrap(),
                (b"ok".to_vec(), true, 0),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bytes_past_the_end_are_left_in_the_buffer() {
        assert_eq!(
            decode_all(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1").unwrap(),
            (b"ok".to_vec(), true, 8)
        );
    }

    #[test]
    fn malformed_framing_is_an_error() {
        assert_eq!(decode_all(b"zz\r\n").unwrap_err(), FramingError::BadSize);
        assert_eq!(decode_all(b"\r\n").unwrap_err(), FramingError::BadSize);
        assert_eq!(decode_all(b"-1\r\n").unwrap_err(), FramingError::BadSize);
        assert_eq!(decode_all(b"5x\r\n").unwrap_err(), FramingError::BadSize);
        assert_eq!(decode_all(b"5\r\r\n").unwrap_err(), FramingError::BadSize);
        assert_eq!(
            decode_all(b"5;\x01\r\n").unwrap_err(),
            FramingError::BadSize
        );
        assert_eq!(
            decode_all(b"1ffffffffffffffff\r\n").unwrap_err(),
            FramingError::SizeTooLarge
        );
        // The largest size that fits is fine (its data is streamed as it comes).
        assert!(decode_all(b"ffffffffffffffff\r\nabc").is_ok());
        assert_eq!(
            decode_all(b"3\r\nabcX\r\n").unwrap_err(),
            FramingError::MissingCrlf
        );
        assert_eq!(
            decode_all(b"3\r\nabc\rX").unwrap_err(),
            FramingError::MissingCrlf
        );
        // A miscounted size: the payload's own LF is not the chunk's CRLF.
        assert_eq!(
            decode_all(b"3\r\nab\n\n\r\n").unwrap_err(),
            FramingError::MissingCrlf
        );
        // Lines end in CRLF.
        assert_eq!(decode_all(b"3\nabc").unwrap_err(), FramingError::BareLf);
        assert_eq!(
            decode_all(b"3\r\nabc\n0\r\n\r\n").unwrap_err(),
            FramingError::MissingCrlf
        );
        assert_eq!(
            decode_all(b"0\r\nx-t: 1\n\r\n").unwrap_err(),
            FramingError::BareLf
        );
    }

    #[test]
    fn oversized_lines_are_errors_even_before_they_end() {
        let mut line = b"1;".to_vec();
        line.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE_BYTES));
        assert_eq!(decode_all(&line).unwrap_err(), FramingError::LineTooLong);
        line.extend_from_slice(b"\r\n");
        assert_eq!(decode_all(&line).unwrap_err(), FramingError::LineTooLong);
        // Just under the limit is fine.
        let mut ok = b"1;".to_vec();
        ok.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE_BYTES - 2));
        ok.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        assert_eq!(decode_all(&ok).unwrap(), (b"a".to_vec(), true, 0));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..(MAX_TRAILER_BYTES / 16 + 1) {
            trailers.extend_from_slice(b"x-pad: 01234567\r\n");
        }
        assert_eq!(
            decode_all(&trailers).unwrap_err(),
            FramingError::TrailersTooLarge
        );
    }

    #[test]
    fn content_length_bodies_stop_at_their_length() {
        let mut decoder = Decoder::Length(5);
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(&decoder.decode(&mut buf).unwrap()[..], b"hel");
        assert!(!decoder.is_done());
        buf.extend_from_slice(b"lo extra");
        assert_eq!(&decoder.decode(&mut buf).unwrap()[..], b"lo");
        assert!(decoder.is_done());
        assert_eq!(&buf[..], b" extra");
    }

    #[test]
    fn response_heads_set_the_framing() {
        let head = |raw: &[u8]| parse_head(raw).unwrap().unwrap().1.unwrap();
        let h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n");
        assert!(matches!(h.decoder, Decoder::Chunked(_)) && h.keep_alive);
        assert_eq!(h.headers["x-a"], "b");
        let h = head(b"HTTP/1.1 429 Too Many\r\ncontent-length: 7\r\nretry-after: 1\r\n\r\n");
        assert!(matches!(h.decoder, Decoder::Length(7)) && h.keep_alive);
        assert_eq!(h.status, 429);
        let h =
            head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\ncontent-length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(h.decoder, Decoder::Eof) && !h.keep_alive);
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
        );
        assert!(matches!(h.decoder, Decoder::Chunked(_)) && !h.keep_alive);
        let h = head(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert!(matches!(h.decoder, Decoder::Length(0)) && h.keep_alive);
        // Interim responses are skipped by the caller.
        assert!(parse_head(b"HTTP/1.1 100 Continue\r\n\r\n")
            .unwrap()
            .unwrap()
            .1
            .is_none());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le")
            .unwrap()
            .is_none());
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad), Err(GatewayError::UpstreamProtocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n").is_ok());
    }

    #[test]
    fn base_urls_are_split_into_address_host_and_path() {
        let c = Http1Client::for_base_url("http://127.0.0.1:8000/v1", Duration::ZERO).unwrap();
        assert_eq!(
            (c.connect_to.as_str(), c.host.as_str(), c.base_path.as_str()),
            ("127.0.0.1:8000", "127.0.0.1:8000", "/v1")
        );
        let c = Http1Client::for_base_url("HTTP://vllm.local", Duration::ZERO).unwrap();
        assert_eq!(
            (c.connect_to.as_str(), c.base_path.as_str()),
            ("vllm.local:80", "")
        );
        let c = Http1Client::for_base_url("http://[::1]/x/", Duration::ZERO).unwrap();
        assert_eq!(
            (c.connect_to.as_str(), c.base_path.as_str()),
            ("[::1]:80", "/x")
        );
        let c = Http1Client::for_base_url("http://[::1]:9/", Duration::ZERO).unwrap();
        assert_eq!(c.connect_to, "[::1]:9");
        for other in [
            "https://api.openai.com/v1",
            "http://user:pw@host/v1",
            "http://host/v1?x=1",
            "http://",
            "http://host/a b",
            "ftp://host",
        ] {
            assert!(
                Http1Client::for_base_url(other, Duration::ZERO).is_none(),
                "{other}"
            );
        }
    }

    #[test]
    fn header_values_cannot_inject_lines() {
        let c = Http1Client::for_base_url("http://h:1/v1", Duration::ZERO).unwrap();
        let head = c
            .request_head("/chat", &[("authorization", "Bearer k")], 12)
            .unwrap();
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /v1/chat HTTP/1.1\r\nhost: h:1\r\ncontent-length: 12\r\nauthorization: Bearer k\r\n\r\n"
        );
        assert!(c
            .request_head("/chat", &[("x-api-key", "k\r\nx-evil: 1")], 0)
            .is_err());
        assert!(c.request_head("/chat", &[("bad name", "v")], 0).is_err());
    }

    // ------------------------------------------------------------------ against a socket

    /// A tiny upstream: for each accepted connection, runs `script(connection index)`'s
    /// steps: read one request, then write the given bytes (or close).
    #[derive(Clone)]
    enum Act {
        /// Read one request (head + content-length body).
        Read,
        Write(&'static [u8]),
        /// Pause.
        Sleep(u64),
        Close,
    }

    struct Server {
        addr: std::net::SocketAddr,
        accepted: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
        /// Connections that saw the client close after their script ran.
        closed_by_client: Arc<AtomicUsize>,
    }

    async fn server(script: impl Fn(usize) -> Vec<Act> + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let closed_by_client = Arc::new(AtomicUsize::new(0));
        let (acc, req, closed) = (accepted.clone(), requests.clone(), closed_by_client.clone());
        let script = Arc::new(script);
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let n = acc.fetch_add(1, Ordering::SeqCst);
                let acts = script(n);
                let (req, closed) = (req.clone(), closed.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for act in acts {
                        match act {
                            Act::Read => {
                                if read_request(&mut stream, &mut buf).await.is_none() {
                                    return;
                                }
                                req.fetch_add(1, Ordering::SeqCst);
                            }
                            Act::Write(bytes) => {
                                if stream.write_all(bytes).await.is_err() {
                                    return;
                                }
                            }
                            Act::Sleep(ms) => {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            Act::Close => return,
                        }
                    }
                    // Then wait for the client to close.
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Server {
            addr,
            accepted,
            requests,
            closed_by_client,
        }
    }

    /// Reads one request with a content-length body out of `stream` (`buf` keeps leftovers).
    async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    buf.drain(..end + 4 + len);
                    return Some(());
                }
            }
            let mut tmp = [0u8; 4096];
            let n = stream.read(&mut tmp).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&tmp[..n]);
        }
    }

    fn client(server: &Server) -> Http1Client {
        Http1Client::for_base_url(
            &format!("http://{}/v1", server.addr),
            Duration::from_secs(2),
        )
        .unwrap()
    }

    async fn body_of(response: Http1Response) -> Result<Vec<u8>, GatewayError> {
        let mut body = response.body;
        let mut out = Vec::new();
        while let Some(piece) = body.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out)
    }

    const CHUNKED_OK: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    const LENGTH_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_pooled_on_one_thread_is_reused_from_another() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(CHUNKED_OK),
                Act::Read,
                Act::Write(CHUNKED_OK),
            ]
        })
        .await;
        let c = Arc::new(client(&s));
        let body = Bytes::from_static(b"{}");
        let r = c.post("/chat", &[], &body).await.unwrap();
        // The body ends (and its connection is pooled) on a thread of its own.
        let rt = tokio::runtime::Handle::current();
        let ended = std::thread::spawn(move || rt.block_on(body_of(r)));
        assert_eq!(ended.join().unwrap().unwrap(), b"abcde");
        assert_eq!(c.idle_connections(), 1);
        let r = c.post("/chat", &[], &body).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"abcde");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_are_reused_after_clean_bodies() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(CHUNKED_OK),
                Act::Read,
                Act::Write(LENGTH_OK),
                Act::Read,
                Act::Write(CHUNKED_OK),
            ]
        })
        .await;
        let c = client(&s);
        let body = Bytes::from_static(b"{}");
        let r = c.post("/chat", &[], &body).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(body_of(r).await.unwrap(), b"abcde");
        assert_eq!(c.idle_connections(), 1);
        let r = c.post("/chat", &[], &body).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"hello");
        let r = c.post("/chat", &[], &body).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"abcde");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(s.requests.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_early_closes_its_connection_at_once() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"),
            ]
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        let mut body = r.body;
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"abc");
        drop(body);
        assert_eq!(c.idle_connections(), 0);
        for _ in 0..100 {
            if s.closed_by_client.load(Ordering::SeqCst) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the upstream never saw the connection close");
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_discarded() {
        // The first connection serves one response, then the server closes it.
        let s = server(|n| {
            if n == 0 {
                vec![Act::Read, Act::Write(LENGTH_OK), Act::Sleep(50), Act::Close]
            } else {
                vec![Act::Read, Act::Write(CHUNKED_OK)]
            }
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"hello");
        assert_eq!(c.idle_connections(), 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"abcde");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(s.requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_with_unread_bytes_is_discarded() {
        let s = server(|n| {
            if n == 0 {
                vec![
                    Act::Read,
                    Act::Write(LENGTH_OK),
                    Act::Sleep(30),
                    Act::Write(b"junk"),
                ]
            } else {
                vec![Act::Read, Act::Write(CHUNKED_OK)]
            }
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"hello");
        assert_eq!(c.idle_connections(), 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"abcde");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn bytes_after_the_body_keep_the_connection_out_of_the_pool() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"),
            ]
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"ok");
        assert_eq!(c.idle_connections(), 0);
    }

    #[tokio::test]
    async fn connection_close_responses_are_not_pooled() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"),
            ]
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"ok");
        assert_eq!(c.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_pooled_connection_that_dies_as_the_request_goes_out_is_retried() {
        // The server reads the second request and closes without a byte: the keep-alive race.
        let s = server(|n| {
            if n == 0 {
                vec![Act::Read, Act::Write(LENGTH_OK), Act::Read, Act::Close]
            } else {
                vec![Act::Read, Act::Write(CHUNKED_OK)]
            }
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"hello");
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"abcde");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(s.requests.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_fresh_connection_that_dies_is_not_retried() {
        let s = server(|_| vec![Act::Read, Act::Close]).await;
        let c = client(&s);
        let e = c.post("/chat", &[], &Bytes::new()).await.err().unwrap();
        assert!(matches!(e, GatewayError::UpstreamUnavailable(_)), "{e:?}");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_that_fails_after_response_bytes_is_not_retried() {
        let s = server(|n| {
            if n == 0 {
                vec![
                    Act::Read,
                    Act::Write(LENGTH_OK),
                    Act::Read,
                    Act::Write(b"HTTP/1.1 200"),
                    Act::Close,
                ]
            } else {
                vec![Act::Read, Act::Write(CHUNKED_OK)]
            }
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"hello");
        let e = c.post("/chat", &[], &Bytes::new()).await.err().unwrap();
        assert!(matches!(e, GatewayError::UpstreamUnavailable(_)), "{e:?}");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn chunks_that_arrive_apart_are_each_yielded_as_they_come() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"),
                Act::Sleep(20),
                Act::Write(b"2\r\nde\r\n"),
                Act::Sleep(20),
                Act::Write(b"1\r\nf\r\n0\r\n\r\n"),
                Act::Sleep(20),
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\n\r\nuntil"),
                Act::Sleep(20),
                Act::Write(b" closed"),
                Act::Close,
            ]
        })
        .await;
        let c = client(&s);
        let mut body = c.post("/chat", &[], &Bytes::new()).await.unwrap().body;
        let mut pieces = Vec::new();
        while let Some(piece) = body.next().await {
            pieces.push(piece.unwrap());
        }
        assert_eq!(pieces, [&b"abc"[..], b"de", b"f"]);
        assert_eq!(c.idle_connections(), 1);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"until closed");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn eof_in_the_middle_of_a_body_is_an_error_and_not_pooled() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab"),
                Act::Close,
            ]
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        let e = body_of(r).await.unwrap_err();
        assert!(
            matches!(&e, GatewayError::UpstreamUnavailable(m) if m.contains("mid-response")),
            "{e:?}"
        );
        assert_eq!(c.idle_connections(), 0);

        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"),
                Act::Close,
            ]
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert!(body_of(r).await.is_err());
    }

    #[tokio::test]
    async fn bodies_without_length_end_at_eof_and_close() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\n\r\nuntil"),
                Act::Write(b" the end"),
                Act::Close,
            ]
        })
        .await;
        let c = client(&s);
        let r = c.post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"until the end");
        assert_eq!(c.idle_connections(), 0);
    }

    #[tokio::test]
    async fn malformed_bodies_and_heads_are_protocol_errors() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n"),
            ]
        })
        .await;
        let r = client(&s).post("/chat", &[], &Bytes::new()).await.unwrap();
        assert!(matches!(
            body_of(r).await,
            Err(GatewayError::UpstreamProtocol(_))
        ));
        let s = server(|_| vec![Act::Read, Act::Write(b"NOT HTTP AT ALL\r\n\r\n")]).await;
        let e = client(&s).post("/chat", &[], &Bytes::new()).await.err();
        assert!(
            matches!(e, Some(GatewayError::UpstreamProtocol(_))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_split_heads_are_joined() {
        let s = server(|_| {
            vec![
                Act::Read,
                Act::Write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 20"),
                Act::Sleep(20),
                Act::Write(b"0 OK\r\ncontent-length: 2\r\n\r\nok"),
            ]
        })
        .await;
        let r = client(&s).post("/chat", &[], &Bytes::new()).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(body_of(r).await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn oversized_heads_are_refused() {
        static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let big = BIG.get_or_init(|| {
            let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
            while v.len() <= MAX_HEAD_BYTES {
                v.extend_from_slice(b"x-pad: 0123456789012345678901234567890123456789\r\n");
            }
            v
        });
        let s = server(|_| vec![Act::Read, Act::Write(big.as_slice())]).await;
        let e = client(&s).post("/chat", &[], &Bytes::new()).await.err();
        assert!(
            matches!(e, Some(GatewayError::UpstreamProtocol(_))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn connection_refused_is_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c =
            Http1Client::for_base_url(&format!("http://{addr}"), Duration::from_secs(1)).unwrap();
        let e = c.post("/x", &[], &Bytes::new()).await.err();
        assert!(
            matches!(e, Some(GatewayError::UpstreamUnavailable(_))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn the_request_goes_out_as_written() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            while !buf.ends_with(b"{\"a\":1}") {
                let n = stream.read(&mut tmp).await.unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&tmp[..n]);
            }
            stream.write_all(LENGTH_OK).await.unwrap();
            String::from_utf8(buf).unwrap()
        });
        let c =
            Http1Client::for_base_url(&format!("http://{addr}"), Duration::from_secs(1)).unwrap();
        let r = c
            .post(
                "/v1/messages",
                &[("content-type", "application/json"), ("x-api-key", "k")],
                &Bytes::from_static(b"{\"a\":1}"),
            )
            .await
            .unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"hello");
        assert_eq!(
            received.await.unwrap(),
            format!(
                "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 7\r\n\
                 content-type: application/json\r\nx-api-key: k\r\n\r\n{{\"a\":1}}"
            )
        );
    }
}
