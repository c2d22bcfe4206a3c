//! Invoices: what a tenant owes for one billing period (a calendar month, UTC), built from
//! the ledger's invoice lines (`usage_price_lines`), the tenant's discounts and plan fee.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the invoice model, periods, the one rounding rule, building invoices |
//! | `render.rs` | CSV, JSON and HTML renderings; writing export files atomically |
//!
//! One invoice per tenant × currency with lines (or a plan fee) in the period, numbered
//! `TG-YYYYMM-<tenant_id>` (suffixed `-<CURRENCY>` only when the tenant has several
//! currencies in the period). An invoice is `final` once its period is closed (its issue
//! date is the close date) and a `draft` before (no issue date).
//!
//! Lines, in this order: usage (one per ledger line: model × price in force), adjustments
//! (ledger lines of an earlier, closed period booked late into this one), discounts (one
//! per discounted usage or adjustment line) and the plan fee.
//!
//! **Rounding rule** — [`round_money`] is the only place amounts are rounded:
//! - a usage or adjustment line is the exact ledger cost rounded to 2 decimal places, half
//!   away from zero;
//! - a discount line is −round(that line's *rounded* amount × percent / 100), same rule;
//! - the plan fee is rounded the same way;
//! - subtotal, discounts and total are sums of rounded lines (never rounded again).
//!
//! **Discount rule**: the discount in force at the start of the line's event period applies;
//! a model-specific discount wins over an all-models one, then the latest `effective_from`.
//!
//! Nothing here depends on the time of the export, so a closed period exports identically
//! every time (and so does a draft whose ledger has not moved).

pub mod render;

use std::collections::BTreeMap;
use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;
use time::{Date, Month, OffsetDateTime};

use crate::store::{Discount, MetaStore, Plan, PriceLine, StoreError, Tenant};

/// Invoice failures.
#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    #[error("malformed period `{0}`: expected YYYY-MM, e.g. 2026-03")]
    MalformedPeriod(String),
    #[error("period {0} has not started yet")]
    FuturePeriod(String),
    #[error("period {period} has not ended: it can be closed from {from}")]
    NotEnded { period: String, from: String },
    /// The export directory or a file in it could not be written.
    #[error("{0}")]
    Output(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A billing period: one calendar month in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Period {
    year: i32,
    month: Month,
}

impl Period {
    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Result<Period, InvoiceError> {
        let bad = || InvoiceError::MalformedPeriod(s.to_string());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u8 = m.parse().map_err(|_| bad())?;
        let month = Month::try_from(month).map_err(|_| bad())?;
        if year < 1970 {
            return Err(bad());
        }
        Ok(Period { year, month })
    }

    /// The period containing `t`.
    pub fn containing(t: OffsetDateTime) -> Period {
        let t = t.to_offset(time::UtcOffset::UTC);
        Period {
            year: t.year(),
            month: t.month(),
        }
    }

    /// Its first day.
    pub fn first_day(&self) -> Date {
        Date::from_calendar_date(self.year, self.month, 1).unwrap_or(Date::MIN)
    }

    /// Its last day.
    pub fn last_day(&self) -> Date {
        self.next().first_day().previous_day().unwrap_or(Date::MIN)
    }

    /// The period after it.
    pub fn next(&self) -> Period {
        match self.month {
            Month::December => Period {
                year: self.year + 1,
                month: Month::January,
            },
            m => Period {
                year: self.year,
                month: m.next(),
            },
        }
    }

    /// Midnight UTC at its start.
    pub fn start(&self) -> OffsetDateTime {
        self.first_day().midnight().assume_utc()
    }

    /// Midnight UTC at its end (the start of the next period).
    pub fn end(&self) -> OffsetDateTime {
        self.next().start()
    }

    /// Refuses a period that starts after `now` (the current period is allowed: a draft).
    pub fn check_started(&self, now: OffsetDateTime) -> Result<(), InvoiceError> {
        if self.start() > now {
            return Err(InvoiceError::FuturePeriod(self.to_string()));
        }
        Ok(())
    }

    /// Refuses a period that has not ended at `now` (closing needs `now ≥ next start`).
    pub fn check_ended(&self, now: OffsetDateTime) -> Result<(), InvoiceError> {
        if now < self.end() {
            return Err(InvoiceError::NotEnded {
                period: self.to_string(),
                from: date(self.next().first_day()),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, u8::from(self.month))
    }
}

/// `YYYY-MM-DD`.
fn date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The one rounding rule: 2 decimal places, half away from zero, always shown with 2 places.
pub fn round_money(amount: Decimal) -> Decimal {
    let mut r = amount.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    if r.is_zero() {
        r = Decimal::ZERO;
    }
    // Only pads (the scale is at most 2 here): "5" → "5.00".
    r.rescale(2);
    r
}

/// `final` once the period is closed, `draft` before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceStatus {
    Final,
    Draft,
}

impl InvoiceStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            InvoiceStatus::Final => "final",
            InvoiceStatus::Draft => "draft",
        }
    }
}

