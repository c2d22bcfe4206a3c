//! Where records go when a sink's hand-off channel is full: a disk spool the request path
//! appends to itself (serialized there, written to the file at once), so that a writer thread
//! that cannot keep up (a slow disk, a stalled Kafka) costs latency, never records.
//!
//! Once one record has overflowed, every later record follows it into the spool until the
//! sink's writer thread has drained it, so each stream's records stay in order. A record
//! written here is durable against a process crash (it is in the file), so a completion's
//! durability ticket resolves as soon as it is appended. The spool is bounded
//! (`overflow_max_bytes`): past it a record is lost, counted and logged loudly.
//!
//! Overflowed records survive a restart: a sink opened over a non-empty overflow drains it
//! before anything newer.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;

use super::internal_events::DropReason;
use super::spool::{Lane, Position, Spool, SpoolOptions, SpoolRecord};
use super::wire::WireMessage;

/// The overflow spool of one sink.
pub struct Overflow {
    spool: Mutex<Spool>,
    /// Set (under the lock) when a record is appended; cleared by the writer once drained.
    active: AtomicBool,
    max_bytes: u64,
}

/// Records read from the overflow, and where to commit once they are safe elsewhere.
pub struct Drained {
    pub messages: Vec<WireMessage>,
    upto: Position,
}

impl Overflow {
    /// Opens (creating) the overflow spool in `dir`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Overflow> {
        let spool = Spool::open(
            dir,
            SpoolOptions {
                segment_max_bytes: 64 * 1024 * 1024,
                fsync_interval: Duration::from_millis(200),
            },
        )?;
        let active = spool.records() > 0;
        Ok(Overflow {
            spool: Mutex::new(spool),
            active: AtomicBool::new(active),
            max_bytes,
        })
    }

    /// Whether records are waiting here (new records must follow them).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Appends one record and writes it to the file.
    pub fn push(&self, m: WireMessage) -> Result<(), DropReason> {
        let mut spool = self.spool.lock();
        self.active.store(true, Ordering::Release);
        let size = 19 + m.key.len() + m.payload.len();
        if spool.bytes() + size as u64 > self.max_bytes {
            return Err(DropReason::SpoolFull);
        }
        spool
            .append(Lane::New, &SpoolRecord::from_wire(m))
            .and_then(|()| spool.flush())
            .map_err(|e| {
                tracing::error!(target: "tollgate::events", error = %e, "cannot write the overflow spool");
                DropReason::SpoolWrite
            })?;
        // Written to the file is what a process crash needs; the writer thread syncs at
        // shutdown (no disk sync here, on the request path).
        Ok(())
    }

    /// Up to `max` records, oldest first, not yet committed.
    pub fn read(&self, max: usize) -> io::Result<Drained> {
        let mut spool = self.spool.lock();
        let mut messages = Vec::new();
        let mut upto = spool.read_position();
        while messages.len() < max {
            let Some((record, end)) = spool.read_next()? else {
                break;
            };
            upto = end;
            messages.push(to_wire(record));
        }
        Ok(Drained { messages, upto })
    }

    /// The records of `drained` are safe elsewhere: forgets them; when nothing is left, new
    /// records go to the channel again.
    pub fn commit(&self, drained: &Drained) -> io::Result<()> {
        let mut spool = self.spool.lock();
        if drained.messages.is_empty() {
            spool.rewind();
        } else {
            spool.commit(drained.upto, drained.messages.len() as u64)?;
        }
        if spool.records() == 0 {
            spool.compact_if_empty()?;
            self.active.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Records drained back for another try (the write elsewhere failed).
    pub fn retry(&self) {
        self.spool.lock().rewind();
    }

    /// Records waiting.
    pub fn records(&self) -> u64 {
        self.spool.lock().records()
    }

    /// Syncs what was written and the read cursor (at shutdown). Without it, a restart may
    /// replay records already moved on (with their event ids: readers drop the copies).
    pub fn sync(&self) -> io::Result<()> {
        self.spool.lock().sync(true)
    }
}

#[derive(Deserialize)]
struct EventId<'a> {
    #[serde(borrow)]
    event_id: std::borrow::Cow<'a, str>,
}

/// A spooled record back as a wire message (its event id read from the payload).
pub(crate) fn to_wire(r: SpoolRecord) -> WireMessage {
    let event_id = serde_json::from_slice::<EventId<'_>>(&r.payload)
        .map(|e| e.event_id.into_owned())
        .unwrap_or_default();
    WireMessage {
        topic: r.topic,
        key: String::from_utf8_lossy(&r.key).into_owned(),
        event_id,
        timestamp_ms: r.timestamp_ms,
        payload: r.payload,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::events::wire::{Record, Topic};

    fn msg(i: u64) -> WireMessage {
        Record::Chunk(crate::events::wire::tests::chunk("t", "r", i))
            .to_wire()
            .unwrap()
    }

    #[test]
    fn overflowed_records_come_back_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overflow::open(dir.path(), 1 << 20).unwrap();
        assert!(!o.is_active());
        let sent: Vec<WireMessage> = (0..5).map(msg).collect();
        for m in &sent {
            o.push(m.clone()).unwrap();
        }
        assert!(o.is_active());
        let first = o.read(3).unwrap();
        assert_eq!(first.messages, sent[..3]);
        o.commit(&first).unwrap();
        assert!(o.is_active(), "two are still waiting");
        // A crash before the cursor is synced replays committed records again (same event
        // ids: the pipeline drops the copies); a clean stop syncs it.
        o.sync().unwrap();
        drop(o);

        let o = Overflow::open(dir.path(), 1 << 20).unwrap();
        assert!(o.is_active(), "a previous run's records are drained first");
        let rest = o.read(10).unwrap();
        assert_eq!(rest.messages, sent[3..]);
        assert_eq!(rest.messages[0].topic, Topic::Chunks);
        o.commit(&rest).unwrap();
        assert!(!o.is_active());
        assert_eq!(o.records(), 0);
    }

    #[test]
    fn a_full_overflow_refuses_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overflow::open(dir.path(), 600).unwrap();
        let results: Vec<_> = (0..10).map(|i| o.push(msg(i))).collect();
        assert!(results.iter().any(Result::is_ok));
        assert!(results.contains(&Err(DropReason::SpoolFull)));
    }
}
