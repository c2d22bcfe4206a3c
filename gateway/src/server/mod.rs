//! The HTTP server's threads: one acceptor and one serving thread per core.
//!
//! The acceptor (on the main runtime) hands every accepted connection to the serving thread
//! with the fewest open connections. Each serving thread runs its own single-threaded tokio
//! runtime, so a request, its upstream call and its stream stay on one thread from start to
//! end: no task moves between threads, no worker wakes another, and the upstream connection
//! pool keeps one set of idle connections per thread ([`serving_thread`]). Work that can take
//! milliseconds of CPU (tokenizing a large prompt) goes to the blocking pool instead of
//! stalling the other streams of its thread.
//!
//! A serving thread may also busy-poll ([`busy_poll`], `server.busy_poll_us`): after it has
//! handled something it keeps polling its sockets for that long before it sleeps, so that an
//! answer arriving soon after (an upstream's first bytes, a client's next request) does not
//! pay a thread wake-up, which costs tens of microseconds in a virtual machine.
//!
//! Every connection is bounded in time from accept on ([`serve_connection`]):
//! - it must send its first byte within `first_byte_timeout`;
//! - its first request's head must then be complete within `header_read_timeout`, whatever
//!   the protocol (an HTTP/2 preface and SETTINGS alone do not keep it open), as must every
//!   later HTTP/1.1 head (hyper's own header timer);
//! - it is closed once it has had no request in progress for `idle_timeout` (HTTP/2: with a
//!   GOAWAY; HTTP/1.1 keep-alive connections between requests);
//! - each request's body must arrive within `body_read_timeout` of its head
//!   ([`requests::DeadlineBody`]).
//!
//! And in number ([`connections`]): connections over the total cap or the per-address cap are
//! refused at accept with a 503. An `accept` that fails (out of file descriptors) is retried
//! after a short, growing pause, never in a busy loop, and logged at most every 10 s.
//!
//! Shutdown: the acceptor stops accepting, every serving thread asks its connections to close
//! once their in-flight requests are answered (cutting those still busy after
//! `shutdown_grace`), and [`serve`] returns when all of them have.
//! The serving threads' runtimes keep running until the returned [`Stopped`] is dropped:
//! connections a serving thread opened for shared components (a store's pool) are driven by
//! its runtime, and the caller's own shutdown work may still use them.

pub mod busy_poll;
pub mod connections;
pub mod requests;
pub mod tls;

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::ServerMetrics;
use connections::{ConnectionLimits, Holding, RateLimitedLog, Slot, Tracker};
use requests::{Activity, ConnectionService};

/// Longest pause between failed `accept` calls (out of file descriptors and the like).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// How long a connection closed for idleness may take to finish closing before it is cut.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How the server runs.
#[derive(Clone)]
pub struct ServeOptions {
    /// Serving threads; 0 means one per available core.
    pub threads: usize,
    /// How long a serving thread keeps polling after it handled something; zero: never.
    pub busy_poll: Duration,
    /// Where to count connections and busy polling per thread.
    pub metrics: Option<ServerMetrics>,
    /// How long a client may take to send a request's headers, or leave a keep-alive
    /// connection without a request, before it is closed; `None`: no limit.
    pub header_read_timeout: Option<Duration>,
    /// How long shutdown waits for in-flight requests before it closes their connections;
    /// `None`: until they end.
    pub shutdown_grace: Option<Duration>,
    /// How long a new connection may take to send its first byte; `None`: no limit.
    pub first_byte_timeout: Option<Duration>,
    /// How long a connection may have no request in progress before it is closed; `None`: no
    /// limit (HTTP/1.1 keep-alive connections are still bounded by `header_read_timeout`).
    pub idle_timeout: Option<Duration>,
    /// How long a request's body may take to arrive, from its head; `None`: no limit.
    pub body_read_timeout: Option<Duration>,
    /// Caps on open connections.
    pub connection_limits: ConnectionLimits,
    /// TLS on the listener ([`tls`]); `None`: plain HTTP.
    pub tls: Option<Arc<tls::ServerTls>>,
}

