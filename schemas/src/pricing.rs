//! The effective-dated price book and the cost of a completion, shared by the pipeline (which
//! bills), the gateway (pre-flight estimates) and finance exports.
//!
//! Rules (the README's "Billing rules" repeats them):
//! - Prices are per million tokens, exact decimals: at most 12 decimal places, from 0 to
//!   [`MAX_PRICE_PER_MTOK`] ([`check_price`]; the admin API, the CLI, the configuration and
//!   the pipeline's price-book reader all apply it).
//! - A completion's token counts are at most [`crate::usage::MAX_TOKENS_PER_COUNT`] each (the
//!   pipeline refuses larger ones). Within these bounds every cost below is exact in a
//!   `Decimal`; outside them [`cost`] says `None` rather than round or panic.
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

/// Highest price per million tokens accepted (a million units of the currency).
pub const MAX_PRICE_PER_MTOK: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Most decimal places of a price.
pub const MAX_PRICE_SCALE: u32 = 12;

/// Largest amount of money accepted for a fee, budget or spend limit (10^12 units).
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);

/// Most decimal places of an amount of money.
pub const MAX_AMOUNT_SCALE: u32 = 12;

/// Why a price or an amount of money is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("must not be negative")]
    Negative,
    #[error("must be at most {0}")]
    TooLarge(Decimal),
    #[error("must have at most {0} decimal places")]
    TooPrecise(u32),
}

/// A price per million tokens is within `0..=MAX_PRICE_PER_MTOK` with at most
/// [`MAX_PRICE_SCALE`] decimal places.
pub fn check_price(v: Decimal) -> Result<(), MoneyError> {
    check_decimal(v, MAX_PRICE_PER_MTOK, MAX_PRICE_SCALE)
}

/// An amount of money (fee, budget, spend limit) is within `0..=MAX_AMOUNT` with at most
/// [`MAX_AMOUNT_SCALE`] decimal places.
pub fn check_amount(v: Decimal) -> Result<(), MoneyError> {
    check_decimal(v, MAX_AMOUNT, MAX_AMOUNT_SCALE)
}

fn check_decimal(v: Decimal, max: Decimal, max_scale: u32) -> Result<(), MoneyError> {
    if v.is_sign_negative() && !v.is_zero() {
        return Err(MoneyError::Negative);
    }
    if v > max {
        return Err(MoneyError::TooLarge(max));
    }
    if v.normalize().scale() > max_scale {
        return Err(MoneyError::TooPrecise(max_scale));
    }
    Ok(())
}

impl PriceRow {
    /// Each of the row's prices passes [`check_price`]; `Err` names the first that does not.
    pub fn check(&self) -> Result<(), (&'static str, MoneyError)> {
        for (name, v) in [
            ("input_per_mtok", self.input_per_mtok),
            ("cached_input_per_mtok", self.cached_input_per_mtok),
            ("output_per_mtok", self.output_per_mtok),
        ] {
            check_price(v).map_err(|e| (name, e))?;
        }
        Ok(())
    }

