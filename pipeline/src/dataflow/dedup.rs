//! Drops duplicate completions (same event id), keeping the first.
//!
//! Records are routed by event id, so every copy of an event meets the same worker. Each
//! closed epoch is processed in order; within it, records of one partition arrive in offset
//! order. Ids are remembered for `horizon_ms` of event time behind the newest event seen
//! (event time, not wall-clock time: while the gateways' broker is down no new events arrive
//! and nothing is forgotten). Records marked `replay_only` were billed before a restart: they
//! only refill the memory.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use crate::fact::Completion;

/// Ok: a first occurrence; Err(n): n duplicates were dropped in this epoch.
pub type Deduped = Result<Completion, u64>;

/// Hashes event ids by their low 64 bits: UUIDv7's random part, already uniform, so the
/// default SipHash would only add cost (it was ~5% of the dataflow's time).
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used for u128 keys; a plain fold keeps it correct for anything else.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Ids = HashMap<u128, i64, std::hash::BuildHasherDefault<IdHasher>>;

/// Records of one epoch, with the capability to emit at it; kept in the batches they arrived
/// in (moved, not copied into one growing vector).
type Epochs = BTreeMap<u64, (Capability<u64>, Vec<Vec<(Completion, bool)>>)>;

fn route(f: &(Completion, bool)) -> u64 {
    // UUIDv7's low bits are random.
    f.0.event_id as u64
}

pub fn dedup<'s>(
    facts: Stream<'s, u64, Vec<(Completion, bool)>>,
    horizon_ms: i64,
) -> Stream<'s, u64, Vec<Deduped>> {
    facts.unary_frontier(Exchange::new(route), "Dedup", move |_cap, _info| {
        let mut pending: Epochs = BTreeMap::new();
        let mut seen: Ids = Ids::default();
        let mut expiry: BinaryHeap<Reverse<(i64, u128)>> = BinaryHeap::new();
        let mut newest = i64::MIN;
        move |(input, frontier), output| {
            let port = output.output_index();
            input.for_each(|cap, data| {
                let Some(cap) = cap.retain_least(port) else {
                    return;
                };
                pending
                    .entry(*cap.time())
                    .or_insert_with(|| (cap, Vec::new()))
                    .1
                    .push(std::mem::take(data));
            });
            while let Some((&time, _)) = pending.first_key_value() {
                if frontier.less_equal(&time) {
                    break;
                }
                let Some((_, (cap, batches))) = pending.pop_first() else {
                    break;
                };
                let mut session = output.session(&cap);
                let mut duplicates = 0u64;
                for (fact, replay_only) in batches.into_iter().flatten() {
                    newest = newest.max(fact.event_ms);
                    if seen.contains_key(&fact.event_id) {
                        if !replay_only {
                            duplicates += 1;
                        }
                        continue;
                    }
                    seen.insert(fact.event_id, fact.event_ms);
                    expiry.push(Reverse((fact.event_ms, fact.event_id)));
                    if !replay_only {
                        session.give(Ok(fact));
                    }
                }
                if duplicates > 0 {
                    session.give(Err(duplicates));
                }
            }
            let forget_before = newest.saturating_sub(horizon_ms);
            while let Some(Reverse((ms, id))) = expiry.peek().copied() {
                if ms >= forget_before {
                    break;
                }
                expiry.pop();
                if seen.get(&id) == Some(&ms) {
                    seen.remove(&id);
                }
            }
        }
    })
}