impl Default for ServeOptions {
    /// One thread per core, no busy polling, no metrics, no limits.
    fn default() -> Self {
        ServeOptions {
            threads: 0,
            busy_poll: Duration::ZERO,
            metrics: None,
            header_read_timeout: None,
            shutdown_grace: None,
            first_byte_timeout: None,
            idle_timeout: None,
            body_read_timeout: None,
            connection_limits: ConnectionLimits::default(),
            tls: None,
        }
    }
}

/// Where a serving thread's connections are in the shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Serving,
    /// Finish in-flight requests, then close.
    Closing,
    /// Close now (the grace period is over).
    Abort,
}

thread_local! {
    /// 1-based index of the serving thread this is, 0 on any other thread.
    static SERVING_THREAD: Cell<usize> = const { Cell::new(0) };
}

/// Which serving thread runs the caller: 1, 2, ... on serving threads, 0 elsewhere. Used to
/// keep per-thread state (the upstream connection pools) on the thread whose runtime owns it.
pub fn serving_thread() -> usize {
    SERVING_THREAD.try_with(Cell::get).unwrap_or(0)
}

/// State kept per serving thread behind one lock (slot 0: every other thread), such as idle
/// connections, which belong to the runtime (reactor) of the thread that opened them.
pub struct PerThread<T> {
    slots: parking_lot::Mutex<Vec<T>>,
}

impl<T: Default> Default for PerThread<T> {
    fn default() -> Self {
        PerThread {
            slots: parking_lot::Mutex::new(Vec::new()),
        }
    }
}

impl<T: Default> PerThread<T> {
    /// Runs `f` on the slot of serving thread `thread` (see [`serving_thread`]).
    pub fn with<R>(&self, thread: usize, f: impl FnOnce(&mut T) -> R) -> R {
        let mut slots = self.slots.lock();
        if slots.len() <= thread {
            slots.resize_with(thread + 1, T::default);
        }
        let mut spare = T::default();
        f(slots.get_mut(thread).unwrap_or(&mut spare))
    }

    /// Sums `f` over every thread's slot.
    pub fn sum(&self, f: impl Fn(&T) -> usize) -> usize {
        self.slots.lock().iter().map(f).sum()
    }
}

/// One serving thread as the acceptor sees it.
struct Worker {
    connections: mpsc::UnboundedSender<Accepted>,
    /// Connections handed to it and not yet closed.
    open: Arc<AtomicUsize>,
    /// Resolves when the thread has finished (all its connections closed).
    done: oneshot::Receiver<()>,
}

/// The serving threads after [`serve`] returned, idle but still running their runtimes;
/// dropping this ends them.
#[must_use = "dropping it ends the serving threads' runtimes"]
pub struct Stopped {
    _release: watch::Sender<()>,
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits until every in-flight
/// request has been answered. Dropping the returned future stops the serving threads too.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<Stopped> {
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // Dropping `stop` (on return or when this future is dropped) stops every thread serving;
    // dropping `release` ends their runtimes.
    let (stop, stopped) = watch::channel(());
    let (release, released) = watch::channel(());
    let mut workers = Vec::with_capacity(threads);
    for index in 1..=threads {
        workers.push(start_worker(
            index,
            app.clone(),
            &options,
            stopped.clone(),
            released.clone(),
        )?);
    }
    drop((stopped, released));
    // Certificate reloads, for as long as the listener runs.
    let reloads = options.tls.as_ref().and_then(tls::ServerTls::watch);

