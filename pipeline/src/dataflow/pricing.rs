//! Prices each completion with the price book as it stood at the completion's epoch.
//!
//! The price book is a differential collection (one [`PriceSchedule`] per model, updated when
//! a price is added); this operator is a streaming lookup into it: a completion of epoch `t`
//! waits until every price update of epochs `<= t` has arrived, then takes the schedule of
//! its model and, within it, the row in force at the completion's *event time*. So a price
//! published mid-stream applies from its `effective_from` on, and a replay of old events
//! uses the prices that were in force when they happened. Completions are not arranged: the
//! operator's memory is the price book plus the epochs in flight.

use std::collections::{BTreeMap, HashMap};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use tollgate_schemas::pricing::PriceSchedule;

use crate::fact::{Fact, PricedFact};

/// An update of the schedule collection: `((model, schedule), epoch, diff)`.
pub type ScheduleUpdate = ((String, PriceSchedule), u64, isize);

pub fn price<'s>(
    facts: Stream<'s, u64, Vec<Fact>>,
    schedules: Stream<'s, u64, Vec<ScheduleUpdate>>,
) -> Stream<'s, u64, Vec<(PricedFact, u64, isize)>> {
    facts.binary_frontier(
        schedules,
        Pipeline,
        Pipeline,
        "PriceLookup",
        |_cap, _info| {
            let mut pending: BTreeMap<u64, (Capability<u64>, Vec<Fact>)> = BTreeMap::new();
            let mut updates: Vec<ScheduleUpdate> = Vec::new();
            // Accumulated schedule counts per model, as of the last epoch processed.
            // A BTreeMap: a handful of models, compared by bytes, is cheaper than hashing the
            // model name of every completion.
            let mut book: BTreeMap<String, HashMap<PriceSchedule, isize>> = BTreeMap::new();
            move |(facts, facts_frontier), (prices, prices_frontier), output| {
                let port = output.output_index();
                prices.for_each(|_cap, data| updates.append(data));
                facts.for_each(|cap, data| {
                    let Some(cap) = cap.retain_least(port) else {
                        return;
                    };
                    pending
                        .entry(*cap.time())
                        .or_insert_with(|| (cap, Vec::new()))
                        .1
                        .append(data);
                });
                while let Some((&time, _)) = pending.first_key_value() {
                    if facts_frontier.less_equal(&time) || prices_frontier.less_equal(&time) {
                        break;
                    }
                    let Some((_, (cap, batch))) = pending.pop_first() else {
                        break;
                    };
                    updates.retain(|((model, schedule), t, diff)| {
                        if *t > time {
                            return true;
                        }
                        let counts = book.entry(model.clone()).or_default();
                        *counts.entry(schedule.clone()).or_insert(0) += diff;
                        counts.retain(|_, c| *c != 0);
                        false
                    });
                    let mut session = output.session(&cap);
                    for fact in batch {
                        let row = book
                            .get(&fact.model)
                            .and_then(|counts| counts.iter().find(|(_, c)| **c > 0))
                            .and_then(|(s, _)| s.lookup(&fact.tenant_id, fact.event_ms))
                            .cloned();
                        session.give((PricedFact::new(fact, row.as_ref()), time, 1));
                    }
                }
            }
        },
    )
}