/// What a line is; also its place in the invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    Usage,
    Adjustment,
    Discount,
    PlanFee,
    /// Requests without billable usage (failed before any token, or served free from the
    /// cache), summed on one line with no charge.
    NoCharge,
}

impl LineKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            LineKind::Usage => "usage",
            LineKind::Adjustment => "adjustment",
            LineKind::Discount => "discount",
            LineKind::PlanFee => "plan_fee",
            LineKind::NoCharge => "no_charge",
        }
    }
}

/// Which price applied to a usage line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceBasis {
    List,
    Override,
    Unpriced,
}

impl PriceBasis {
    pub fn as_str(&self) -> &'static str {
        match self {
            PriceBasis::List => "list",
            PriceBasis::Override => "override",
            PriceBasis::Unpriced => "unpriced",
        }
    }
}

/// Token and request counts of a usage line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Quantities {
    /// Prompt tokens billed at the full input price (neither cached nor cache-write).
    pub uncached_input_tokens: i64,
    pub cached_input_tokens: i64,
    /// Prompt tokens written to the provider's cache (billed at the input price).
    pub cache_write_input_tokens: i64,
    pub output_tokens: i64,
    pub requests: i64,
    /// Of `requests`, answered from the response cache (their tokens are not in the counts
    /// above, which are what providers processed; they cost a fraction of their original
    /// answers' price, in the amount).
    pub cache_hits: i64,
}

/// One invoice line. Unit prices are per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvoiceLine {
    pub kind: LineKind,
    pub description: String,
    pub model: Option<String>,
    /// The period the usage happened in (differs from the invoice's for adjustments).
    pub event_period: Option<String>,
    /// When the applied price took effect (RFC 3339, UTC).
    pub price_from: Option<String>,
    #[serde(skip)]
    pub price_from_ms: i64,
    pub price_basis: Option<PriceBasis>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub input_per_mtok: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub cached_input_per_mtok: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub output_per_mtok: Option<Decimal>,
    pub quantities: Option<Quantities>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub discount_percent: Option<Decimal>,
    /// Rounded by [`round_money`].
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// What the line's cache hits saved (the part of their original answers' price not
    /// billed), rounded like amounts; information, not part of any total. `None` without hits.
    #[serde(with = "rust_decimal::serde::str_option")]
    pub cache_savings: Option<Decimal>,
}

impl InvoiceLine {
    fn sort_key(&self) -> (LineKind, &str, &str, i64, Option<PriceBasis>) {
        (
            self.kind,
            self.model.as_deref().unwrap_or(""),
            self.event_period.as_deref().unwrap_or(""),
            self.price_from_ms,
            self.price_basis,
        )
    }
}

/// One tenant's invoice for one period and currency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Invoice {
    pub number: String,
    pub tenant_id: String,
    pub tenant_name: String,
    pub period: String,
    /// First day of the period (YYYY-MM-DD).
    pub period_start: String,
    /// Last day of the period (YYYY-MM-DD).
    pub period_end: String,
    pub status: InvoiceStatus,
    /// The close date of the period; `None` for drafts.
    pub issue_date: Option<String>,
    pub currency: String,
    pub lines: Vec<InvoiceLine>,
    /// What the reader should know that no line says (a discount that starts within the
    /// period, and so applies from the next one).
    pub notes: Vec<String>,
    /// Usage and adjustment lines.
    #[serde(with = "rust_decimal::serde::str")]
    pub subtotal: Decimal,
    /// Discount lines (zero or negative).
    #[serde(with = "rust_decimal::serde::str")]
    pub discounts: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub plan_fee: Decimal,
    /// The sum of every line.
    #[serde(with = "rust_decimal::serde::str")]
    pub total: Decimal,
    /// What response cache hits saved the tenant this period: the sum of the lines'
    /// `cache_savings` (not deducted from anything: the amounts already bill hits at their
    /// fraction).
    #[serde(with = "rust_decimal::serde::str")]
    pub cache_savings: Decimal,
}

