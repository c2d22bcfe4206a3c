//! `tollgate-load`: an HTTP load generator for streaming LLM APIs (OpenAI chat completions,
//! Anthropic messages). It measures what a client sees — time to headers, to the first SSE data
//! event and to the end of the stream — with one keep-alive connection per concurrent worker,
//! and prints a table or (`--json`) one JSON object for scripts.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use tollgate_tests::load::report::Report;
use tollgate_tests::load::run::{run, LoadPlan};
use tollgate_tests::load::{LoadError, TargetSpec, WireFormat};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Openai,
    Anthropic,
}

/// Load-test a streaming LLM endpoint and report latency percentiles and throughput.
#[derive(Debug, Parser)]
#[command(name = "tollgate-load", version)]
struct Args {
    /// Endpoint to POST to (plain http).
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/chat/completions")]
    url: String,
    /// Concurrent workers, each with one keep-alive connection and one request in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Measured requests to send (the run stops at this or --duration-s, whichever is first).
    #[arg(long, default_value_t = 1000)]
    requests: u64,
    /// Upper bound on the measured window, in seconds.
    #[arg(long, default_value_t = 60.0)]
    duration_s: f64,
    /// Unmeasured requests to send first (opens connections, warms caches).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// API key: `Authorization: Bearer KEY` (openai) or `x-api-key: KEY` (anthropic).
    #[arg(long, env = "TOLLGATE_LOAD_API_KEY")]
    api_key: Option<String>,
    /// Model named in the default request body.
    #[arg(long, default_value = "mock/fast")]
    model: String,
    /// Send this file as the request body instead of the default chat request.
    #[arg(long)]
    body_file: Option<String>,
    /// Wire format of the endpoint: decides auth headers, default body and stream terminator.
    #[arg(long, value_enum, default_value_t = Format::Openai)]
    format: Format,
    /// Expect an SSE stream (default: true, or the body file's own "stream" field).
    #[arg(long, action = clap::ArgAction::Set)]
    stream: Option<bool>,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Per-request timeout, in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Runtime threads; 1 keeps the generator to one core, leaving the rest to the server.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match load(&args) {
        Ok(report) => {
            print_report(&args, &report);
            if report.requests_ok == 0 {
                // Nothing succeeded: a script should not mistake this for a measurement.
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            print_error(e.as_ref());
            ExitCode::FAILURE
        }
    }
}

fn load(args: &Args) -> Result<Report, Box<dyn std::error::Error>> {
    let body = match &args.body_file {
        Some(path) => Some(Bytes::from(
            std::fs::read(path).map_err(|e| LoadError::BodyFile(path.clone(), e))?,
        )),
        None => None,
    };
    let template = TargetSpec {
        url: args.url.clone(),
        format: match args.format {
            Format::Openai => WireFormat::OpenAi,
            Format::Anthropic => WireFormat::Anthropic,
        },
        api_key: args.api_key.clone(),
        model: args.model.clone(),
        body,
        stream: args.stream,
        extra_headers: args.headers.clone(),
        timeout: seconds("--timeout-s", args.timeout_s)?,
    }
    .into_template()?;
    let plan = LoadPlan {
        template,
        concurrency: args.concurrency.max(1),
        requests: args.requests,
        warmup: args.warmup,
        duration: seconds("--duration-s", args.duration_s)?,
    };

    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    Ok(runtime.block_on(run(plan))?)
}

fn seconds(flag: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|e| format!("{flag} {s}: {e}"))
}

// A CLI whose output is its product: the report goes to stdout.
#[allow(clippy::print_stdout)]
fn print_report(args: &Args, report: &Report) {
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table(&args.url));
    }
}

// Errors go to stderr so that `--json` output on stdout stays parseable.
#[allow(clippy::print_stderr)]
fn print_error(e: &dyn std::error::Error) {
    eprintln!("tollgate-load: {e}");
}
