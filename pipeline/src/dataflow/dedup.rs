//! Drops duplicate completions, and lets a real completion replace a recovered one exactly
//! once.
//!
//! Rules, per request (the key is [`crate::fact::request_key`] of its request id):
//! - a completion whose event id was seen before is a duplicate: dropped and counted;
//! - a recovered completion (`usage.source = recovered`, see [`crate::recovery`]) for a
//!   request that already has a billed completion is a duplicate too;
//! - a real completion for a request whose recovered completion was billed replaces it: the
//!   recovered one leaves again as a retraction (`retract`, its contribution subtracted by
//!   pricing) beside the real one, so the ledger ends up with the real usage only.
//!
//! Records are routed by request key, so every completion of a request (and every copy of an
//! event) meets the same worker. Each closed epoch is processed in order; within it, records
//! of one partition arrive in offset order. Event ids and requests are remembered for
//! `horizon_ms` of event time behind the newest event seen (event time, not wall-clock time:
//! while the gateways' broker is down no new events arrive and nothing is forgotten). Records
//! marked `replay_only` were billed before a restart: they go through the same rules in the
//! same order but only refill the memory (a recovered completion billed before the restart
//! is remembered with its value, so that a real one arriving after it is still retracted).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use crate::fact::Completion;

/// Ok: a completion to bill (or, with `retract` set, to take back); Err(n): n duplicates were
/// dropped in this epoch.
pub type Deduped = Result<Completion, u64>;

/// Hashes event ids and request keys by their low 64 bits: UUIDv7's (and a hashed id's)
/// random part, already uniform, so the default SipHash would only add cost (it was ~5% of
/// the dataflow's time).
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

type IdMap<V> = HashMap<u128, V, std::hash::BuildHasherDefault<IdHasher>>;

/// What was billed for a request.
enum Billed {
    /// A completion the gateway wrote: final.
    Real,
    /// A recovered completion, kept whole so that it can be retracted exactly.
    Recovered(Box<Completion>),
}

/// A request's memory: what was billed, and the newest event time of its completions.
struct Request {
    billed: Billed,
    ms: i64,
}

/// Records of one epoch, with the capability to emit at it; kept in the batches they arrived
/// in (moved, not copied into one growing vector).
type Epochs = BTreeMap<u64, (Capability<u64>, Vec<Vec<(Completion, bool)>>)>;

fn route(f: &(Completion, bool)) -> u64 {
    // The low bits of a UUIDv7 (or of a hashed request id) are random.
    f.0.request_key as u64
}

/// What to do with one completion.
#[derive(Debug, PartialEq)]
enum Verdict {
    Duplicate,
    Bill,
    /// Bill it, and take back the recovered completion it replaces.
    Replace(Box<Completion>),
}

/// The dedup memory of one worker, with the rules above.
#[derive(Default)]
struct Memory {
    events: IdMap<i64>,
    requests: IdMap<Request>,
    event_expiry: BinaryHeap<Reverse<(i64, u128)>>,
    request_expiry: BinaryHeap<Reverse<(i64, u128)>>,
    newest: Option<i64>,
}

impl Memory {
    fn judge(&mut self, c: &Completion) -> Verdict {
        self.newest = Some(self.newest.map_or(c.event_ms, |n| n.max(c.event_ms)));
        if self.events.contains_key(&c.event_id) {
            return Verdict::Duplicate;
        }
        self.events.insert(c.event_id, c.event_ms);
        self.event_expiry.push(Reverse((c.event_ms, c.event_id)));

        let verdict = match self.requests.get_mut(&c.request_key) {
            None => {
                let billed = if c.recovered {
                    Billed::Recovered(Box::new(c.clone()))
                } else {
                    Billed::Real
                };
                self.requests.insert(
                    c.request_key,
                    Request {
                        billed,
                        ms: c.event_ms,
                    },
                );
                Verdict::Bill
            }
            // Something was billed already; a recovered completion adds nothing to it.
            Some(_) if c.recovered => Verdict::Duplicate,
            Some(r) => {
                r.ms = r.ms.max(c.event_ms);
                match std::mem::replace(&mut r.billed, Billed::Real) {
                    Billed::Recovered(old) => Verdict::Replace(old),
                    // Two different real completions of one request: both billed, as before
                    // requests were tracked (the gateway writes one per request).
                    Billed::Real => Verdict::Bill,
                }
            }
        };
        if let Some(r) = self.requests.get(&c.request_key) {
            self.request_expiry.push(Reverse((r.ms, c.request_key)));
        }
        verdict
    }

