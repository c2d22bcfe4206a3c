//! Prices each completion with the price book as it stood at the completion's epoch, and sums
//! it into its epoch's aggregates ([`super::aggregate`]).
//!
//! The price book is a differential collection (one [`PriceSchedule`] per model, updated when
//! a price is added); this operator is a streaming lookup into it: completions of epoch `t`
//! are priced once every price update of epochs `<= t` has arrived, with the schedule of their
//! model and, within it, the row in force at the completion's *event time*. So a price
//! published mid-stream applies from its `effective_from` on, and a replay of old events uses
//! the prices that were in force when they happened. Completions are not kept: each batch is
//! priced and summed as it arrives (it waits only while the price book of its epoch is still
//! open), and an epoch's sums leave when no completion of it can arrive any more. With
//! analytics, each priced completion also leaves as a [`PricedFact`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use differential_dataflow::difference::Abelian;
use rust_decimal::Decimal;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::progress::frontier::MutableAntichain;
use tollgate_schemas::pricing::{PriceRow, PriceSchedule};

use super::aggregate::{minute_of, EpochSums, SumKey};
use super::SinkItem;
use crate::fact::{Completion, PricedFact};

/// An update of the schedule collection: `((model, schedule), epoch, diff)`.
pub type ScheduleUpdate = ((String, PriceSchedule), u64, isize);

/// The schedule in force per model, with the id (in [`PriceBook::rows`]) of each of its rows.
type Schedules = BTreeMap<String, (PriceSchedule, Vec<u32>)>;

/// The price book at every epoch still open.
#[derive(Default)]
struct PriceBook {
    /// Accumulated counts of each model's schedules, every final update applied.
    counts: BTreeMap<String, HashMap<PriceSchedule, isize>>,
    /// The schedules in force from each epoch on, one entry per epoch in which the book
    /// changed; older entries are dropped once no completion can need them.
    versions: BTreeMap<u64, Schedules>,
    rows: Rows,
}

/// Every distinct price row seen, so that a sum's key names its row with a number. Grows with
/// the rows ever published (a price book is small), never with traffic.
#[derive(Default)]
struct Rows {
    rows: Vec<PriceRow>,
    ids: HashMap<PriceRow, u32>,
}

impl Rows {
    fn id(&mut self, row: &PriceRow) -> u32 {
        if let Some(id) = self.ids.get(row) {
            return *id;
        }
        let id = u32::try_from(self.rows.len()).unwrap_or(u32::MAX);
        self.rows.push(row.clone());
        self.ids.insert(row.clone(), id);
        id
    }
}

impl PriceBook {
    /// Applies, epoch by epoch, the updates of epochs the price frontier has passed.
    fn apply(&mut self, updates: &mut Vec<ScheduleUpdate>, frontier: &MutableAntichain<u64>) {
        let mut ready: Vec<ScheduleUpdate> = Vec::new();
        updates.retain(|u| {
            if frontier.less_equal(&u.1) {
                return true;
            }
            ready.push(u.clone());
            false
        });
        ready.sort_by_key(|u| u.1);
        let mut i = 0;
        while i < ready.len() {
            let time = ready[i].1;
            while i < ready.len() && ready[i].1 == time {
                let ((model, schedule), _, diff) = &ready[i];
                let counts = self.counts.entry(model.clone()).or_default();
                *counts.entry(schedule.clone()).or_insert(0) += diff;
                counts.retain(|_, c| *c != 0);
                i += 1;
            }
            let mut schedules = Schedules::new();
            for (model, counts) in &self.counts {
                if let Some((schedule, _)) = counts.iter().find(|(_, c)| **c > 0) {
                    let ids = schedule.rows().iter().map(|r| self.rows.id(r)).collect();
                    schedules.insert(model.clone(), (schedule.clone(), ids));
                }
            }
            self.versions.insert(time, schedules);
        }
    }

    /// The schedules in force at epoch `time` (all its updates applied).
    fn at(&self, time: u64) -> Option<&Schedules> {
        self.versions.range(..=time).next_back().map(|(_, s)| s)
    }

    /// Forgets the versions no completion of epoch `>= time` can use.
    fn forget_before(&mut self, time: u64) {
        if let Some((&keep, _)) = self.versions.range(..=time).next_back() {
            self.versions = self.versions.split_off(&keep);
        }
    }
}