    /// What `usage` costs at this row's prices (exact, unrounded): [`cost`].
    pub fn cost(&self, usage: &TokenUsage) -> Option<Decimal> {
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
///
/// `None` when a price or a count is outside the module's bounds and the result might not be
/// exact: never a rounded or wrapped cost.
pub fn cost(
    usage: &TokenUsage,
    input_per_mtok: Decimal,
    cached_input_per_mtok: Decimal,
    output_per_mtok: Decimal,
) -> Option<Decimal> {
    let terms = [
        (usage.uncached_input_tokens(), input_per_mtok),
        (usage.cached_input_tokens, cached_input_per_mtok),
        (usage.cache_write_input_tokens, input_per_mtok),
        (usage.output_tokens, output_per_mtok),
    ];
    let mut per_mtok = Decimal::ZERO;
    for (tokens, price) in terms {
        if tokens > crate::usage::MAX_TOKENS_PER_COUNT || check_price(price).is_err() {
            return None;
        }
        per_mtok = per_mtok.checked_add(Decimal::from(tokens).checked_mul(price)?)?;
    }
    per_mtok.checked_div(Decimal::from(1_000_000u32))
}

/// Most decimal places of the fraction of its price a cache hit is billed at.
pub const MAX_FRACTION_SCALE: u32 = 6;

/// Decimal places of the ledger's money columns (`NUMERIC(38, 18)`).
pub const LEDGER_SCALE: u32 = 18;

/// A cache hit's charge: `fraction` (0 to 1, at most [`MAX_FRACTION_SCALE`] decimal places)
/// of `list`, what the original answer's usage costs ([`cost`]); returns (billed, saved), with
/// `billed + saved == list` exactly. The one rounding in billing: a charge with more than
/// [`LEDGER_SCALE`] decimal places (a price with 12 places times a fraction with 6) is
/// rounded to that many, half away from zero (as the Flink job's `CAST` does), a difference
/// below 10^-18. `None` when the fraction is out of bounds.
pub fn hit_charge(list: Decimal, fraction: Decimal) -> Option<(Decimal, Decimal)> {
    if fraction.is_sign_negative()
        || fraction > Decimal::ONE
        || fraction.normalize().scale() > MAX_FRACTION_SCALE
    {
        return None;
    }
    let mantissa = list.mantissa().checked_mul(fraction.mantissa())?;
    let billed = Decimal::try_from_i128_with_scale(mantissa, list.scale() + fraction.scale())
        .ok()?
        .round_dp_with_strategy(
            LEDGER_SCALE,
            rust_decimal::RoundingStrategy::MidpointAwayFromZero,
        );
    let saved = list.checked_sub(billed)?;
    (billed + saved == list).then_some((billed, saved))
}

/// How a completion event's cache fields bill it, the one reading of them (the pipeline and
/// reconciliation use it): `None` when it is not a cache hit; else the original answer's
/// usage and the fraction of its price billed. A hit written before hits carried their
/// original usage billed it in full in `usage`: it reads as nothing more to bill (zero
/// usage, fraction 1). `Err` says why the fields cannot be billed.
pub fn cache_hit_terms(
    cache_hit: bool,
    saved: Option<&TokenUsage>,
    fraction: Option<&str>,
) -> Result<Option<(TokenUsage, Decimal)>, String> {
    if !cache_hit {
        return Ok(None);
    }
    let Some(saved) = saved else {
        return Ok(Some((TokenUsage::default(), Decimal::ONE)));
    };
    let counts = [
        saved.input_tokens,
        saved.cached_input_tokens,
        saved.cache_write_input_tokens,
        saved.output_tokens,
    ];
    if let Some(n) = counts
        .iter()
        .find(|n| **n > crate::usage::MAX_TOKENS_PER_COUNT)
    {
        return Err(format!(
            "cache_saved_usage counts {n} tokens, above the most a completion may count ({})",
            crate::usage::MAX_TOKENS_PER_COUNT
        ));
    }
    let fraction = match fraction {
        None => Decimal::ZERO,
        Some(f) => f
            .parse::<Decimal>()
            .ok()
            .filter(|d| {
                !d.is_sign_negative()
                    && *d <= Decimal::ONE
                    && d.normalize().scale() <= MAX_FRACTION_SCALE
            })
            .ok_or_else(|| {
                format!(
                    "cache_price_fraction must be a decimal between 0 and 1 with at most {MAX_FRACTION_SCALE} decimal places, got {f:?}"
                )
            })?,
    };
    Ok(Some((*saved, fraction)))
}

/// What a completion costs at `row`: its usage's [`cost`] plus, for a cache hit (`hit`: the
/// original answer's usage and the fraction billed), the billed part of the original
/// answer's cost ([`hit_charge`]); with what the hit saved. `None` when a figure is out of
/// the exact range.
pub fn completion_cost(
    row: &PriceRow,
    usage: &TokenUsage,
    hit: Option<(&TokenUsage, Decimal)>,
) -> Option<(Decimal, Option<Decimal>)> {
    let cost = row.cost(usage)?;
    match hit {
        None => Some((cost, None)),
        Some((saved, fraction)) => {
            let (billed, savings) = hit_charge(row.cost(saved)?, fraction)?;
            Some((cost.checked_add(billed)?, Some(savings)))
        }
    }
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
            Some(Decimal::from_str("0.000224200000000800").unwrap())
        );
    }

    #[test]
    fn costs_at_the_bounds_are_exact_and_beyond_them_there_is_none() {
        let max = TokenUsage {
            input_tokens: crate::usage::MAX_TOKENS_PER_COUNT,
            cached_input_tokens: 0,
            cache_write_input_tokens: 0,
            output_tokens: crate::usage::MAX_TOKENS_PER_COUNT,
            source: UsageSource::Provider,
        };
        let price = Decimal::from_str("999999.999999999999").unwrap();
        assert_eq!(check_price(price), Ok(()));
        let c = cost(&max, price, price, price).unwrap();
        // 2 × 10^9 × 999999.999999999999 / 10^6, to the last digit.
        assert_eq!(c, Decimal::from_str("1999999999.999999998").unwrap());
        let over = TokenUsage {
            output_tokens: crate::usage::MAX_TOKENS_PER_COUNT + 1,
            ..max
        };
        assert_eq!(cost(&over, price, price, price), None);
        let huge = Decimal::from_str("79228162514264337593543950335").unwrap();
        assert_eq!(cost(&max, huge, price, price), None);
        assert_eq!(
            check_price(huge),
            Err(MoneyError::TooLarge(MAX_PRICE_PER_MTOK))
        );
        assert_eq!(
            check_price(Decimal::from_str("0.0000000000001").unwrap()),
            Err(MoneyError::TooPrecise(12))
        );
        assert_eq!(
            check_price(Decimal::from_str("-1").unwrap()),
            Err(MoneyError::Negative)
        );
        assert_eq!(
            check_price(Decimal::from_str("1.500000000000000").unwrap()),
            Ok(())
        );
        assert_eq!(MAX_AMOUNT, Decimal::from(1_000_000_000_000u64));
        assert_eq!(MAX_PRICE_PER_MTOK, Decimal::from(1_000_000u32));
    }

    #[test]
    fn cache_hits_are_charged_an_exact_fraction() {
        let list = Decimal::new(123_456_789, 9); // 0.123456789
        assert_eq!(
            hit_charge(list, Decimal::new(25, 2)),
            Some((
                Decimal::new(3_086_419_725, 11),
                Decimal::new(9_259_259_175, 11)
            ))
        );
        assert_eq!(hit_charge(list, Decimal::ZERO), Some((Decimal::ZERO, list)));
        assert_eq!(hit_charge(list, Decimal::ONE), Some((list, Decimal::ZERO)));
        assert_eq!(hit_charge(list, Decimal::new(11, 1)), None, "above 1");
        assert_eq!(hit_charge(list, Decimal::new(-1, 1)), None, "negative");
        assert_eq!(hit_charge(list, Decimal::new(1, 7)), None, "too precise");
        // 18 decimal places times 6: rounded to the ledger's 18, half away from zero.
        let fine = Decimal::new(3, 18);
        assert_eq!(
            hit_charge(fine, Decimal::new(5, 1)),
            Some((Decimal::new(2, 18), Decimal::new(1, 18)))
        );
    }
}
