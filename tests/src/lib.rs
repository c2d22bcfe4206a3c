//! Test support for Tollgate's end-to-end tests and benchmarks.

pub mod chaos;
pub mod envoy;
pub mod harness;
pub mod kafka;
pub mod load;
pub mod mock_upstream;
pub mod otlp;
pub mod process;
pub mod routes_config;

/// A test cannot run because a service it needs is missing (`why` says which and how to start
/// it). Under CI (`CI` set and not `false`/`0`) that is a failure, never a silent pass;
/// elsewhere the test prints `SKIPPED` and returns.
pub fn service_missing(test: &str, why: &str) {
    let ci = std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false);
    assert!(!ci, "{test} cannot run under CI: {why}");
    #[allow(clippy::print_stdout)] // the one place a test says it did not run
    {
        println!("SKIPPED {test}: {why}");
    }
}

/// A seed for a randomized test: `var` from the environment (to replay a run), else the
/// clock; printed, so that a failing run can be replayed.
pub fn seed(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        | 1;
    #[allow(clippy::print_stdout)] // the run must be reproducible from the output
    {
        println!("seed: {var}={seed}");
    }
    seed
}