/// The row in force for `c` with its id, what `c` costs at it and, for a cache hit, what it
/// saved (the hit costs its billed fraction of its original answer's price); unpriced (no
/// row, cost 0, nothing saved) when there is none. A cost out of the exact range cannot
/// happen (the source refuses counts, the price-book reader prices, beyond the bounds of
/// `tollgate_schemas::pricing`); should it all the same, the completion is counted as
/// unpriced and said so in the log, never rounded and never a panic.
fn priced<'b>(
    schedules: Option<&'b Schedules>,
    c: &Completion,
) -> (Option<(u32, &'b PriceRow)>, Decimal, Option<Decimal>) {
    let hit = c.cache.as_deref();
    let unpriced = (None, Decimal::ZERO, hit.map(|_| Decimal::ZERO));
    let Some((id, row)) = lookup(schedules, c) else {
        return unpriced;
    };
    let charged = tollgate_schemas::pricing::completion_cost(
        row,
        &c.usage(),
        hit.map(|h| (&h.saved, h.fraction)),
    );
    match charged {
        Some((cost, saved)) => (Some((id, row)), cost, saved),
        None => {
            tracing::error!(
                tenant_id = %c.tenant_id,
                model = %c.model,
                "a completion's cost is out of the exact range: counted as unpriced"
            );
            unpriced
        }
    }
}

/// The row in force for `c` and its id, if any.
fn lookup<'b>(schedules: Option<&'b Schedules>, c: &Completion) -> Option<(u32, &'b PriceRow)> {
    let (schedule, ids) = schedules?.get(&c.model)?;
    let row = schedule.lookup(&c.tenant_id, c.event_ms)?;
    // `ids` was built from this schedule's rows, so the position always has an id.
    let at = schedule.rows().iter().position(|r| std::ptr::eq(r, row))?;
    Some((*ids.get(at)?, row))
}

