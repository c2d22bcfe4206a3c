//! `tollgate-mock-upstream`: the protocol-faithful OpenAI + Anthropic mock upstream as a
//! standalone server, for benchmarks and manual runs.
//!
//! ```text
//! tollgate-mock-upstream --listen 127.0.0.1:9100 --chunks 20 --chunk-delay-ms 0 --first-chunk-delay-ms 0
//! ```
//!
//! Fault injection (chat and messages routes; see `mock_upstream::faults`):
//!
//! ```text
//! --latency-ms 300                      pause before every answer
//! --fail-ratio 0.3 --fail-kind status --fail-status 503
//! --fail-kind rate-limited --retry-after-ms 1000 | reset | hang | drop-midstream
//! ```
//!
//! Prints exactly one line to stdout, `listening on ADDR`, once the socket is bound; logs go
//! to stderr (`RUST_LOG`). Runs until interrupted.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tollgate_tests::mock_upstream::{Fault, Faults, MockOptions, MockUpstream, Recording};
use tracing_subscriber::EnvFilter;

/// Protocol-faithful OpenAI and Anthropic mock upstream server.
#[derive(Debug, Parser)]
#[command(name = "tollgate-mock-upstream", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Content chunks per streamed text reply.
    #[arg(long, default_value_t = 20)]
    chunks: usize,
    /// Pause between content chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Pause before the first body byte, in milliseconds.
    #[arg(long, default_value_t = 0)]
    first_chunk_delay_ms: u64,
    /// Keep every request in memory (off by default: a benchmark sends millions; only the
    /// count is kept).
    #[arg(long)]
    record_requests: bool,
    /// Worker threads of the tokio runtime (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Pause before answering every chat/messages request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of chat/messages requests (0..=1, evenly spread) that fail with --fail-kind.
    #[arg(long, default_value_t = 0.0)]
    fail_ratio: f64,
    /// How injected failures fail.
    #[arg(long, value_enum, default_value_t = FailKind::Status)]
    fail_kind: FailKind,
    /// HTTP status of `--fail-kind status` failures.
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    /// `retry-after` of `--fail-kind rate-limited` failures, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    retry_after_ms: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FailKind {
    Status,
    RateLimited,
    Reset,
    Hang,
    DropMidstream,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(%err, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let opts = MockOptions {
        chunks: args.chunks,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        first_chunk_delay: Duration::from_millis(args.first_chunk_delay_ms),
    };
    let recording = if args.record_requests {
        Recording::All
    } else {
        Recording::CountOnly
    };
    let server = match MockUpstream::start_on(args.listen, opts, recording).await {
        Ok(server) => server,
        Err(err) => {
            tracing::error!(%err, listen = %args.listen, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    if args.latency_ms > 0 || args.fail_ratio > 0.0 {
        let fault = match args.fail_kind {
            FailKind::Status => Fault::Status(args.fail_status),
            FailKind::RateLimited => Fault::RateLimited(Duration::from_millis(args.retry_after_ms)),
            FailKind::Reset => Fault::Reset,
            FailKind::Hang => Fault::Hang,
            FailKind::DropMidstream => Fault::DropMidstream,
        };
        server.set_faults(
            Faults::ratio(fault, args.fail_ratio)
                .with_latency(Duration::from_millis(args.latency_ms)),
        );
    }
    // The one line a launcher waits for; stdout carries nothing else.
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "listening on {}", server.addr())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);

    if let Err(err) = tokio::signal::ctrl_c().await {
        tracing::error!(%err, "cannot wait for Ctrl-C");
        return ExitCode::FAILURE;
    }
    tracing::info!(requests = server.request_count(), "shutting down");
    drop(server);
    ExitCode::SUCCESS
}
