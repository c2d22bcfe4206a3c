//! The result of a run: a JSON object with stable field names for scripts, and a table for
//! people. Latencies are in microseconds and cover successful requests only.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::run::FailureCounts;

/// Latency distribution of successful requests, in microseconds (all zero if there were none).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: u64,
}

impl Percentiles {
    /// Reads the distribution off a histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            mean: h.mean().round() as u64,
        }
    }
}

/// Everything a run measured. Field names are part of the CLI's `--json` contract.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `openai` or `anthropic`.
    pub format: &'static str,
    pub stream: bool,
    pub concurrency: usize,
    /// Warmup requests issued before the measured window (not counted anywhere else).
    pub warmup: u64,
    /// Measured requests issued: `requests_ok + errors`.
    pub requests_sent: u64,
    pub requests_ok: u64,
    /// Failed measured requests of every kind, `incomplete` included.
    pub errors: u64,
    /// 2xx responses whose stream ended without its terminator.
    pub incomplete: u64,
    pub errors_by_kind: FailureCounts,
    /// Non-2xx statuses seen, by code.
    pub status_counts: BTreeMap<String, u64>,
    /// Measured window: from the warmup barrier to the last response's end.
    pub elapsed_s: f64,
    /// Successful requests per second over the measured window.
    pub rps: f64,
    pub headers_us: Percentiles,
    pub ttft_us: Percentiles,
    pub total_us: Percentiles,
    /// SSE data events per successful response (`[DONE]` not counted).
    pub chunks_mean: f64,
    pub bytes_mean: f64,
    /// TCP connections opened during the whole run (warmup included); `concurrency` when the
    /// server keeps connections alive.
    pub connections_opened: u64,
    /// This load generator's own CPU time per measured request (10 ms resolution), to show it
    /// was not the bottleneck.
    pub load_cpu_us_per_req: Option<f64>,
}

impl Report {
    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// A table for a terminal.
    pub fn to_table(&self, url: &str) -> String {
        let mut out = String::new();
        let mode = if self.stream { "stream" } else { "no stream" };
        let _ = writeln!(
            out,
            "{url}  ({}, {mode}, concurrency {}, warmup {})",
            self.format, self.concurrency, self.warmup
        );
        let _ = writeln!(
            out,
            "requests: {} ok, {} errors ({} incomplete) in {:.2} s  =>  {:.1} req/s",
            self.requests_ok, self.errors, self.incomplete, self.elapsed_s, self.rps
        );
        let _ = writeln!(
            out,
            "{:<14}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "p50", "p90", "p99", "max", "mean"
        );
        for (name, p) in [
            ("headers", &self.headers_us),
            ("first token", &self.ttft_us),
            ("total", &self.total_us),
        ] {
            let _ = writeln!(
                out,
                "{name:<14}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.max),
                ms(p.mean)
            );
        }
        let _ = write!(
            out,
            "per response: {:.1} chunks, {:.0} bytes; connections opened: {}",
            self.chunks_mean, self.bytes_mean, self.connections_opened
        );
        if let Some(cpu) = self.load_cpu_us_per_req {
            let _ = write!(out, "; load generator CPU: {cpu:.0} us/request");
        }
        out.push('\n');
        if self.errors > 0 {
            let e = &self.errors_by_kind;
            let _ = writeln!(
                out,
                "errors: connect {}, io {}, timeout {}, http 4xx {}, http 5xx {}, other status {}, incomplete {}",
                e.connect, e.io, e.timeout, e.http_4xx, e.http_5xx, e.http_other, e.incomplete
            );
            if !self.status_counts.is_empty() {
                let statuses: Vec<String> = self
                    .status_counts
                    .iter()
                    .map(|(code, n)| format!("{code}: {n}"))
                    .collect();
                let _ = writeln!(out, "statuses: {}", statuses.join(", "));
            }
        }
        out
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}