pub fn price_and_sum<'s>(
    completions: Stream<'s, u64, Vec<Completion>>,
    schedules: Stream<'s, u64, Vec<ScheduleUpdate>>,
    with_facts: bool,
) -> Stream<'s, u64, Vec<SinkItem>> {
    completions.binary_frontier(
        schedules,
        Pipeline,
        Pipeline,
        "PriceAndSum",
        move |_cap, _info| {
            let mut book = PriceBook::default();
            let mut updates: Vec<ScheduleUpdate> = Vec::new();
            // Batches whose epoch's price book is not complete yet, in arrival order.
            let mut waiting: VecDeque<(Capability<u64>, Vec<Completion>)> = VecDeque::new();
            let mut epochs: BTreeMap<u64, (Capability<u64>, EpochSums)> = BTreeMap::new();
            move |(input, input_frontier), (prices, prices_frontier), output| {
                let port = output.output_index();
                prices.for_each(|_cap, data| updates.append(data));
                book.apply(&mut updates, prices_frontier);
                input.for_each(|cap, data| {
                    if let Some(cap) = cap.retain_least(port) {
                        waiting.push_back((cap, std::mem::take(data)));
                    }
                });

                while let Some((cap, _)) = waiting.front() {
                    if prices_frontier.less_equal(cap.time()) {
                        break;
                    }
                    let Some((cap, batch)) = waiting.pop_front() else {
                        break;
                    };
                    let time = *cap.time();
                    let schedules = book.at(time);
                    let (cap, sums) = epochs
                        .entry(time)
                        .or_insert_with(|| (cap, EpochSums::default()));
                    let mut facts = Vec::new();
                    for c in batch {
                        let (price, cost, saved) = priced(schedules, &c);
                        let tokens = [
                            c.input_tokens,
                            c.cached_input_tokens,
                            c.cache_write_input_tokens,
                            c.output_tokens,
                        ];
                        let (outcome, ttft_ms, minute_ms, retract) =
                            (c.outcome, c.ttft_ms, minute_of(c.event_ms), c.retract);
                        let (tenant_id, model, fact) = if with_facts {
                            (c.tenant_id.clone(), c.model.clone(), c.into_fact())
                        } else {
                            (c.tenant_id, c.model, None)
                        };
                        let totals = sums.totals(SumKey {
                            tenant_id,
                            model,
                            minute_ms,
                            row: price.map(|(id, _)| id),
                        });
                        let mut one = crate::fact::Totals::default();
                        one.count(
                            tokens,
                            outcome,
                            ttft_ms,
                            &cost,
                            price.is_some(),
                            saved.as_ref(),
                        );
                        if retract {
                            // Exactly the contribution it made when it was billed, subtracted.
                            one.negate();
                            totals.add(&one);
                            // Analytics keeps its fact row (TODO(#14): retract it there too).
                            continue;
                        }
                        totals.add(&one);
                        if let Some(fact) = fact {
                            let row = price.map(|(_, p)| p);
                            facts.push(SinkItem::Fact(PricedFact::with_cost(
                                fact, row, cost, saved,
                            )));
                        }
                    }
                    if !facts.is_empty() {
                        output.session(&*cap).give_container(&mut facts);
                    }
                }

                // Epochs no completion can arrive for any more: their sums leave.
                while let Some((&time, _)) = epochs.first_key_value() {
                    if input_frontier.less_equal(&time)
                        || waiting.iter().any(|(c, _)| *c.time() <= time)
                    {
                        break;
                    }
                    let Some((_, (cap, sums))) = epochs.pop_first() else {
                        break;
                    };
                    let mut items = sums.roll_up(&book.rows.rows);
                    if !items.is_empty() {
                        output.session(&cap).give_container(&mut items);
                    }
                }

                let oldest_open = waiting
                    .iter()
                    .map(|(c, _)| *c.time())
                    .chain(input_frontier.frontier().iter().copied())
                    .min();
                if let Some(t) = oldest_open {
                    book.forget_before(t);
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::str::FromStr;

    use super::*;
    use crate::fact::Outcome;

    fn row(model: &str, from: i64, input: &str) -> PriceRow {
        PriceRow {
            model: model.into(),
            tenant_id: None,
            effective_from_ms: from,
            input_per_mtok: Decimal::from_str(input).unwrap(),
            cached_input_per_mtok: Decimal::ZERO,
            output_per_mtok: Decimal::ZERO,
            currency: "USD".into(),
        }
    }

    fn schedule(rows: &[PriceRow]) -> (String, PriceSchedule) {
        (
            rows[0].model.clone(),
            PriceSchedule::new(rows.iter().cloned()),
        )
    }

    fn frontier_at(t: u64) -> MutableAntichain<u64> {
        let mut f = MutableAntichain::new();
        let _ = f.update_iter([(t, 1)]);
        f
    }

    fn completion(model: &str, event_ms: i64) -> Completion {
        Completion {
            event_id: 1,
            request_key: 1,
            recovered: false,
            retract: false,
            event_ms,
            tenant_id: "t".into(),
            model: model.into(),
            outcome: Outcome::Completed,
            input_tokens: 1_000_000,
            cached_input_tokens: 0,
            cache_write_input_tokens: 0,
            output_tokens: 0,
            usage_counted: false,
            ttft_ms: None,
            cache: None,
            details: None,
        }
    }

    fn input_price(book: &PriceBook, epoch: u64, c: &Completion) -> Option<Decimal> {
        lookup(book.at(epoch), c).map(|(id, r)| {
            assert_eq!(&book.rows.rows[id as usize], r);
            r.input_per_mtok
        })
    }

    /// Each epoch is priced with the book as of that epoch, whatever was applied since, and
    /// versions are forgotten only once no open epoch can use them.
    #[test]
    fn the_book_of_each_epoch_applies_until_no_epoch_needs_it() {
        let v1 = [row("m", 0, "1")];
        let v2 = [row("m", 0, "1"), row("m", 1_000, "2")];
        let mut updates = vec![
            (schedule(&v1), 5, 1),
            (schedule(&v1), 9, -1),
            (schedule(&v2), 9, 1),
            (schedule(&[row("n", 0, "7")]), 12, 1),
        ];
        let mut book = PriceBook::default();
        book.apply(&mut updates, &frontier_at(10));
        assert_eq!(updates.len(), 1, "epoch 12 is still open");
        let late = completion("m", 2_000);
        assert_eq!(
            input_price(&book, 4, &late),
            None,
            "no price before epoch 5"
        );
        assert_eq!(input_price(&book, 5, &late), Some(Decimal::ONE));
        assert_eq!(input_price(&book, 8, &late), Some(Decimal::ONE));
        assert_eq!(input_price(&book, 9, &late), Some(Decimal::TWO));
        // Effective-dated within a version: the event time picks the row.
        assert_eq!(
            input_price(&book, 9, &completion("m", 999)),
            Some(Decimal::ONE)
        );
        assert_eq!(input_price(&book, 9, &completion("n", 0)), None);

        book.forget_before(8);
        assert_eq!(input_price(&book, 8, &late), Some(Decimal::ONE));
        book.apply(&mut updates, &frontier_at(13));
        assert!(updates.is_empty());
        assert_eq!(
            input_price(&book, 12, &completion("n", 0)),
            Some(Decimal::from(7))
        );
        book.forget_before(12);
        assert_eq!(book.versions.len(), 1);
        assert_eq!(input_price(&book, 12, &late), Some(Decimal::TWO));
        // Three distinct rows were ever published.
        assert_eq!(book.rows.rows.len(), 3);
    }
}