/// Everything an invoice run reads, already loaded.
pub struct InvoiceInputs<'a> {
    pub period: Period,
    /// The tenants (names, plans); lines of other tenants are invoiced too.
    pub tenants: &'a [Tenant],
    pub plans: &'a [Plan],
    pub discounts: &'a [Discount],
    /// Ledger lines booked into `period`.
    pub lines: &'a [PriceLine],
    /// When the period was closed, if it was.
    pub closed_at: Option<OffsetDateTime>,
}

/// Loads what `period` needs from the store and builds its invoices (of one tenant or all).
pub async fn load(
    store: &dyn MetaStore,
    period: Period,
    tenant: Option<&Tenant>,
) -> Result<Vec<Invoice>, StoreError> {
    let label = period.to_string();
    let tenants = match tenant {
        Some(t) => vec![t.clone()],
        None => store.list_tenants().await?,
    };
    let tenant_id = tenant.map(|t| t.id.as_str());
    let lines = store.price_lines(&label, tenant_id).await?;
    let plans = store.list_plans().await?;
    let discounts = store.list_discounts(tenant_id).await?;
    let closed_at = store.closed_period(&label).await?;
    Ok(build(&InvoiceInputs {
        period,
        tenants: &tenants,
        plans: &plans,
        discounts: &discounts,
        lines: &lines,
        closed_at,
    }))
}

/// The discount in force for `tenant` and `model` at `at` (see the module's discount rule).
pub fn discount_in_force<'a>(
    discounts: &'a [Discount],
    tenant_id: &str,
    model: &str,
    at: OffsetDateTime,
) -> Option<&'a Discount> {
    discounts
        .iter()
        .filter(|d| {
            d.tenant_id == tenant_id
                && d.effective_from <= at
                && d.effective_to.is_none_or(|to| to > at)
                && d.model.as_deref().is_none_or(|m| m == model)
        })
        .max_by_key(|d| (d.model.is_some(), d.effective_from, d.percent))
}

fn rfc3339_ms(ms: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
}

fn usage_line(l: &PriceLine, period: &str) -> InvoiceLine {
    let late = l.event_period != period;
    let basis = if l.price_from_ms < 0 {
        PriceBasis::Unpriced
    } else if l.price_override {
        PriceBasis::Override
    } else {
        PriceBasis::List
    };
    let price_from = if basis == PriceBasis::Unpriced {
        None
    } else {
        rfc3339_ms(l.price_from_ms)
    };
    let price_text = match &price_from {
        Some(from) => format!("{} price from {from}", basis.as_str()),
        None => "unpriced".to_string(),
    };
    let (kind, mut description) = if late {
        (
            LineKind::Adjustment,
            format!(
                "{}: adjustment for {} ({price_text})",
                l.model, l.event_period
            ),
        )
    } else {
        (
            LineKind::Usage,
            format!("{}: usage ({price_text})", l.model),
        )
    };
    let cache_savings = (l.cache_hits != 0).then(|| round_money(l.cache_savings));
    if let Some(saved) = cache_savings {
        description.push_str(&format!(
            "; {} answered from the response cache, saving {saved} {}",
            l.cache_hits, l.currency
        ));
    }
    let priced = basis != PriceBasis::Unpriced;
    InvoiceLine {
        kind,
        description,
        model: Some(l.model.clone()),
        event_period: Some(l.event_period.clone()),
        price_from,
        price_from_ms: l.price_from_ms,
        price_basis: Some(basis),
        input_per_mtok: priced.then(|| l.input_per_mtok.normalize()),
        cached_input_per_mtok: priced.then(|| l.cached_input_per_mtok.normalize()),
        output_per_mtok: priced.then(|| l.output_per_mtok.normalize()),
        quantities: Some(Quantities {
            uncached_input_tokens: (l.input_tokens
                - l.cached_input_tokens
                - l.cache_write_input_tokens)
                .max(0),
            cached_input_tokens: l.cached_input_tokens,
            cache_write_input_tokens: l.cache_write_input_tokens,
            output_tokens: l.output_tokens,
            requests: l.requests,
            cache_hits: l.cache_hits,
        }),
        discount_percent: None,
        amount: round_money(l.cost),
        cache_savings,
    }
}

