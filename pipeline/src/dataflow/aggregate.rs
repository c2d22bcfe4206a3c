//! The sums of one epoch on one worker, kept before anything is exchanged.
//!
//! Every priced completion is added into one entry per tenant × model × minute × price row
//! (a single hash lookup); when the epoch closes the entries are rolled up into the three
//! aggregates the ledger keeps — per minute (tenant × model × minute × currency), per billing
//! period (tenant × period × currency) and per invoice line (tenant × period × model × price
//! in force) — so the commit operator receives one record per key and epoch instead of three
//! per completion. Months begin on a minute boundary, so the period of a minute is the period
//! of every completion in it. Decimal sums are exact, so grouping the additions differently
//! gives the same figures.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use tollgate_schemas::pricing::PriceRow;

use super::SinkItem;
use crate::fact::{
    year_month, LineKey, MinuteKey, PeriodKey, Totals, UnitPrices, DEFAULT_CURRENCY,
};

/// What one completion is summed under within an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SumKey {
    pub tenant_id: String,
    pub model: String,
    /// Start of the minute of the event time, ms since the Unix epoch.
    pub minute_ms: i64,
    /// The price row in force (an index into the rows given to [`EpochSums::roll_up`]);
    /// `None` when unpriced.
    pub row: Option<u32>,
}

/// The start of the minute of `ms`.
pub fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(60_000) * 60_000
}

/// A multiply-rotate hash (the one rustc uses for its own tables): the keys are short
/// strings and integers of the gateway's own making, hashed once per completion, where
/// SipHash costs more than the rest of the lookup. Tables live for one epoch.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl FxHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_i64(&mut self, i: i64) {
        self.add(i as u64);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

/// The sums of one epoch.
#[derive(Default)]
pub struct EpochSums {
    sums: HashMap<SumKey, Totals, FxBuild>,
}

impl EpochSums {
    /// The running totals of `key` (zero when new).
    pub fn totals(&mut self, key: SumKey) -> &mut Totals {
        self.sums.entry(key).or_default()
    }

    /// The epoch's aggregates; `rows` resolves [`SumKey::row`].
    pub fn roll_up(self, rows: &[PriceRow]) -> Vec<SinkItem> {
        let entries: Vec<(SumKey, Totals)> = self.sums.into_iter().collect();
        // Keyed by borrowed strings: a key is copied once, into the item that leaves.
        type Month = (i32, u8);
        let mut minutes: HashMap<(&str, &str, i64, &str), Totals, FxBuild> = HashMap::default();
        let mut periods: HashMap<(&str, Month, &str), Totals, FxBuild> = HashMap::default();
        // Tenant, period, model, then what identifies the price: currency, effective from
        // (-1 unpriced), whether an override, the unit prices.
        type Line<'a> = (&'a str, Month, &'a str, &'a str, i64, bool, UnitPrices);
        let mut lines: HashMap<Line<'_>, Totals, FxBuild> = HashMap::default();
        for (k, t) in &entries {
            let row = k.row.and_then(|i| rows.get(usize::try_from(i).ok()?));
            let currency = row.map_or(DEFAULT_CURRENCY, |r| r.currency.as_str());
            let month = year_month(k.minute_ms);
            minutes
                .entry((&k.tenant_id, &k.model, k.minute_ms, currency))
                .or_default()
                .add(t);
            periods
                .entry((&k.tenant_id, month, currency))
                .or_default()
                .add(t);
            lines
                .entry((
                    &k.tenant_id,
                    month,
                    &k.model,
                    currency,
                    row.map_or(-1, |r| r.effective_from_ms),
                    row.is_some_and(|r| r.tenant_id.is_some()),
                    row.map(UnitPrices::of).unwrap_or_default(),
                ))
                .or_default()
                .add(t);
        }
        let period = |(year, month): Month| format!("{year:04}-{month:02}");
        let mut items = Vec::with_capacity(minutes.len() + periods.len() + lines.len());
        items.extend(
            minutes
                .into_iter()
                .map(|((tenant, model, minute_ms, currency), t)| {
                    SinkItem::Minute(
                        MinuteKey {
                            tenant_id: tenant.to_string(),
                            model: model.to_string(),
                            minute_ms,
                            currency: currency.to_string(),
                        },
                        t,
                    )
                }),
        );
        items.extend(periods.into_iter().map(|((tenant, month, currency), t)| {
            SinkItem::Period(
                PeriodKey {
                    tenant_id: tenant.to_string(),
                    period: period(month),
                    currency: currency.to_string(),
                },
                t,
            )
        }));
        items.extend(lines.into_iter().map(
            |((tenant, month, model, currency, price_from_ms, price_override, unit), t)| {
                SinkItem::Line(
                    LineKey {
                        tenant_id: tenant.to_string(),
                        period: period(month),
                        model: model.to_string(),
                        currency: currency.to_string(),
                        price_from_ms,
                        price_override,
                        unit,
                    },
                    t,
                )
            },
        ));
        items
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::collections::BTreeMap;
    use std::str::FromStr;

    use rust_decimal::Decimal;

    use super::*;
    use crate::fact::{billing_period, Outcome};