    let tracker = Tracker::new(options.connection_limits);
    let mut refusals_log = RateLimitedLog::default();
    let mut accept_errors_log = RateLimitedLog::default();
    let mut backoff = Duration::ZERO;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::ZERO;
                accepted
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: the pending connection stays in the
                // backlog and the next accept fails at once; pause (10 ms, doubling to 1 s)
                // rather than spin, and keep serving the open connections meanwhile.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                if let Some(m) = &options.metrics {
                    m.accept_errors.inc();
                }
                if let Some(times) = accept_errors_log.due() {
                    tracing::error!(
                        "accept failed ({times} times since the last report): {e}; {} connections open",
                        tracker.open()
                    );
                }
                let pause = tokio::time::sleep(backoff);
                tokio::select! {
                    () = &mut shutdown => break,
                    () = pause => continue,
                }
            }
        };
        let slot = match tracker.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                if let Some(m) = &options.metrics {
                    m.refused.with_label_values(&[refusal.label()]).inc();
                }
                if let Some(times) = refusals_log.due() {
                    tracing::warn!(
                        "refused {times} connections since the last report ({}: latest from {}); {} open",
                        refusal.label(),
                        peer.ip(),
                        tracker.open()
                    );
                }
                match stream.into_std() {
                    Ok(stream) => connections::refuse(stream),
                    Err(e) => tracing::debug!("cannot refuse a connection cleanly: {e}"),
                }
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            // Without it every streamed chunk can wait ~40 ms on Nagle and delayed ACKs.
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
        let Some(worker) = workers
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
        else {
            break;
        };
        match stream.into_std() {
            Ok(stream) => {
                worker.open.fetch_add(1, Ordering::Relaxed);
                if worker.connections.send((stream, slot, peer)).is_err() {
                    worker.open.fetch_sub(1, Ordering::Relaxed);
                    tracing::error!("a serving thread has stopped");
                }
            }
            Err(e) => tracing::warn!("cannot hand over a connection: {e}"),
        }
    }
    drop(listener);
    if let Some(reloads) = reloads {
        reloads.abort();
    }
    drop(stop);
    for worker in workers {
        drop(worker.connections);
        let _ = worker.done.await;
    }
    Ok(Stopped { _release: release })
}

/// Errors that concern one connection only (the next accept is fine).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// What a serving thread counts.
#[derive(Clone)]
struct ThreadMetrics {
    connections: prometheus::IntGauge,
    accepted: prometheus::IntCounter,
    busy_poll: prometheus::Counter,
    timed_out: prometheus::IntCounterVec,
}

/// Why a connection was closed for lack of progress: the label of
/// `tollgate_server_connections_timed_out_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimedOut {
    /// Nothing within `first_byte_timeout`.
    FirstByte,
    /// No complete first request within `header_read_timeout` of the first byte.
    FirstRequest,
    /// An HTTP/1.1 head not complete within `header_read_timeout` (hyper's timer).
    HeaderRead,
    /// No request in progress for `idle_timeout`.
    Idle,
    /// The TLS handshake not complete within `header_read_timeout` of the first byte.
    TlsHandshake,
}

impl TimedOut {
    fn label(self) -> &'static str {
        match self {
            TimedOut::FirstByte => "first_byte",
            TimedOut::FirstRequest => "first_request",
            TimedOut::HeaderRead => "header_read",
            TimedOut::Idle => "idle",
            TimedOut::TlsHandshake => "tls_handshake",
        }
    }
}

/// The time limits of a connection.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    first_byte: Option<Duration>,
    header_read: Option<Duration>,
    idle: Option<Duration>,
    body_read: Option<Duration>,
}

fn start_worker(
    index: usize,
    app: Router,
    options: &ServeOptions,
    stopped: watch::Receiver<()>,
    mut released: watch::Receiver<()>,
) -> io::Result<Worker> {
    let (busy_poll, header_read_timeout, grace) = (
        options.busy_poll,
        options.header_read_timeout,
        options.shutdown_grace,
    );
    let deadlines = Deadlines {
        first_byte: options.first_byte_timeout,
        header_read: options.header_read_timeout,
        idle: options.idle_timeout,
        body_read: options.body_read_timeout,
    };
    let tls = options.tls.clone();
    let label = index.to_string();
    let metrics = options.metrics.as_ref().map(|m| ThreadMetrics {
        connections: m.connections.with_label_values(&[&label]),
        accepted: m.accepted.with_label_values(&[&label]),
        busy_poll: m.busy_poll.with_label_values(&[&label]),
        timed_out: m.timed_out.clone(),
    });
    let (connections, incoming) = mpsc::unbounded_channel();
    let open = Arc::new(AtomicUsize::new(0));
    let (done_tx, done) = oneshot::channel();
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if !busy_poll.is_zero() {
        // A thread woken from sleep has something to handle: that starts a polling window.
        builder.on_thread_unpark(busy_poll::activity);
    }
    let runtime = builder.build()?;
    let thread_open = open.clone();
    std::thread::Builder::new()
        .name(format!("tollgate-serve-{index}"))
        .spawn(move || {
            SERVING_THREAD.with(|t| t.set(index));
            runtime.block_on(async {
                let settings = WorkerSettings {
                    busy_poll,
                    header_read_timeout,
                    grace,
                    metrics,
                    deadlines,
                    tls,
                };
                run_worker(app, incoming, thread_open, settings, stopped).await;
                let _ = done_tx.send(());
                // Idle, the runtime still drives the connections it opened until released.
                let _ = released.changed().await;
            });
        })?;
    Ok(Worker {
        connections,
        open,
        done,
    })
}

