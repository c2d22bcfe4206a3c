//! Runs the load: `concurrency` workers, each with its own connection, take request tickets
//! from one shared counter until `requests` are issued or `duration` has passed.
//!
//! Warmup requests (tickets from a separate counter) go first and are not recorded; all
//! workers then meet at a barrier so the measured window starts with every connection open
//! and warm. Each measured outcome is recorded under one short lock: a handful of integer
//! updates per request, far below the cost of the request itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::Barrier;

use super::client::{Connection, Failure, Outcome, RequestTemplate};
use super::report::{Percentiles, Report};
use super::LoadError;

/// How much load to apply.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub template: RequestTemplate,
    /// Workers, each with one keep-alive connection and at most one request in flight.
    pub concurrency: usize,
    /// Measured requests to issue (warmup not included).
    pub requests: u64,
    /// Unrecorded requests issued before the measured window.
    pub warmup: u64,
    /// Upper bound on the measured window: no request starts after it.
    pub duration: Duration,
}

/// Failed requests by kind.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct FailureCounts {
    pub connect: u64,
    pub io: u64,
    pub timeout: u64,
    pub http_4xx: u64,
    pub http_5xx: u64,
    pub http_other: u64,
    pub incomplete: u64,
}

impl FailureCounts {
    /// All failed requests.
    pub fn total(&self) -> u64 {
        self.connect
            + self.io
            + self.timeout
            + self.http_4xx
            + self.http_5xx
            + self.http_other
            + self.incomplete
    }
}

/// Measured outcomes, shared by the workers.
struct Collected {
    headers: Histogram<u64>,
    ttft: Histogram<u64>,
    total: Histogram<u64>,
    ok: u64,
    data_events: u64,
    bytes: u64,
    failures: FailureCounts,
    /// Non-2xx statuses seen.
    statuses: BTreeMap<u16, u64>,
}

impl Collected {
    fn new() -> Result<Self, LoadError> {
        // Microseconds, 1 µs to 1 h, 3 significant digits.
        let hist = || {
            Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .map_err(|e| LoadError::Histogram(e.to_string()))
        };
        Ok(Self {
            headers: hist()?,
            ttft: hist()?,
            total: hist()?,
            ok: 0,
            data_events: 0,
            bytes: 0,
            failures: FailureCounts::default(),
            statuses: BTreeMap::new(),
        })
    }

    fn record(&mut self, outcome: Outcome) {
        match outcome {
            Ok(s) => {
                self.ok += 1;
                self.data_events += s.data_events;
                self.bytes += s.bytes;
                self.headers.saturating_record(s.headers_us.max(1));
                self.ttft.saturating_record(s.ttft_us.max(1));
                self.total.saturating_record(s.total_us.max(1));
            }
            Err(f) => {
                let c = &mut self.failures;
                match f {
                    Failure::Connect => c.connect += 1,
                    Failure::Io => c.io += 1,
                    Failure::Timeout => c.timeout += 1,
                    Failure::Incomplete => c.incomplete += 1,
                    Failure::Status(code) => {
                        match code {
                            400..=499 => c.http_4xx += 1,
                            500..=599 => c.http_5xx += 1,
                            _ => c.http_other += 1,
                        }
                        *self.statuses.entry(code).or_insert(0) += 1;
                    }
                }
            }
        }
    }
}

struct Shared {
    plan: LoadPlan,
    warmup_tickets: AtomicU64,
    tickets: AtomicU64,
    barrier: Barrier,
    collected: Mutex<Collected>,
    /// This process's CPU ticks when the measured window opened (`u64::MAX`: unknown).
    cpu_ticks_at_start: AtomicU64,
}

/// When one worker's measured window opened and its last request ended.
struct WorkerSpan {
    start: Instant,
    end: Instant,
    connections: u64,
}

/// Applies the plan and reports what the client saw.
pub async fn run(plan: LoadPlan) -> Result<Report, LoadError> {
    let concurrency = plan.concurrency.max(1);
    let shared = Arc::new(Shared {
        warmup_tickets: AtomicU64::new(0),
        tickets: AtomicU64::new(0),
        barrier: Barrier::new(concurrency),
        collected: Mutex::new(Collected::new()?),
        cpu_ticks_at_start: AtomicU64::new(u64::MAX),
        plan,
    });

    let workers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(worker(Arc::clone(&shared))))
        .collect();
    let mut spans = Vec::with_capacity(workers.len());
    for w in workers {
        spans.push(w.await.map_err(|e| LoadError::Worker(e.to_string()))?);
    }
    let cpu_ticks_at_end = process_cpu_ticks();

    let start = spans.iter().map(|s| s.start).min();
    let end = spans.iter().map(|s| s.end).max();
    let elapsed = match (start, end) {
        (Some(start), Some(end)) => end.saturating_duration_since(start),
        _ => Duration::ZERO,
    };
    let connections = spans.iter().map(|s| s.connections).sum();

    let c = shared.collected.lock();
    let sent = c.ok + c.failures.total();
    let per_ok = |n: u64| {
        if c.ok == 0 {
            0.0
        } else {
            n as f64 / c.ok as f64
        }
    };
    let load_cpu_us_per_req = match (
        shared.cpu_ticks_at_start.load(Ordering::Relaxed),
        cpu_ticks_at_end,
    ) {
        (start, Some(end)) if start != u64::MAX && sent > 0 => {
            Some(end.saturating_sub(start) as f64 * 1e6 / CLOCK_TICKS_PER_S / sent as f64)
        }
        _ => None,
    };
    let template = &shared.plan.template;
    Ok(Report {
        format: template.format.name(),
        stream: template.stream,
        concurrency,
        warmup: shared.plan.warmup,
        requests_sent: sent,
        requests_ok: c.ok,
        errors: c.failures.total(),
        incomplete: c.failures.incomplete,
        errors_by_kind: c.failures,
        status_counts: c
            .statuses
            .iter()
            .map(|(code, n)| (code.to_string(), *n))
            .collect(),
        elapsed_s: elapsed.as_secs_f64(),
        rps: if elapsed.is_zero() {
            0.0
        } else {
            c.ok as f64 / elapsed.as_secs_f64()
        },
        headers_us: Percentiles::of(&c.headers),
        ttft_us: Percentiles::of(&c.ttft),
        total_us: Percentiles::of(&c.total),
        chunks_mean: per_ok(c.data_events),
        bytes_mean: per_ok(c.bytes),
        connections_opened: connections,
        load_cpu_us_per_req,
    })
}