    /// Forgets what lies more than `horizon_ms` behind the newest event time.
    fn expire(&mut self, horizon_ms: i64) {
        let Some(newest) = self.newest else {
            return;
        };
        let forget_before = newest.saturating_sub(horizon_ms);
        while let Some(Reverse((ms, id))) = self.event_expiry.peek().copied() {
            if ms >= forget_before {
                break;
            }
            self.event_expiry.pop();
            if self.events.get(&id) == Some(&ms) {
                self.events.remove(&id);
            }
        }
        while let Some(Reverse((ms, key))) = self.request_expiry.peek().copied() {
            if ms >= forget_before {
                break;
            }
            self.request_expiry.pop();
            if self.requests.get(&key).is_some_and(|r| r.ms == ms) {
                self.requests.remove(&key);
            }
        }
    }
}

pub fn dedup<'s>(
    facts: Stream<'s, u64, Vec<(Completion, bool)>>,
    horizon_ms: i64,
) -> Stream<'s, u64, Vec<Deduped>> {
    facts.unary_frontier(Exchange::new(route), "Dedup", move |_cap, _info| {
        let mut pending: Epochs = BTreeMap::new();
        let mut memory = Memory::default();
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
                    let verdict = memory.judge(&fact);
                    if replay_only {
                        continue;
                    }
                    match verdict {
                        Verdict::Duplicate => duplicates += 1,
                        Verdict::Bill => session.give(Ok(fact)),
                        Verdict::Replace(mut old) => {
                            old.retract = true;
                            session.give(Ok(*old));
                            session.give(Ok(fact));
                        }
                    }
                }
                if duplicates > 0 {
                    session.give(Err(duplicates));
                }
            }
            memory.expire(horizon_ms);
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;
    use crate::fact::Outcome;

    fn completion(event_id: u128, request: u128, recovered: bool, ms: i64) -> Completion {
        Completion {
            event_id,
            request_key: request,
            recovered,
            retract: false,
            event_ms: ms,
            tenant_id: "t".into(),
            model: "m".into(),
            outcome: if recovered {
                Outcome::GatewayLost
            } else {
                Outcome::Completed
            },
            input_tokens: 10,
            cached_input_tokens: 0,
            cache_write_input_tokens: 0,
            output_tokens: if recovered { 3 } else { 7 },
            usage_counted: recovered,
            ttft_ms: None,
            cache: None,
            details: None,
        }
    }

    #[test]
    fn a_real_completion_replaces_a_recovered_one_once() {
        let mut m = Memory::default();
        let recovered = completion(1, 100, true, 1_000);
        assert_eq!(m.judge(&recovered), Verdict::Bill);
        assert_eq!(m.judge(&recovered), Verdict::Duplicate, "same event id");
        let real = completion(2, 100, false, 900);
        assert_eq!(
            m.judge(&real),
            Verdict::Replace(Box::new(recovered.clone()))
        );
        assert_eq!(m.judge(&real), Verdict::Duplicate, "same event id");
        assert_eq!(
            m.judge(&recovered),
            Verdict::Duplicate,
            "recovered again after the real one"
        );
    }

    #[test]
    fn a_recovered_completion_after_the_real_one_is_a_duplicate() {
        let mut m = Memory::default();
        assert_eq!(m.judge(&completion(2, 100, false, 900)), Verdict::Bill);
        assert_eq!(
            m.judge(&completion(1, 100, true, 1_000)),
            Verdict::Duplicate
        );
        // Other requests are not affected.
        assert_eq!(m.judge(&completion(3, 101, true, 1_000)), Verdict::Bill);
    }

    #[test]
    fn requests_are_forgotten_after_the_horizon() {
        let mut m = Memory::default();
        assert_eq!(m.judge(&completion(1, 100, true, 1_000)), Verdict::Bill);
        assert_eq!(m.judge(&completion(5, 200, false, 10_000)), Verdict::Bill);
        m.expire(5_000);
        assert!(!m.requests.contains_key(&100));
        assert!(m.requests.contains_key(&200));
        // Beyond the horizon the real completion is billed on its own (documented limit).
        assert_eq!(m.judge(&completion(2, 100, false, 1_100)), Verdict::Bill);
    }
}