/// A serving thread's settings.
struct WorkerSettings {
    busy_poll: Duration,
    header_read_timeout: Option<Duration>,
    grace: Option<Duration>,
    metrics: Option<ThreadMetrics>,
    deadlines: Deadlines,
    tls: Option<Arc<tls::ServerTls>>,
}

/// A serving thread: serves the connections it is handed until told to stop, then closes
/// them gracefully (cutting those still busy after the grace period) and returns once all
/// have closed.
async fn run_worker(
    app: Router,
    mut incoming: mpsc::UnboundedReceiver<Accepted>,
    open: Arc<AtomicUsize>,
    settings: WorkerSettings,
    mut stopped: watch::Receiver<()>,
) {
    let WorkerSettings {
        busy_poll,
        header_read_timeout,
        grace,
        metrics,
        deadlines,
        tls,
    } = settings;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    if !busy_poll.is_zero() {
        let polling = metrics.as_ref().map(|m| m.busy_poll.clone());
        tokio::spawn(busy_poll::spin(busy_poll, polling));
    }
    // Each connection holds a clone of `stage_rx`; the sender sees them all dropped.
    let (stage, stage_rx) = watch::channel(Stage::Serving);
    loop {
        let (stream, slot, peer) = tokio::select! {
            accepted = incoming.recv() => match accepted {
                Some(accepted) => accepted,
                None => break,
            },
            _ = stopped.changed() => break,
        };
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                open.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!("cannot register a connection: {e}");
                continue;
            }
        };
        if let Some(m) = &metrics {
            m.accepted.inc();
        }
        let connection = Connection {
            stream,
            slot,
            peer,
            app: app.clone(),
            open: open.clone(),
            metrics: metrics.clone(),
            deadlines,
            tls: tls.clone(),
        };
        tokio::spawn(serve_connection(
            connection,
            stage_rx.clone(),
            builder.clone(),
        ));
    }
    drop(stage_rx);
    // Ask every connection to finish its in-flight requests and close, then wait for them
    // (for the grace period at most: then the rest are closed as they are).
    stage.send_replace(Stage::Closing);
    let drained = match grace {
        Some(grace) => tokio::time::timeout(grace, stage.closed()).await.is_ok(),
        None => {
            stage.closed().await;
            true
        }
    };
    if !drained {
        tracing::warn!(
            "closing {} connections still busy after the shutdown grace period",
            open.load(Ordering::Relaxed)
        );
        stage.send_replace(Stage::Abort);
        stage.closed().await;
    }
}

/// An accepted connection on its way to a serving thread: the socket, its place under the
/// connection caps and the client's address.
type Accepted = (std::net::TcpStream, Slot, SocketAddr);

/// One connection, as its serving thread got it.
struct Connection {
    stream: TcpStream,
    slot: Slot,
    peer: SocketAddr,
    app: Router,
    /// The serving thread's count of open connections.
    open: Arc<AtomicUsize>,
    metrics: Option<ThreadMetrics>,
    deadlines: Deadlines,
    tls: Option<Arc<tls::ServerTls>>,
}

