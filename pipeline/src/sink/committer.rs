//! The order of writes for one batch, and recovery after a crash.
//!
//! 1. Ledger: one transaction (rows, positions, outbox). A failure here stops the pipeline:
//!    whether an interrupted COMMIT took effect is unknown, and only a restart from the
//!    committed positions is certain to count everything once.
//! 2. Balances: the absolute figures returned by the commit, versioned by its sequence number.
//!    A failure is logged and retried with a full refresh on the next batch.
//! 3. Analytics: the outbox rows, written under the batch's sequence number, then removed from
//!    the outbox. A failure leaves them in the outbox for the next attempt.
//!
//! On start: every outbox batch still in the ledger is written to analytics, and the current
//! and previous periods' balances are republished from the ledger.

use std::sync::Arc;

use tokio::runtime::Runtime;
use tollgate_schemas::pricing::PriceRow;

use super::{Analytics, Balance, BalanceStore, Ledger, LedgerBatch, Position, SinkError};
use crate::config::AbortAfterCommit;
use crate::fact::billing_period;
use crate::metrics::PipelineMetrics;

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitReport {
    pub seq: u64,
    pub events: u64,
    pub balances: usize,
}

pub struct Committer {
    runtime: Runtime,
    ledger: Option<Arc<dyn Ledger>>,
    balances: Option<Arc<dyn BalanceStore>>,
    analytics: Option<Arc<dyn Analytics>>,
    abort_after_commit: Option<AbortAfterCommit>,
    metrics: Option<PipelineMetrics>,
    commits: u64,
    balances_stale: bool,
    outbox_pending: bool,
    analytics_prepared: bool,
}

impl Committer {
    pub fn new(
        runtime: Runtime,
        ledger: Option<Arc<dyn Ledger>>,
        balances: Option<Arc<dyn BalanceStore>>,
        analytics: Option<Arc<dyn Analytics>>,
        abort_after_commit: Option<AbortAfterCommit>,
        metrics: Option<PipelineMetrics>,
    ) -> Committer {
        Committer {
            runtime,
            ledger,
            balances,
            analytics,
            abort_after_commit,
            metrics,
            commits: 0,
            balances_stale: true,
            outbox_pending: true,
            analytics_prepared: false,
        }
    }

    /// Committed positions of `source`.
    pub fn positions(&self, source: &str) -> Result<Vec<Position>, SinkError> {
        match &self.ledger {
            Some(l) => self.runtime.block_on(l.positions(source)),
            None => Ok(Vec::new()),
        }
    }

    pub fn last_seq(&self) -> Result<u64, SinkError> {
        match &self.ledger {
            Some(l) => self.runtime.block_on(l.last_seq()),
            None => Ok(0),
        }
    }

    /// The price book, without rows whose prices are out of range (written before the admin
    /// API checked them, or by hand): those are logged and left unpriced, never billed with.
    pub fn prices(&self) -> Result<Vec<PriceRow>, SinkError> {
        let mut rows = match &self.ledger {
            Some(l) => self.runtime.block_on(l.prices())?,
            None => Vec::new(),
        };
        rows.retain(|row| match row.check() {
            Ok(()) => true,
            Err((field, e)) => {
                tracing::error!(
                    model = %row.model,
                    tenant_id = row.tenant_id.as_deref().unwrap_or(""),
                    effective_from_ms = row.effective_from_ms,
                    "price row ignored: {field} {e}"
                );
                false
            }
        });
        Ok(rows)
    }

    /// Brings balances and analytics up to the ledger (after a crash, or a sink outage).
    pub fn recover(&mut self) {
        let Some(ledger) = self.ledger.clone() else {
            return;
        };
        if self.balances_stale {
            if let Some(store) = self.balances.clone() {
                let now = tollgate_schemas::events::unix_ms(std::time::SystemTime::now());
                let periods = [billing_period(now - 32 * 86_400_000), billing_period(now)];
                let result = self.runtime.block_on(async {
                    let mut all: Vec<Balance> = Vec::new();
                    for p in periods.iter() {
                        all.extend(ledger.balances(p).await?);
                    }
                    store.publish(&all).await
                });
                match result {
                    Ok(()) => self.balances_stale = false,
                    Err(e) => {
                        self.count(PipelineMetrics::balance_publish_failed);
                        tracing::warn!(error = %e, "balances not refreshed; will retry")
                    }
                }
            } else {
                self.balances_stale = false;
            }
        }
        if self.outbox_pending {
            if let Some(analytics) = self.analytics.clone() {
                let prepare = !self.analytics_prepared;
                let result = self.runtime.block_on(async {
                    if prepare {
                        analytics.prepare().await?;
                    }
                    for batch in ledger.outbox().await? {
                        analytics.write(&batch).await?;
                        ledger.ack_outbox(batch.seq).await?;
                    }
                    Ok::<(), SinkError>(())
                });
                match result {
                    Ok(()) => {
                        self.outbox_pending = false;
                        self.analytics_prepared = true;
                    }
                    Err(e) => {
                        self.count(PipelineMetrics::analytics_write_failed);
                        tracing::warn!(error = %e, "analytics outbox not drained; will retry")
                    }
                }
            } else {
                self.outbox_pending = false;
            }
        }
    }

    fn count(&self, what: fn(&PipelineMetrics)) {
        if let Some(m) = &self.metrics {
            what(m);
        }
    }

    /// Commits `batch` (see the module doc for the order). An `Err` means the ledger commit
    /// failed and the pipeline must stop.
    pub fn commit(&mut self, batch: &LedgerBatch) -> Result<CommitReport, SinkError> {
        let Some(ledger) = self.ledger.clone() else {
            return Ok(CommitReport {
                seq: batch.seq,
                events: batch.events,
                balances: 0,
            });
        };
        let with_outbox = self.analytics.is_some();
        let started = std::time::Instant::now();
        let committed = self.runtime.block_on(ledger.commit(batch, with_outbox));
        if let Some(m) = &self.metrics {
            match &committed {
                Ok(_) => m.committed(batch, started.elapsed()),
                Err(_) => m.commit_failed(started.elapsed()),
            }
        }
        let balances = committed?;
        self.commits += 1;
        if let Some(AbortAfterCommit(n)) = self.abort_after_commit {
            if self.commits >= n {
                tracing::error!(
                    seq = batch.seq,
                    "aborting after ledger commit (fault injection)"
                );
                std::process::abort();
            }
        }
        if let Some(store) = self.balances.clone() {
            if let Err(e) = self.runtime.block_on(store.publish(&balances)) {
                self.count(PipelineMetrics::balance_publish_failed);
                tracing::warn!(error = %e, "balances not published; will refresh");
                self.balances_stale = true;
            }
        }
        if let Some(outbox) = batch.outbox().filter(|_| with_outbox) {
            if self.outbox_pending {
                // Older batches wait in the outbox: they go first, this one with them.
                self.recover();
            } else if let Some(analytics) = self.analytics.clone() {
                // Written straight from memory; the outbox row is only read back after a
                // failure or a crash.
                let written = self.runtime.block_on(async {
                    analytics.write(&outbox).await?;
                    ledger.ack_outbox(outbox.seq).await
                });
                if let Err(e) = written {
                    self.count(PipelineMetrics::analytics_write_failed);
                    tracing::warn!(error = %e, "analytics batch not written; left in the outbox");
                    self.outbox_pending = true;
                }
            }
        }
        if self.balances_stale || self.outbox_pending {
            self.recover();
        }
        Ok(CommitReport {
            seq: batch.seq,
            events: batch.events,
            balances: balances.len(),
        })
    }
}