fn discount_line(usage: &InvoiceLine, percent: Decimal) -> InvoiceLine {
    let model = usage.model.clone().unwrap_or_default();
    let event_period = usage.event_period.clone().unwrap_or_default();
    InvoiceLine {
        kind: LineKind::Discount,
        description: format!(
            "{}% discount on {model} ({event_period}, {})",
            percent.normalize(),
            usage.price_basis.map_or("", |b| b.as_str())
        ),
        model: usage.model.clone(),
        event_period: usage.event_period.clone(),
        price_from: usage.price_from.clone(),
        price_from_ms: usage.price_from_ms,
        price_basis: usage.price_basis,
        input_per_mtok: None,
        cached_input_per_mtok: None,
        output_per_mtok: None,
        quantities: None,
        discount_percent: Some(percent.normalize()),
        // Rounding is symmetric, so −round(x) = round(−x).
        amount: round_money(-(usage.amount * percent / Decimal::ONE_HUNDRED)),
        cache_savings: None,
    }
}

/// One line for the requests of an invoice that carry no usage at all.
fn no_charge_line(requests: i64) -> InvoiceLine {
    InvoiceLine {
        kind: LineKind::NoCharge,
        description: format!(
            "{requests} requests without billable usage (failed before any token): not \
             charged"
        ),
        model: None,
        event_period: None,
        price_from: None,
        price_from_ms: 0,
        price_basis: None,
        input_per_mtok: None,
        cached_input_per_mtok: None,
        output_per_mtok: None,
        quantities: Some(Quantities {
            uncached_input_tokens: 0,
            cached_input_tokens: 0,
            cache_write_input_tokens: 0,
            output_tokens: 0,
            requests,
            cache_hits: 0,
        }),
        discount_percent: None,
        amount: round_money(Decimal::ZERO),
        cache_savings: None,
    }
}

/// Notes on `tenant_id`'s discounts that start after the period began: the rule applies the
/// discount in force at a period's start, so such a discount counts from the next period.
fn discount_notes(inputs: &InvoiceInputs<'_>, tenant_id: &str) -> Vec<String> {
    let (start, end) = (inputs.period.start(), inputs.period.end());
    inputs
        .discounts
        .iter()
        .filter(|d| d.tenant_id == tenant_id && d.effective_from > start && d.effective_from < end)
        .map(|d| {
            format!(
                "A {}% discount on {} starts on {}, after this period began: discounts apply \
                 per whole period (the one in force at its start), so it applies from the next \
                 period.",
                d.percent.normalize(),
                d.model.as_deref().unwrap_or("every model"),
                date(d.effective_from.to_offset(time::UtcOffset::UTC).date())
            )
        })
        .collect()
}