async fn worker(shared: Arc<Shared>) -> WorkerSpan {
    let plan = &shared.plan;
    let mut conn = Connection::new();
    while shared.warmup_tickets.fetch_add(1, Ordering::Relaxed) < plan.warmup {
        let _ = conn.request(&plan.template).await;
    }
    // Every worker reaches this exactly once, whatever its warmup requests did.
    if shared.barrier.wait().await.is_leader() {
        if let Some(ticks) = process_cpu_ticks() {
            shared.cpu_ticks_at_start.store(ticks, Ordering::Relaxed);
        }
    }
    let start = Instant::now();
    let deadline = start + plan.duration;
    let mut end = start;
    while shared.tickets.fetch_add(1, Ordering::Relaxed) < plan.requests {
        if Instant::now() >= deadline {
            break;
        }
        let outcome = conn.request(&plan.template).await;
        end = Instant::now();
        shared.collected.lock().record(outcome);
    }
    WorkerSpan {
        start,
        end,
        connections: conn.opened,
    }
}

/// Linux's USER_HZ, the unit of `/proc/<pid>/stat` CPU times; 100 on every mainstream build.
pub const CLOCK_TICKS_PER_S: f64 = 100.0;

/// User + system CPU time of this process so far, in clock ticks (Linux only; `None` elsewhere).
pub fn process_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{TargetSpec, WireFormat};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A bare HTTP/1.1 server answering every request with `body` as a chunked SSE response,
    /// one HTTP chunk per SSE event; closes the connection after each response if `close`.
    async fn sse_server(body: &'static str, close: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    loop {
                        // Requests are small: one head plus a Content-Length body.
                        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match sock.read(&mut tmp).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < head_end + 4 + len {
                            match sock.read(&mut tmp).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                            }
                        }
                        buf.drain(..head_end + 4 + len);
                        let mut out = String::from(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                             transfer-encoding: chunked\r\n",
                        );
                        if close {
                            out.push_str("connection: close\r\n");
                        }
                        out.push_str("\r\n");
                        for event in body.split_inclusive("\n\n") {
                            out.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
                        }
                        out.push_str("0\r\n\r\n");
                        if sock.write_all(out.as_bytes()).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}/v1/chat/completions")
    }

    async fn load(url: String, concurrency: usize, requests: u64) -> Report {
        let template = TargetSpec {
            url,
            format: WireFormat::OpenAi,
            api_key: Some("x".to_owned()),
            model: "m".to_owned(),
            body: None,
            stream: None,
            extra_headers: Vec::new(),
            timeout: Duration::from_secs(10),
        }
        .into_template()
        .unwrap();
        run(LoadPlan {
            template,
            concurrency,
            requests,
            warmup: 5,
            duration: Duration::from_secs(30),
        })
        .await
        .unwrap()
    }

    const THREE_CHUNKS: &str =
        "data: {\"i\":1}\n\ndata: {\"i\":2}\n\ndata: {\"i\":3}\n\ndata: [DONE]\n\n";

    #[tokio::test]
    async fn counts_complete_streams_over_kept_alive_connections() {
        let report = load(sse_server(THREE_CHUNKS, false).await, 4, 100).await;
        assert_eq!(report.requests_ok, 100);
        assert_eq!(report.errors, 0);
        assert_eq!(report.chunks_mean, 3.0);
        assert_eq!(report.connections_opened, 4);
        assert!(report.ttft_us.p50 > 0 && report.ttft_us.p50 <= report.total_us.p50);
    }

    #[tokio::test]
    async fn reconnects_when_the_server_closes() {
        let report = load(sse_server(THREE_CHUNKS, true).await, 2, 20).await;
        assert_eq!(report.requests_ok, 20);
        assert_eq!(report.errors, 0);
        assert_eq!(report.connections_opened, 25);
    }

    #[tokio::test]
    async fn a_stream_without_done_is_incomplete() {
        let url = sse_server("data: {\"i\":1}\n\n", false).await;
        let report = load(url, 2, 10).await;
        assert_eq!(report.requests_ok, 0);
        assert_eq!(report.incomplete, 10);
        assert_eq!(report.errors, 10);
        assert_eq!(report.ttft_us.p50, 0);
    }

    #[tokio::test]
    async fn connection_refused_is_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        drop(listener);
        let report = load(url, 1, 3).await;
        assert_eq!(report.errors_by_kind.connect, 3);
    }
}
