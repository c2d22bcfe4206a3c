//! The effective-dated price book and the cost of a completion, shared by the pipeline (which
//! bills), the gateway (pre-flight estimates) and finance exports.
//!
//! Rules (the README's "Billing rules" repeats them):
//! - Prices are per million tokens, exact decimals (at most 12 decimal places).
//! - For a tenant, model and instant `t`: the tenant's own override with the latest
//!   `effective_from <= t` applies if there is one; otherwise the list price (no tenant) with
//!   the latest `effective_from <= t`; otherwise the completion is unpriced (cost 0, counted
//!   as unpriced so that it shows up in reports).
//! - Cost = (uncached input × input price + cached input × cached-input price + cache-write
//!   input × input price + output × output price) / 1 000 000. No rounding: a cost has at most
//!   18 decimal places and every ledger column holds that exactly. Rounding happens once, when
//!   an invoice line is produced.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::usage::TokenUsage;

/// One row of the price book.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PriceRow {
    pub model: String,
    /// `None`: the list price; `Some(tenant)`: that tenant's override.
    pub tenant_id: Option<String>,
    /// In force from this instant (ms since the Unix epoch) until the next row of the same
    /// model and tenant.
    pub effective_from_ms: i64,
    #[serde(with = "rust_decimal::serde::str")]
    pub input_per_mtok: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub cached_input_per_mtok: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub output_per_mtok: Decimal,
    pub currency: String,
}

impl PriceRow {
    /// What `usage` costs at this row's prices (exact, unrounded): [`cost`].
    pub fn cost(&self, usage: &TokenUsage) -> Decimal {
        cost(
            usage,
            self.input_per_mtok,
            self.cached_input_per_mtok,
            self.output_per_mtok,
        )
    }
}

/// The pricing rule, the one place it is written: what `usage` costs at these prices per
/// million tokens, exact and unrounded. Uncached input and cache writes are billed at the input
/// price, cache reads at the cached-input price, output at the output price. The pipeline (via
/// [`PriceRow::cost`]), reconciliation and the Arroyo UDF (`flink-jobs/arroyo-udf`) call it;
/// the Flink SQL job (`flink-jobs/sql/usage.sql`) writes the same formula in SQL and is tested
/// against the pipeline.
pub fn cost(
    usage: &TokenUsage,
    input_per_mtok: Decimal,
    cached_input_per_mtok: Decimal,
    output_per_mtok: Decimal,
) -> Decimal {
    let per_mtok = Decimal::from(usage.uncached_input_tokens()) * input_per_mtok
        + Decimal::from(usage.cached_input_tokens) * cached_input_per_mtok
        + Decimal::from(usage.cache_write_input_tokens) * input_per_mtok
        + Decimal::from(usage.output_tokens) * output_per_mtok;
    per_mtok / Decimal::from(1_000_000u32)
}

/// Every price-book row of one model, ordered for lookups.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct PriceSchedule {
    /// Sorted by (tenant, effective_from).
    rows: Vec<PriceRow>,
}

impl PriceSchedule {
    /// A schedule from rows of one model (any order).
    pub fn new(rows: impl IntoIterator<Item = PriceRow>) -> PriceSchedule {
        let mut rows: Vec<PriceRow> = rows.into_iter().collect();
        rows.sort_by(|a, b| {
            (&a.tenant_id, a.effective_from_ms).cmp(&(&b.tenant_id, b.effective_from_ms))
        });
        rows.dedup_by(|a, b| {
            a.tenant_id == b.tenant_id && a.effective_from_ms == b.effective_from_ms
        });
        PriceSchedule { rows }
    }

    /// The row in force for `tenant_id` at `at_ms` (see the module rules).
    pub fn lookup(&self, tenant_id: &str, at_ms: i64) -> Option<&PriceRow> {
        let latest = |tenant: Option<&str>| {
            self.rows
                .iter()
                .filter(|r| r.tenant_id.as_deref() == tenant && r.effective_from_ms <= at_ms)
                .max_by_key(|r| r.effective_from_ms)
        };
        latest(Some(tenant_id)).or_else(|| latest(None))
    }

    pub fn rows(&self) -> &[PriceRow] {
        &self.rows
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::str::FromStr;

    use super::*;
    use crate::usage::UsageSource;

    fn row(tenant: Option<&str>, from: i64, input: &str, output: &str) -> PriceRow {
        PriceRow {
            model: "m".into(),
            tenant_id: tenant.map(str::to_string),
            effective_from_ms: from,
            input_per_mtok: Decimal::from_str(input).unwrap(),
            cached_input_per_mtok: Decimal::from_str("0.5").unwrap(),
            output_per_mtok: Decimal::from_str(output).unwrap(),
            currency: "USD".into(),
        }
    }

    #[test]
    fn latest_row_in_force_applies_and_overrides_win() {
        let s = PriceSchedule::new([
            row(None, 100, "3", "15"),
            row(None, 0, "2", "10"),
            row(Some("t1"), 50, "1", "5"),
        ]);
        assert!(s.lookup("t2", -1).is_none(), "nothing in force yet");
        assert_eq!(s.lookup("t2", 0).unwrap().effective_from_ms, 0);
        assert_eq!(s.lookup("t2", 99).unwrap().effective_from_ms, 0);
        assert_eq!(s.lookup("t2", 100).unwrap().effective_from_ms, 100);
        assert_eq!(s.lookup("t1", 49).unwrap().tenant_id, None);
        assert_eq!(
            s.lookup("t1", 500).unwrap().tenant_id.as_deref(),
            Some("t1")
        );
    }

    #[test]
    fn cost_is_exact() {
        let r = PriceRow {
            input_per_mtok: Decimal::from_str("0.150000000001").unwrap(),
            ..row(None, 0, "0", "0.6")
        };
        let u = TokenUsage {
            input_tokens: 1000,
            cached_input_tokens: 200,
            cache_write_input_tokens: 100,
            output_tokens: 7,
            source: UsageSource::Provider,
        };
        // (800 × 0.150000000001 + 200 × 0.5 + 7 × 0.6) / 1e6
        assert_eq!(
            r.cost(&u),
            Decimal::from_str("0.000224200000000800").unwrap()
        );
    }
}
