//! Tollgate's billing pipeline: completion events in; an exactly-once ledger, live balances
//! and analytics tables out.
//!
//! | module | owns |
//! |---|---|
//! | [`fact`] | what flows through the dataflow: facts, priced facts, the [`fact::Totals`] monoid |
//! | [`source`] | reading partitions: Kafka, the gateway's local log, memory (tests, benchmarks) |
//! | [`dataflow`] | the timely/differential dataflow and the worker loop that drives it |
//! | [`sink`] | ledger (PostgreSQL, SQLite), balances (Redis, memory), analytics (ClickHouse) |
//! | [`metrics`] | Prometheus metrics and the `/metrics` listener of `tollgate-pipeline` |
//! | [`recovery`] | the scanner that publishes recovered completions for requests a gateway lost |
//! | [`audit`] | the audit consumer: `llm.audit` events into ClickHouse's `audit_log`, exactly once |
//! | [`config`] | what to read and where to write, from flags or the gateway's config |
//! | [`logging`] | log lines (text or JSON) of both binaries |
//! | [`testkit`] | synthetic completion events for tests and benchmarks |

pub mod audit;
pub mod config;
pub mod dataflow;
pub mod fact;
pub mod logging;
pub mod metrics;
pub mod recovery;
pub mod sink;
pub mod source;

use dataflow::{PipelineError, WorkerReport};

/// How the workers are laid out: threads in this process, and the processes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Worker threads in this process.
    pub workers: usize,
    /// This process's index in `addresses` (0 when alone).
    pub process: usize,
    /// `host:port` of every process of the cluster; empty when alone.
    pub addresses: Vec<String>,
}

impl Cluster {
    /// One process with `workers` threads.
    pub fn local(workers: usize) -> Cluster {
        Cluster {
            workers: workers.max(1),
            process: 0,
            addresses: Vec::new(),
        }
    }

    fn communication(&self) -> timely::CommunicationConfig {
        if self.addresses.len() > 1 {
            timely::CommunicationConfig::Cluster {
                threads: self.workers,
                process: self.process,
                addresses: self.addresses.clone(),
                report: false,
                zerocopy: false,
            }
        } else if self.workers > 1 {
            timely::CommunicationConfig::Process(self.workers)
        } else {
            timely::CommunicationConfig::Thread
        }
    }
}

/// Runs the pipeline on this process's workers until they stop; one report per worker.
pub fn execute(
    config: config::PipelineConfig,
    cluster: &Cluster,
) -> Result<Vec<WorkerReport>, PipelineError> {
    let timely_config = timely::Config {
        communication: cluster.communication(),
        worker: timely::WorkerConfig::default(),
    };
    let guards = timely::execute(timely_config, move |worker| {
        dataflow::run_worker(worker, &config).map_err(|e| e.to_string())
    })
    .map_err(PipelineError::Setup)?;
    let mut reports = Vec::new();
    for result in guards.join() {
        match result {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(e)) | Err(e) => return Err(PipelineError::Setup(e)),
        }
    }
    Ok(reports)
}
pub mod testkit;
