//! How many client connections may be open: the process's file-descriptor limit, the caps
//! derived from it, and what a connection over a cap gets.
//!
//! Every accepted connection takes a [`Slot`] before it is served, and holds it inside its
//! I/O object, so that the slot is freed exactly when the socket is closed (an upgraded
//! WebSocket keeps it). There are two caps: the number of open connections in total and the
//! number per client address (an IPv6 client counts by its /64, which one host usually
//! owns). A connection over a cap is refused at accept: it gets a fixed HTTP/1.1 503 with an
//! OpenAI-shaped error body and `Connection: close` if the socket takes it at once, then it is
//! closed; the refusal is counted (`tollgate_server_connections_refused_total`) and logged at
//! most once per [`LOG_EVERY`].

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// File descriptors kept for everything but client connections (the store's pool, the event
/// log, Kafka and Redis connections, TLS roots, the metrics listener...).
const RESERVED_FDS: u64 = 256;
/// Fewest connections a derived cap allows, however low the descriptor limit.
const MIN_DERIVED_CONNECTIONS: usize = 16;
/// How often a refusal (or an accept error) is logged at most; the metrics count them all.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The process's open-files limit at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit found at start-up (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
}

/// Raises the soft open-files limit to the hard limit, so that the process can hold as many
/// connections as the operator allowed it; on failure the limit stays as it was.
pub fn raise_fd_limit() -> FdLimit {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!("cannot raise the open files limit to its hard limit: {e}");
        }
    }
    FdLimit {
        before,
        now: getrlimit(Resource::Nofile).current,
    }
}

/// The current soft open-files limit (`None`: unlimited).
pub fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// The connection cap that `fd_limit` allows: each client connection may come with an
/// upstream connection while it streams, so half of what is left after [`RESERVED_FDS`].
pub fn derived_max_connections(fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else {
        return usize::MAX;
    };
    let usable = limit.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(usable)
        .unwrap_or(usize::MAX)
        .max(MIN_DERIVED_CONNECTIONS)
}

/// The caps on open client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections in total.
    pub max: usize,
    /// Open connections per client address; 0: no such cap.
    pub per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: usize::MAX,
            per_address: 0,
        }
    }
}

/// Why a connection was refused; the label of the refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `server.max_connections`.
    Total,
    /// `server.max_connections_per_ip`.
    PerAddress,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerAddress => "max_connections_per_ip",
        }
    }
}

/// Counts open connections, in total and per client address.
#[derive(Debug)]
pub struct Tracker {
    limits: ConnectionLimits,
    open: AtomicUsize,
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

impl Tracker {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Tracker {
            limits,
            open: AtomicUsize::new(0),
            by_address: Mutex::new(HashMap::new()),
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot for a connection from `peer`, or why there is none.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refusal> {
        if self.open.load(Ordering::Relaxed) >= self.limits.max {
            return Err(Refusal::Total);
        }
        let address = if self.limits.per_address > 0 {
            let address = client_address(peer);
            let mut by_address = self.by_address.lock();
            let count = by_address.entry(address).or_insert(0);
            if *count >= self.limits.per_address {
                return Err(Refusal::PerAddress);
            }
            *count += 1;
            Some(address)
        } else {
            None
        };
        // One acceptor admits: the total cannot overshoot between the check and this.
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            tracker: self.clone(),
            address,
        })
    }
}

/// The address a client's connections count against: IPv4 as it is (also when mapped into
/// IPv6), IPv6 by its /64.
fn client_address(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// One open connection's place under the caps; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    tracker: Arc<Tracker>,
    address: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tracker.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(address) = self.address {
            let mut by_address = self.tracker.by_address.lock();
            if let Some(count) = by_address.get_mut(&address) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    by_address.remove(&address);
                }
            }
        }
    }
}

/// A connection's I/O holding its [`Slot`]: the place is freed when the socket is closed,
/// also when an upgrade (a WebSocket) took the socket out of its HTTP connection.
pub struct Holding<T> {
    pub io: T,
    pub slot: Slot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Holding<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Holding<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What a refused connection is sent, if its socket takes it at once.
const REFUSAL_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
connection: close\r\n\
retry-after: 1\r\n\
content-length: 128\r\n\
\r\n\
{\"error\":{\"message\":\"Too many open connections; retry later.\",\"type\":\"server_error\",\"param\":null,\"code\":\"too_many_connections\"}}";

/// Sends a refused connection the 503 (without waiting: a socket that cannot take it at once
/// gets nothing) and closes it. What the client already sent is read first, so that closing
/// does not reset the connection before the answer reaches it.
pub fn refuse(stream: std::net::TcpStream) {
    let _ = stream.set_nonblocking(true);
    let mut discard = [0u8; 4096];
    for _ in 0..4 {
        match io::Read::read(&mut &stream, &mut discard) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = (&stream).write(REFUSAL_RESPONSE);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// A log line that is written at most once per [`LOG_EVERY`], saying how many times it
/// happened meanwhile.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// Counts one occurrence; returns how many occurred since the last line when a line is
    /// due now.
    pub fn due(&mut self) -> Option<u64> {
        self.suppressed = self.suppressed.saturating_add(1);
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_derived_cap_leaves_room_for_upstreams_and_files() {
        assert_eq!(derived_max_connections(Some(1024)), 384);
        assert_eq!(derived_max_connections(Some(100)), MIN_DERIVED_CONNECTIONS);
        assert_eq!(derived_max_connections(Some(1_048_576)), 524_160);
        assert_eq!(derived_max_connections(None), usize::MAX);
    }

    #[test]
    fn the_refusal_is_a_complete_response() {
        let text = std::str::from_utf8(REFUSAL_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }

    #[test]
    fn caps_count_in_total_and_per_address_and_slots_free_their_place() {
        let tracker = Tracker::new(ConnectionLimits {
            max: 3,
            per_address: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = tracker.admit(a).unwrap();
        let _a2 = tracker.admit(a).unwrap();
        assert_eq!(tracker.admit(a).unwrap_err(), Refusal::PerAddress);
        let _b1 = tracker.admit(b).unwrap();
        assert_eq!(tracker.admit(b).unwrap_err(), Refusal::Total);
        assert_eq!(tracker.open(), 3);
        drop(a1);
        assert_eq!(tracker.open(), 2);
        let _a3 = tracker.admit(a).unwrap();
        assert_eq!(tracker.admit(a).unwrap_err(), Refusal::Total);
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let tracker = Tracker::new(ConnectionLimits {
            max: 100,
            per_address: 1,
        });
        let _one = tracker.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert_eq!(
            tracker
                .admit("2001:db8:1:2:ffff::9".parse().unwrap())
                .unwrap_err(),
            Refusal::PerAddress
        );
        assert!(tracker.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
        let _v4 = tracker.admit("192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(
            tracker
                .admit("::ffff:192.0.2.7".parse().unwrap())
                .unwrap_err(),
            Refusal::PerAddress
        );
    }

    #[test]
    fn a_rate_limited_log_says_how_many_it_left_out() {
        let mut log = RateLimitedLog::default();
        assert_eq!(log.due(), Some(1));
        assert_eq!(log.due(), None);
        assert_eq!(log.due(), None);
        log.last = Instant::now().checked_sub(LOG_EVERY);
        assert_eq!(log.due(), Some(3));
    }
}