/// Serves one connection ([`run_connection`]) and counts it while it is open.
async fn serve_connection(
    connection: Connection,
    stage: watch::Receiver<Stage>,
    builder: Builder<TokioExecutor>,
) {
    let open = connection.open.clone();
    let metrics = connection.metrics.clone();
    if let Some(m) = &metrics {
        m.connections.inc();
    }
    let timed_out = run_connection(connection, stage, builder).await;
    if let (Some(m), Some(reason)) = (&metrics, timed_out) {
        m.timed_out.with_label_values(&[reason.label()]).inc();
    }
    open.fetch_sub(1, Ordering::Relaxed);
    if let Some(m) = &metrics {
        m.connections.dec();
    }
}

/// Serves one connection: HTTP/1.1 (or HTTP/2 with prior knowledge) until the client closes
/// it, until it times out (returned: why), or until shutdown: at [`Stage::Closing`] once its
/// in-flight requests are answered, at [`Stage::Abort`] at once (dropping a stream records it
/// as cut, like a client disconnect).
///
/// The idle watchdog is one timer per connection, set for the earliest moment the connection
/// could be idle for too long and re-checked when it fires; requests in progress are counted
/// by [`ConnectionService`] without touching it.
async fn run_connection(
    connection: Connection,
    mut stage: watch::Receiver<Stage>,
    builder: Builder<TokioExecutor>,
) -> Option<TimedOut> {
    let Connection {
        stream,
        slot,
        peer,
        app,
        deadlines,
        tls,
        ..
    } = connection;
    // Marked seen: only a change after this point asks the connection to close.
    stage.borrow_and_update();
    if let Some(limit) = deadlines.first_byte {
        let mut probe = [0u8; 1];
        tokio::select! {
            peeked = tokio::time::timeout(limit, stream.peek(&mut probe)) => match peeked {
                Err(_) => {
                    tracing::debug!("closing a connection from {peer}: nothing sent within {limit:?}");
                    return Some(TimedOut::FirstByte);
                }
                // Closed (or failed) before sending anything.
                Ok(Ok(0) | Err(_)) => return None,
                Ok(Ok(_)) => {}
            },
            // Shutting down: a connection that sent nothing has nothing in flight.
            _ = stage.changed() => return None,
        }
    }
    let io = Holding {
        io: busy_poll::Active(stream),
        slot,
    };
    let Some(tls) = tls else {
        return drive(TokioIo::new(io), app, peer, deadlines, stage, builder).await;
    };
    // The handshake is part of the first request's head: the same time limit.
    let limit = deadlines
        .header_read
        .unwrap_or(DEFAULT_TLS_HANDSHAKE_TIMEOUT);
    match tokio::time::timeout(limit, tls.acceptor().accept(io)).await {
        Err(_) => {
            tracing::debug!("closing a connection from {peer}: no TLS handshake within {limit:?}");
            Some(TimedOut::TlsHandshake)
        }
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake with {peer} failed: {e}");
            None
        }
        Ok(Ok(tls_stream)) => {
            drive(
                TokioIo::new(tls_stream),
                app,
                peer,
                deadlines,
                stage,
                builder,
            )
            .await
        }
    }
}

