//! Logging for both binaries (`tollgate` and `tollgate-pipeline`): `RUST_LOG` filters (default
//! `info`), lines go to stderr, as text — coloured only when stderr is a terminal and
//! `NO_COLOR` is unset, so a log file or a journal gets no escape codes — or as JSON, one
//! object per line with the event's fields at the top level (`--log-format json`), for log
//! shippers.
//!
//! Spans meant for OpenTelemetry use the target [`TRACE_TARGET`]: the log lines never show
//! them, and without a trace layer ([`init_with_traces`]) they are disabled where they are
//! created, so they cost nothing.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The target of the spans that are exported as traces (and never logged).
pub const TRACE_TARGET: &str = "tollgate::otel";

/// A layer that receives the [`TRACE_TARGET`] spans (it filters for itself).
pub type TraceLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the process's subscriber.
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(colour()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// Installs the process's subscriber with `traces` beside the log lines, when there is one;
/// the log filter (`RUST_LOG`) then applies to the log lines alone, so it cannot turn the
/// traces off. Without `traces`, the same as [`init`].
pub fn init_with_traces(format: LogFormat, traces: Option<TraceLayer>) {
    let Some(traces) = traces else {
        return init(format);
    };
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines.with_ansi(colour()).boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(traces)
        .with(lines.with_filter(log_filter()))
        .init();
}

/// `RUST_LOG` (default `info`), never the trace spans.
fn log_filter() -> EnvFilter {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format!("{TRACE_TARGET}=off").parse() {
        Ok(off) => filter.add_directive(off),
        Err(_) => filter,
    }
}

/// Whether text lines are coloured.
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