/// Builds the invoices of `inputs.period`, ordered by tenant id then currency.
pub fn build(inputs: &InvoiceInputs<'_>) -> Vec<Invoice> {
    let period = inputs.period.to_string();
    // (tenant, currency) → lines.
    let mut groups: BTreeMap<(String, String), Vec<InvoiceLine>> = BTreeMap::new();
    // Every ledger line is invoiced, also of a tenant missing from the store (its invoice then
    // has no name): revenue never disappears silently. `load` already filtered by tenant.
    // (tenant, currency) → requests without billable usage.
    let mut no_charge: BTreeMap<(String, String), i64> = BTreeMap::new();
    for l in inputs.lines {
        let key = (l.tenant_id.clone(), l.currency.clone());
        if l.cost.is_zero()
            && l.cache_hits == 0
            && l.input_tokens == 0
            && l.output_tokens == 0
            && l.cached_input_tokens == 0
            && l.cache_write_input_tokens == 0
        {
            *no_charge.entry(key).or_default() += l.requests;
            continue;
        }
        let usage = usage_line(l, &period);
        let event_start = Period::parse(&l.event_period).map(|p| p.start()).ok();
        let discount = event_start
            .and_then(|at| discount_in_force(inputs.discounts, &l.tenant_id, &l.model, at));
        let lines = groups.entry(key).or_default();
        if let Some(d) = discount {
            // Nothing to discount (unpriced, or less than a cent): no line.
            let line = discount_line(&usage, d.percent);
            if usage.price_basis != Some(PriceBasis::Unpriced) && !line.amount.is_zero() {
                lines.push(line);
            }
        }
        lines.push(usage);
    }
    for ((tenant_id, currency), requests) in no_charge {
        groups
            .entry((tenant_id, currency))
            .or_default()
            .push(no_charge_line(requests));
    }
    for t in inputs.tenants {
        let plan = t
            .plan_id
            .as_deref()
            .and_then(|id| inputs.plans.iter().find(|p| p.id == id));
        let Some(plan) = plan else { continue };
        // A tenant created after the period owes nothing for it.
        if plan.monthly_fee.is_zero() || t.created_at >= inputs.period.end() {
            continue;
        }
        groups
            .entry((t.id.clone(), plan.currency.clone()))
            .or_default()
            .push(InvoiceLine {
                kind: LineKind::PlanFee,
                description: format!("plan {}: monthly fee", plan.name),
                model: None,
                event_period: Some(period.clone()),
                price_from: None,
                price_from_ms: 0,
                price_basis: None,
                input_per_mtok: None,
                cached_input_per_mtok: None,
                output_per_mtok: None,
                quantities: None,
                discount_percent: None,
                amount: round_money(plan.monthly_fee),
                cache_savings: None,
            });
    }
    let mut currencies: BTreeMap<&str, usize> = BTreeMap::new();
    for (tenant, _) in groups.keys() {
        *currencies.entry(tenant.as_str()).or_default() += 1;
    }
    let compact = format!(
        "{:04}{:02}",
        inputs.period.year,
        u8::from(inputs.period.month)
    );
    let (status, issue_date) = match inputs.closed_at {
        Some(at) => (
            InvoiceStatus::Final,
            Some(date(at.to_offset(time::UtcOffset::UTC).date())),
        ),
        None => (InvoiceStatus::Draft, None),
    };
    groups
        .iter()
        .map(|((tenant_id, currency), lines)| {
            let mut lines = lines.clone();
            lines.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
            let sum = |kinds: &[LineKind]| -> Decimal {
                let mut s = round_money(Decimal::ZERO);
                for l in lines.iter().filter(|l| kinds.contains(&l.kind)) {
                    s += l.amount;
                }
                s
            };
            let subtotal = sum(&[LineKind::Usage, LineKind::Adjustment]);
            let discounts = sum(&[LineKind::Discount]);
            let plan_fee = sum(&[LineKind::PlanFee]);
            let mut cache_savings = round_money(Decimal::ZERO);
            for saved in lines.iter().filter_map(|l| l.cache_savings) {
                cache_savings += saved;
            }
            let mut number = format!("TG-{compact}-{tenant_id}");
            if currencies.get(tenant_id.as_str()).copied().unwrap_or(0) > 1 {
                number = format!("{number}-{currency}");
            }
            Invoice {
                notes: discount_notes(inputs, tenant_id),
                number,
                tenant_id: tenant_id.clone(),
                tenant_name: inputs
                    .tenants
                    .iter()
                    .find(|t| &t.id == tenant_id)
                    .map(|t| t.name.clone())
                    .unwrap_or_default(),
                period: period.clone(),
                period_start: date(inputs.period.first_day()),
                period_end: date(inputs.period.last_day()),
                status,
                issue_date: issue_date.clone(),
                currency: currency.clone(),
                lines,
                subtotal,
                discounts,
                plan_fee,
                total: subtotal + discounts + plan_fee,
                cache_savings,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::str::FromStr;
    use time::macros::datetime;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tenant(id: &str, plan: Option<&str>) -> Tenant {
        Tenant {
            id: id.into(),
            name: format!("{id} inc"),
            status: "active".into(),
            plan_id: plan.map(Into::into),
            created_at: datetime!(2025-01-01 0:00 UTC),
        }
    }

    fn line(tenant: &str, event_period: &str, model: &str, from_ms: i64, cost: &str) -> PriceLine {
        PriceLine {
            tenant_id: tenant.into(),
            period: "2026-03".into(),
            event_period: event_period.into(),
            model: model.into(),
            currency: "USD".into(),
            price_from_ms: from_ms,
            price_override: false,
            input_per_mtok: d("1.5"),
            cached_input_per_mtok: d("0.25"),
            output_per_mtok: d("6"),
            requests: 3,
            input_tokens: 1000,
            cached_input_tokens: 200,
            cache_write_input_tokens: 100,
            output_tokens: 50,
            cost: d(cost),
            cache_hits: 0,
            cache_savings: Decimal::ZERO,
        }
    }

    fn discount(model: Option<&str>, percent: &str, from: OffsetDateTime) -> Discount {
        Discount {
            tenant_id: "t1".into(),
            model: model.map(Into::into),
            percent: d(percent),
            effective_from: from,
            effective_to: None,
        }
    }

    #[test]
    fn rounding_is_half_away_from_zero_with_two_places() {
        assert_eq!(round_money(d("0.005")).to_string(), "0.01");
        assert_eq!(round_money(d("0.00499999")).to_string(), "0.00");
        assert_eq!(round_money(d("-0.005")).to_string(), "-0.01");
        assert_eq!(round_money(d("2.675")).to_string(), "2.68");
        assert_eq!(round_money(d("5")).to_string(), "5.00");
        assert_eq!(round_money(d("-0.001")).to_string(), "0.00");
    }

    #[test]
    fn periods_parse_strictly() {
        assert_eq!(Period::parse("2026-03").unwrap().to_string(), "2026-03");
        for bad in [
            "2026-3",
            "2026-13",
            "2026-00",
            "26-03",
            "2026/03",
            "",
            "2026-03-01",
        ] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
        let p = Period::parse("2024-02").unwrap();
        assert_eq!(date(p.last_day()), "2024-02-29");
        assert_eq!(
            Period::parse("2025-12").unwrap().next().to_string(),
            "2026-01"
        );
        let now = datetime!(2026-03-15 12:00 UTC);
        assert!(Period::parse("2026-03").unwrap().check_started(now).is_ok());
        assert!(Period::parse("2026-04")
            .unwrap()
            .check_started(now)
            .is_err());
        assert!(Period::parse("2026-03").unwrap().check_ended(now).is_err());
        assert!(Period::parse("2026-02").unwrap().check_ended(now).is_ok());
        assert!(Period::parse("2026-02")
            .unwrap()
            .check_ended(datetime!(2026-03-01 0:00 UTC))
            .is_ok());
    }

    #[test]
    fn model_specific_then_latest_discount_wins() {
        let ds = vec![
            discount(None, "10", datetime!(2026-01-01 0:00 UTC)),
            discount(None, "20", datetime!(2026-02-01 0:00 UTC)),
            discount(Some("gpt"), "5", datetime!(2025-06-01 0:00 UTC)),
            // Starts after the period's start: not in force for 2026-03.
            discount(Some("gpt"), "50", datetime!(2026-03-02 0:00 UTC)),
        ];
        let at = datetime!(2026-03-01 0:00 UTC);
        assert_eq!(
            discount_in_force(&ds, "t1", "gpt", at).unwrap().percent,
            d("5")
        );
        assert_eq!(
            discount_in_force(&ds, "t1", "claude", at).unwrap().percent,
            d("20")
        );
        assert!(discount_in_force(&ds, "t2", "gpt", at).is_none());
        let mut ended = discount(None, "30", datetime!(2025-01-01 0:00 UTC));
        ended.effective_to = Some(at);
        assert!(discount_in_force(&[ended], "t1", "gpt", at).is_none());
    }

    #[test]
    fn invoices_round_each_line_and_sum_rounded_lines() {
        let p = Period::parse("2026-03").unwrap();
        let tenants = vec![tenant("t1", Some("pro")), tenant("t2", None)];
        let plans = vec![Plan {
            id: "pro".into(),
            name: "Pro".into(),
            monthly_fee: d("49.995"),
            currency: "USD".into(),
            rpm_limit: None,
            tpm_limit: None,
            monthly_spend_limit: None,
        }];
        let ds = vec![discount(None, "12.5", datetime!(2026-01-01 0:00 UTC))];
        let lines = vec![
            line("t1", "2026-03", "b-model", 2000, "1.234999"),
            line("t1", "2026-03", "b-model", 1000, "0.125"),
            line("t1", "2026-03", "a-model", -1, "0"),
            // Late usage of February: an adjustment, discounted at February's start.
            line("t1", "2026-02", "a-model", 1000, "10.005"),
            line("t2", "2026-03", "a-model", 1000, "3.3333333"),
        ];
        let invoices = build(&InvoiceInputs {
            period: p,
            tenants: &tenants,
            plans: &plans,
            discounts: &ds,
            lines: &lines,
            closed_at: Some(datetime!(2026-04-02 9:30 UTC)),
        });
        assert_eq!(invoices.len(), 2);
        let i = &invoices[0];
        assert_eq!(i.number, "TG-202603-t1");
        assert_eq!(i.status, InvoiceStatus::Final);
        assert_eq!(i.issue_date.as_deref(), Some("2026-04-02"));
        assert_eq!(
            (i.period_start.as_str(), i.period_end.as_str()),
            ("2026-03-01", "2026-03-31")
        );
        let got: Vec<(LineKind, &str, i64, String)> = i
            .lines
            .iter()
            .map(|l| {
                (
                    l.kind,
                    l.model.as_deref().unwrap_or("-"),
                    l.price_from_ms,
                    l.amount.to_string(),
                )
            })
            .collect();
        let want = vec![
            (LineKind::Usage, "a-model", -1, "0.00".to_string()),
            (LineKind::Usage, "b-model", 1000, "0.13".to_string()),
            (LineKind::Usage, "b-model", 2000, "1.23".to_string()),
            (LineKind::Adjustment, "a-model", 1000, "10.01".to_string()),
            // 12.5 % of the rounded amounts: 0, 0.01625, 0.15375, 1.25125.
            (LineKind::Discount, "a-model", 1000, "-1.25".to_string()),
            // No discount line on the unpriced usage: nothing to discount.
            (LineKind::Discount, "b-model", 1000, "-0.02".to_string()),
            (LineKind::Discount, "b-model", 2000, "-0.15".to_string()),
            (LineKind::PlanFee, "-", 0, "50.00".to_string()),
        ];
        assert_eq!(got, want);
        assert_eq!(i.subtotal.to_string(), "11.37");
        assert_eq!(i.discounts.to_string(), "-1.42");
        assert_eq!(i.plan_fee.to_string(), "50.00");
        assert_eq!(i.total.to_string(), "59.95");
        let q = i.lines[1].quantities.unwrap();
        assert_eq!(q.uncached_input_tokens, 700);
        assert!(i.lines[3].description.contains("adjustment for 2026-02"));
        let j = &invoices[1];
        assert_eq!(j.number, "TG-202603-t2");
        assert_eq!(j.total.to_string(), "3.33");
        assert_eq!(j.lines.len(), 1);
    }

    #[test]
    fn cache_hits_are_counted_on_their_line_and_their_savings_summed_apart() {
        let mut paid = line("t1", "2026-03", "gpt", 1_000, "1.004");
        paid.cache_hits = 2;
        paid.cache_savings = d("3.0149");
        // Only free hits: no token, no cost, but not a "no charge" line.
        let mut free = line("t1", "2026-03", "claude", 1_000, "0");
        (free.input_tokens, free.cached_input_tokens) = (0, 0);
        (free.cache_write_input_tokens, free.output_tokens) = (0, 0);
        (free.cache_hits, free.requests, free.cache_savings) = (3, 3, d("0.5"));
        let invoices = drafts(&[tenant("t1", None)], &[paid, free]);
        let inv = &invoices[0];
        assert_eq!(inv.lines.len(), 2, "{:?}", inv.lines);
        let gpt = inv
            .lines
            .iter()
            .find(|l| l.model.as_deref() == Some("gpt"))
            .unwrap();
        assert_eq!(gpt.amount, d("1.00"));
        assert_eq!(gpt.cache_savings, Some(d("3.01")));
        assert_eq!(gpt.quantities.unwrap().cache_hits, 2);
        assert!(gpt
            .description
            .contains("2 answered from the response cache, saving 3.01 USD"));
        let claude = inv
            .lines
            .iter()
            .find(|l| l.model.as_deref() == Some("claude"))
            .unwrap();
        assert_eq!(claude.kind, LineKind::Usage);
        assert_eq!(claude.amount, d("0.00"));
        assert_eq!(inv.cache_savings, d("3.51"));
        assert_eq!(inv.total, d("1.00"), "savings are not deducted again");
        let csv = render::csv(inv);
        assert!(
            csv.lines()
                .any(|l| l.ends_with(&format!(",cache_savings{}3.51,", ",".repeat(16)))),
            "{csv}"
        );
    }

    #[test]
    fn requests_without_usage_are_one_line_and_a_discount_starting_mid_period_is_noted() {
        let tenants = vec![tenant("t1", None)];
        let mut failed_a = line("t1", "2026-03", "a-model", 1000, "0");
        let mut failed_b = line("t1", "2026-03", "b-model", -1, "0");
        for l in [&mut failed_a, &mut failed_b] {
            (l.input_tokens, l.cached_input_tokens) = (0, 0);
            (l.cache_write_input_tokens, l.output_tokens) = (0, 0);
        }
        failed_b.requests = 4;
        // A discount before the period (applies) and one from its 10th (noted, not applied).
        let ds = vec![
            discount(Some("a-model"), "10", datetime!(2026-01-01 0:00 UTC)),
            discount(None, "50", datetime!(2026-03-10 12:00 UTC)),
        ];
        let lines = vec![
            line("t1", "2026-03", "a-model", 1000, "2.004"),
            failed_a,
            failed_b,
        ];
        let invoice = build(&InvoiceInputs {
            period: Period::parse("2026-03").unwrap(),
            tenants: &tenants,
            plans: &[],
            discounts: &ds,
            lines: &lines,
            closed_at: None,
        })
        .remove(0);
        let kinds: Vec<(LineKind, String)> = invoice
            .lines
            .iter()
            .map(|l| (l.kind, l.amount.to_string()))
            .collect();
        assert_eq!(
            kinds,
            [
                (LineKind::Usage, "2.00".to_string()),
                (LineKind::Discount, "-0.20".to_string()),
                (LineKind::NoCharge, "0.00".to_string()),
            ]
        );
        let no_charge = invoice.lines.last().unwrap();
        assert_eq!(no_charge.quantities.unwrap().requests, 7);
        assert!(no_charge.description.starts_with("7 requests"));
        assert_eq!(invoice.total.to_string(), "1.80");
        assert_eq!(invoice.notes.len(), 1, "{:?}", invoice.notes);
        assert!(invoice.notes[0].contains("50% discount on every model starts on 2026-03-10"));
        let csv = render::csv(&invoice);
        assert!(csv.lines().any(|l| l.contains(",note,")), "{csv}");
        assert!(render::html(&invoice).contains("starts on 2026-03-10"));
    }

    /// The draft invoices of 2026-03 for `lines` (no plans, no discounts).
    fn drafts(tenants: &[Tenant], lines: &[PriceLine]) -> Vec<Invoice> {
        build(&InvoiceInputs {
            period: Period::parse("2026-03").unwrap(),
            tenants,
            plans: &[],
            discounts: &[],
            lines,
            closed_at: None,
        })
    }

    /// One draft invoice of one usage line.
    pub(super) fn sample_invoice() -> Invoice {
        drafts(
            &[tenant("t1", None)],
            &[line("t1", "2026-03", "m", 1000, "1")],
        )
        .remove(0)
    }

    #[test]
    fn drafts_carry_no_issue_date_and_plan_fee_alone_makes_an_invoice() {
        let tenants = vec![tenant("t1", Some("pro"))];
        let plans = vec![Plan {
            id: "pro".into(),
            name: "Pro".into(),
            monthly_fee: d("10"),
            currency: "EUR".into(),
            rpm_limit: None,
            tpm_limit: None,
            monthly_spend_limit: None,
        }];
        let lines = vec![line("t1", "2026-03", "m", 1000, "1")];
        let invoices = build(&InvoiceInputs {
            period: Period::parse("2026-03").unwrap(),
            tenants: &tenants,
            plans: &plans,
            discounts: &[],
            lines: &lines,
            closed_at: None,
        });
        let numbers: Vec<&str> = invoices.iter().map(|i| i.number.as_str()).collect();
        assert_eq!(numbers, ["TG-202603-t1-EUR", "TG-202603-t1-USD"]);
        assert!(invoices
            .iter()
            .all(|i| i.status == InvoiceStatus::Draft && i.issue_date.is_none()));
        assert_eq!(invoices[0].total.to_string(), "10.00");
        assert_eq!(invoices[1].total.to_string(), "1.00");
    }
}