/// How long a TLS handshake may take when no header read timeout is set.
const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP on a connection's (plain or TLS) byte stream: the rest of [`run_connection`].
async fn drive<I>(
    io: I,
    app: Router,
    peer: SocketAddr,
    deadlines: Deadlines,
    mut stage: watch::Receiver<Stage>,
    builder: Builder<TokioExecutor>,
) -> Option<TimedOut>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let service = ConnectionService::new(app, activity.clone(), deadlines.body_read);
    let mut conn = std::pin::pin!(builder.serve_connection_with_upgrades(io, service));
    let watchdog_limit = |served: bool| {
        if served {
            deadlines.idle
        } else {
            // The first request's head, whatever the protocol, within the header timeout.
            match (deadlines.header_read, deadlines.idle) {
                (Some(h), Some(i)) => Some(h.min(i)),
                (h, i) => h.or(i),
            }
        }
    };
    let first_check = watchdog_limit(false);
    let watchdog = tokio::time::sleep(first_check.unwrap_or(Duration::MAX / 4));
    let mut watchdog = std::pin::pin!(watchdog);
    let mut watching_idle = first_check.is_some();
    // Set once the watchdog asked the connection to close: it is cut if it has not closed by
    // the next check.
    let mut closing_idle: Option<TimedOut> = None;
    let mut watching = true;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    let header_timeout = e
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(hyper::Error::is_timeout);
                    if header_timeout && closing_idle.is_none() {
                        return Some(TimedOut::HeaderRead);
                    }
                    tracing::trace!("connection ended with an error: {e}");
                }
                return closing_idle;
            }
            changed = stage.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let now = *stage.borrow_and_update();
                match now {
                    Stage::Serving => {}
                    Stage::Closing => conn.as_mut().graceful_shutdown(),
                    Stage::Abort => return None,
                }
            }
            () = &mut watchdog, if watching_idle => {
                let (idle, served) = activity.idle();
                let Some(limit) = watchdog_limit(served) else {
                    watching_idle = false;
                    continue;
                };
                let next = match idle {
                    // Busy: it cannot be idle for too long before `limit` from now.
                    None => limit,
                    Some(idle) if idle < limit => limit - idle,
                    Some(_) if closing_idle.is_some() => {
                        tracing::debug!("cutting a connection from {peer} that did not close");
                        return closing_idle;
                    }
                    Some(idle) => {
                        let reason = if served { TimedOut::Idle } else { TimedOut::FirstRequest };
                        tracing::debug!(
                            "closing a connection from {peer}: no request for {idle:?} ({})",
                            reason.label()
                        );
                        closing_idle = Some(reason);
                        conn.as_mut().graceful_shutdown();
                        IDLE_CLOSE_GRACE
                    }
                };
                if let Some(at) = tokio::time::Instant::now().checked_add(next) {
                    watchdog.as_mut().reset(at);
                } else {
                    watching_idle = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server whose `/thread` answers with the serving thread that ran it and whose
    /// `/slow` answers after 300 ms.
    /// A server of the test routes with `threads` and `busy_poll`, a 1 s header read timeout
    /// and shutdown grace.
    async fn start(threads: usize, busy_poll: Duration) -> Started {
        start_with(ServeOptions {
            threads,
            busy_poll,
            header_read_timeout: Some(Duration::from_secs(1)),
            shutdown_grace: Some(Duration::from_secs(1)),
            ..ServeOptions::default()
        })
        .await
    }

    /// The address, the stop switch, the server's task and its metrics.
    type Started = (
        std::net::SocketAddr,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<io::Result<Stopped>>,
        ServerMetrics,
    );

    /// A server of the test routes with `options` (and metrics).
    async fn start_with(options: ServeOptions) -> Started {
        let app = Router::new()
            .route("/thread", get(|| async { serving_thread().to_string() }))
            .route(
                "/long",
                get(|| async {
                    // Five chunks 400 ms apart: longer than the 1 s header read timeout.
                    let chunks = futures_util::stream::unfold(0, |i| async move {
                        if i == 5 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        Some((Ok::<_, io::Error>(format!("chunk{i};")), i + 1))
                    });
                    axum::body::Body::from_stream(chunks)
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let metrics = crate::metrics::Metrics::new().unwrap().server().unwrap();
        let options = ServeOptions {
            metrics: Some(metrics.clone()),
            ..options
        };
        let server = tokio::spawn(serve(listener, app, options, async {
            let _ = stopped.await;
        }));
        (addr, stop, server, metrics)
    }

    /// Sends `GET path` on `conn` and returns the response body (responses here are small and
    /// carry a content-length).
    async fn get_on(conn: &mut TcpStream, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 1024];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the response ended");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() >= length {
                    return body.to_string();
                }
            }
        }
    }

    /// Reads `conn` until the server closes it (within 10 s, else fails with `why`); returns
    /// what came before the close.
    async fn read_until_closed(conn: &mut TcpStream, why: &str) -> String {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
            .await
            .expect(why)
            .unwrap();
        String::from_utf8_lossy(&rest).to_string()
    }

    /// Stops the server and waits for `serve` to return.
    async fn stop_server(
        stop: oneshot::Sender<()>,
        server: tokio::task::JoinHandle<io::Result<Stopped>>,
    ) {
        stop.send(()).unwrap();
        drop(server.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_thread_and_stay_there() {
        let (addr, stop, server, metrics) = start(2, Duration::ZERO).await;
        let mut conns = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..4 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            threads.push(get_on(&mut conn, "/thread").await);
            conns.push(conn);
        }
        let mut sorted = threads.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            ["1", "1", "2", "2"],
            "open connections are balanced"
        );
        // Every later request of a connection runs on the thread that took it.
        for (conn, thread) in conns.iter_mut().zip(&threads) {
            for _ in 0..3 {
                assert_eq!(&get_on(conn, "/thread").await, thread);
            }
        }
        // A closed connection frees its place: the next one goes where it was.
        let freed = threads[0].clone();
        drop(conns.remove(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(metrics.connections.with_label_values(&[&freed]).get(), 1);
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut conn, "/thread").await, freed);
        drop(conns);
        drop(conn);
        stop_server(stop, server).await;
    }

    #[tokio::test]
    async fn slow_headers_and_idle_keep_alive_connections_are_closed() {
        // `start` sets a 1 s header read timeout.
        let (addr, stop, server, _) = start(2, Duration::ZERO).await;
        let mut trickle = TcpStream::connect(addr).await.unwrap();
        trickle
            .write_all(b"GET /thread HTTP/1.1\r\nhost")
            .await
            .unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut idle, "/thread").await.len(), 1);
        let started = std::time::Instant::now();
        for conn in [&mut trickle, &mut idle] {
            let rest = read_until_closed(conn, "the connection was left open").await;
            assert!(!rest.contains("200 OK"));
        }
        assert!(started.elapsed() >= Duration::from_millis(900));
        stop_server(stop, server).await;
    }

    #[tokio::test]
    async fn silent_connections_and_a_bare_http2_preface_are_closed() {
        let (addr, stop, server, metrics) = start_with(ServeOptions {
            threads: 1,
            header_read_timeout: Some(Duration::from_secs(1)),
            first_byte_timeout: Some(Duration::from_millis(500)),
            idle_timeout: Some(Duration::from_secs(60)),
            ..ServeOptions::default()
        })
        .await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut preface = TcpStream::connect(addr).await.unwrap();
        // The client preface and an empty SETTINGS frame, then nothing.
        preface
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        read_until_closed(&mut silent, "a silent connection was left open").await;
        read_until_closed(&mut preface, "a bare HTTP/2 preface was left open").await;
        read_until_closed(&mut partial, "half an HTTP/2 preface was left open").await;
        // Counted once the serving thread is done with them (just after they are closed).
        let count = |reason: &str| metrics.timed_out.with_label_values(&[reason]).get();
        for _ in 0..500 {
            if count("first_byte") + count("first_request") == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(count("first_byte"), 1);
        assert_eq!(count("first_request"), 2);
        // A client that asks in time is served.
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut conn, "/thread").await, "1");
        stop_server(stop, server).await;
    }

    #[tokio::test]
    async fn a_client_over_its_address_cap_gets_a_503_and_others_are_served() {
        let (addr, stop, server, metrics) = start_with(ServeOptions {
            threads: 1,
            connection_limits: ConnectionLimits {
                max: 100,
                per_address: 2,
            },
            ..ServeOptions::default()
        })
        .await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut first, "/thread").await, "1");
        assert_eq!(get_on(&mut second, "/thread").await, "1");
        let mut third = TcpStream::connect(addr).await.unwrap();
        let refused = read_until_closed(&mut third, "the third connection was kept").await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("too_many_connections"), "{refused}");
        let refusals = metrics
            .refused
            .with_label_values(&["max_connections_per_ip"]);
        assert_eq!(refusals.get(), 1);
        // Another address is not held to this one's cap (all of 127/8 is loopback).
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut other = other.connect(addr).await.unwrap();
        assert_eq!(get_on(&mut other, "/thread").await, "1");
        // A closed connection frees its place.
        drop(first);
        let mut again = None;
        for _ in 0..100 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(b"GET /thread HTTP/1.1\r\nhost: test\r\n\r\n")
                .await
                .unwrap();
            let mut head = [0u8; 12];
            if conn.read_exact(&mut head).await.is_ok() && &head == b"HTTP/1.1 200" {
                again = Some(conn);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(again.is_some(), "the freed place was never given again");
        drop((second, other, again));
        stop_server(stop, server).await;
    }

    #[tokio::test]
    async fn a_response_longer_than_the_header_read_timeout_is_not_cut() {
        let (addr, stop, server, _) = start(1, Duration::ZERO).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /long HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut received = Vec::new();
        let mut chunk = [0u8; 1024];
        while !String::from_utf8_lossy(&received).contains("\r\n0\r\n\r\n") {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "cut after: {}", String::from_utf8_lossy(&received));
            received.extend_from_slice(&chunk[..n]);
        }
        assert!(String::from_utf8_lossy(&received).contains("chunk4;"));
        // The connection is still good for the next request.
        assert_eq!(get_on(&mut conn, "/thread").await, "1");
        stop_server(stop, server).await;
    }

    #[tokio::test]
    async fn shutdown_cuts_what_is_still_streaming_after_the_grace_period() {
        // `start` sets a 1 s grace period; `/long` takes 2 s.
        let (addr, stop, server, _) = start(1, Duration::ZERO).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /long HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stopping = std::time::Instant::now();
        stop.send(()).unwrap();
        let received = read_until_closed(&mut conn, "the stream was not cut").await;
        drop(server.await.unwrap().unwrap());
        let elapsed = stopping.elapsed();
        assert!(received.contains("chunk0;"), "{received}");
        assert!(!received.contains("\r\n0\r\n\r\n"), "it ended: {received}");
        assert!(
            elapsed >= Duration::from_millis(900),
            "cut before the grace: {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_answers_in_flight_requests_then_returns() {
        let (addr, stop, server, metrics) = start(2, Duration::from_micros(100)).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut idle, "/thread").await.len(), 1);
        let mut busy = TcpStream::connect(addr).await.unwrap();
        let slow = tokio::spawn(async move { get_on(&mut busy, "/slow").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        assert_eq!(
            slow.await.unwrap(),
            "done",
            "the in-flight request is answered"
        );
        let polled: f64 = ["1", "2"]
            .iter()
            .map(|t| metrics.busy_poll.with_label_values(&[t]).get())
            .sum();
        assert!(polled > 0.0, "busy polling is counted");
        drop(server.await.unwrap().unwrap());
        // The idle keep-alive connection was closed, and nothing listens any more.
        let mut rest = Vec::new();
        assert_eq!(idle.read_to_end(&mut rest).await.unwrap(), 0);
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn dropping_the_server_closes_its_connections() {
        let (addr, _stop, server, _) = start(2, Duration::ZERO).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut conn, "/thread").await.len(), 1);
        server.abort();
        let _ = server.await;
        let rest =
            read_until_closed(&mut conn, "the serving thread still holds the connection").await;
        assert_eq!(rest.len(), 0);
    }

    #[tokio::test]
    async fn connections_a_serving_thread_opened_work_until_the_server_is_released() {
        // An echo server on this (the test's) runtime.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        // A handler opens a connection (as a store pool does on first use) and parks it.
        let parked = Arc::new(parking_lot::Mutex::new(None::<TcpStream>));
        let slot = parked.clone();
        let app = Router::new().route(
            "/open",
            get(move || async move {
                *slot.lock() = Some(TcpStream::connect(echo_addr).await.unwrap());
                "opened"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let options = ServeOptions {
            threads: 1,
            busy_poll: Duration::ZERO,
            metrics: None,
            header_read_timeout: None,
            shutdown_grace: None,
            ..ServeOptions::default()
        };
        let server = tokio::spawn(serve(listener, app, options, async {
            let _ = stopped.await;
        }));
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut conn, "/open").await, "opened");
        drop(conn);
        stop.send(()).unwrap();
        let released = server.await.unwrap().unwrap();
        // The server has stopped serving; the connection its thread opened still works.
        let mut opened = parked.lock().take().unwrap();
        opened.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), opened.read_exact(&mut back))
            .await
            .expect("no echo: the serving thread's runtime no longer drives the connection")
            .unwrap();
        assert_eq!(&back, b"ping");
        drop(released);
    }
}