    fn row(model: &str, tenant: Option<&str>, from: i64, input: &str, currency: &str) -> PriceRow {
        PriceRow {
            model: model.into(),
            tenant_id: tenant.map(str::to_string),
            effective_from_ms: from,
            input_per_mtok: Decimal::from_str(input).unwrap(),
            cached_input_per_mtok: Decimal::from_str("0.5").unwrap(),
            output_per_mtok: Decimal::from_str("4.000000000001").unwrap(),
            currency: currency.into(),
        }
    }

    type Expected = (
        BTreeMap<MinuteKey, Totals>,
        BTreeMap<PeriodKey, Totals>,
        BTreeMap<LineKey, Totals>,
    );

    fn sorted(items: Vec<SinkItem>) -> Expected {
        let mut out = Expected::default();
        for i in items {
            match i {
                SinkItem::Minute(k, t) => assert!(out.0.insert(k, t).is_none()),
                SinkItem::Period(k, t) => assert!(out.1.insert(k, t).is_none()),
                SinkItem::Line(k, t) => assert!(out.2.insert(k, t).is_none()),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    /// The rolled-up sums equal the three aggregates computed completion by completion, as
    /// the dataflow did before it summed per epoch (keys, every figure, decimal scale).
    #[test]
    fn roll_up_equals_per_completion_aggregates() {
        let rows = vec![
            row("m0", None, 0, "1", "USD"),
            row("m0", None, 1_000, "2.5", "USD"),
            row("m0", Some("t1"), 0, "0.25", "USD"),
            row("m1", None, 0, "3", "EUR"),
            row("m1", Some("t0"), 0, "3", "USD"),
        ];
        let mut rng = crate::testkit::Rng::new(9);
        let mut sums = EpochSums::default();
        let mut want = Expected::default();
        // Across a month boundary: 2026-02-28T23:58:00Z plus up to 4 minutes.
        let start = 1_772_323_080_000i64;
        for _ in 0..5000 {
            let tenant = format!("t{}", rng.below(3));
            let model = format!("m{}", rng.below(3));
            let event_ms = start + i64::try_from(rng.below(240_000)).unwrap();
            let tokens = [
                rng.below(5000),
                rng.below(100),
                rng.below(10),
                rng.below(900),
            ];
            let outcome = match rng.below(3) {
                0 => Outcome::Completed,
                1 => Outcome::UpstreamError,
                _ => Outcome::ClientDisconnected,
            };
            let ttft = (rng.below(4) > 0).then(|| rng.below(12_000));
            let r = match model.as_str() {
                "m2" => None,
                _ => Some(u32::try_from(rng.below(5)).unwrap()),
            };
            let price = r.map(|i| &rows[i as usize]);
            let usage = tollgate_schemas::TokenUsage {
                input_tokens: tokens[0] + tokens[1] + tokens[2],
                cached_input_tokens: tokens[1],
                cache_write_input_tokens: tokens[2],
                output_tokens: tokens[3],
                source: tollgate_schemas::UsageSource::Provider,
            };
            let tokens = [
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.cache_write_input_tokens,
                usage.output_tokens,
            ];
            let cost = price.map_or(Decimal::ZERO, |p| p.cost(&usage).unwrap());
            sums.totals(SumKey {
                tenant_id: tenant.clone(),
                model: model.clone(),
                minute_ms: minute_of(event_ms),
                row: r,
            })
            .count(tokens, outcome, ttft, &cost, price.is_some(), None);

            let mut one = Totals::default();
            one.count(tokens, outcome, ttft, &cost, price.is_some(), None);
            let currency = price.map_or("USD", |p| p.currency.as_str()).to_string();
            let period = billing_period(event_ms);
            let minute = MinuteKey {
                tenant_id: tenant.clone(),
                model: model.clone(),
                minute_ms: minute_of(event_ms),
                currency: currency.clone(),
            };
            want.0.entry(minute).or_default().add(&one);
            let pk = PeriodKey {
                tenant_id: tenant.clone(),
                period: period.clone(),
                currency: currency.clone(),
            };
            want.1.entry(pk).or_default().add(&one);
            let line = LineKey {
                tenant_id: tenant,
                period,
                model,
                currency,
                price_from_ms: price.map_or(-1, |p| p.effective_from_ms),
                price_override: price.is_some_and(|p| p.tenant_id.is_some()),
                unit: price.map(UnitPrices::of).unwrap_or_default(),
            };
            want.2.entry(line).or_default().add(&one);
        }
        let have = sorted(sums.roll_up(&rows));
        assert_eq!(have, want);
        // Same decimal text too (equality of decimals is numeric).
        let text = |e: &Expected| -> Vec<String> {
            e.0.values()
                .chain(e.1.values())
                .chain(e.2.values())
                .map(|t| t.cost.to_string())
                .collect()
        };
        assert_eq!(text(&have), text(&want));
        assert!(have.1.keys().any(|k| k.period == "2026-02"));
        assert!(have.1.keys().any(|k| k.period == "2026-03"));
        assert!(have.0.keys().any(|k| k.currency == "EUR"));
    }
}
