//! What flows through the dataflow: a completion event reduced to what billing and analytics
//! need ([`Fact`]), the same with its price ([`PricedFact`]), and the monoid the aggregates
//! add up ([`Totals`]).

use std::borrow::Cow;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_schemas::events::{parse_event_time, unix_ms, CompletionStatus};
use tollgate_schemas::pricing::PriceRow;
use tollgate_schemas::usage::MAX_TOKENS_PER_COUNT;
use tollgate_schemas::TokenUsage;

/// One message read from a source partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceRecord {
    pub partition: u32,
    pub offset: i64,
    /// The message timestamp (event time), ms since the Unix epoch.
    pub timestamp_ms: i64,
    pub payload: Vec<u8>,
    /// Read again only to remember its event id (it was billed before the last restart).
    pub replay_only: bool,
}

/// A message that could not be billed; kept in the ledger, never dropped silently.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Reject {
    pub partition: u32,
    pub offset: i64,
    pub reason: String,
    pub payload: String,
}

/// How a request ended, as a small ordered value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Completed,
    ClientDisconnected,
    UpstreamError,
    /// Cut off by a hard limit of the caller (billed like a disconnect).
    LimitExceeded,
    /// Recovered by the pipeline: the gateway died mid-request (see [`crate::recovery`]).
    GatewayLost,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::LimitExceeded => "limit_exceeded",
            Outcome::GatewayLost => "gateway_lost",
        }
    }
}

impl From<CompletionStatus> for Outcome {
    fn from(s: CompletionStatus) -> Outcome {
        match s {
            CompletionStatus::Completed => Outcome::Completed,
            CompletionStatus::ClientDisconnected => Outcome::ClientDisconnected,
            CompletionStatus::UpstreamError => Outcome::UpstreamError,
            CompletionStatus::LimitExceeded => Outcome::LimitExceeded,
            CompletionStatus::GatewayLost => Outcome::GatewayLost,
        }
    }
}

/// A billed completion with every dimension analytics keeps: one `request_facts` row (and
/// the shape of the facts in the ledger's analytics outbox, so it must stay compatible).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fact {
    /// The event id (UUIDv7) as a number: duplicates share it.
    pub event_id: u128,
    pub event_ms: i64,
    pub received_ms: i64,
    pub tenant_id: String,
    pub key_id: String,
    pub request_id: String,
    pub route: String,
    pub requested_model: String,
    /// The model priced and reported: the model name the upstream served.
    pub model: String,
    pub provider: String,
    pub deployment: String,
    pub stream: bool,
    pub outcome: Outcome,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_input_tokens: u64,
    pub output_tokens: u64,
    pub usage_counted: bool,
    pub ttft_ms: Option<u64>,
    pub latency_ms: u64,
    pub retries: u32,
    pub fallbacks: u32,
    pub partition: u32,
    pub offset: i64,
}

impl Fact {
    pub fn usage(&self) -> TokenUsage {
        usage(
            [
                self.input_tokens,
                self.cached_input_tokens,
                self.cache_write_input_tokens,
                self.output_tokens,
            ],
            self.usage_counted,
        )
    }
}

fn usage(tokens: [u64; 4], counted: bool) -> TokenUsage {
    TokenUsage {
        input_tokens: tokens[0],
        cached_input_tokens: tokens[1],
        cache_write_input_tokens: tokens[2],
        output_tokens: tokens[3],
        source: if counted {
            tollgate_schemas::UsageSource::Counted
        } else {
            tollgate_schemas::UsageSource::Provider
        },
    }
}

/// A completion event as the dataflow carries it: only what billing reads (two strings, ~130
/// bytes), so that parsing allocates little and moving it between operators is cheap. The
/// dimensions only analytics reads ride along in `details`, parsed only when an analytics
/// sink is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The event id (UUIDv7) as a number: duplicates share it.
    pub event_id: u128,
    /// The request id as a number ([`request_key`]): a recovered completion and the real one
    /// of the same request share it.
    pub request_key: u128,
    /// Recovered by the pipeline (`usage.source = recovered`), not written by the gateway.
    pub recovered: bool,
    /// A retraction: this completion was billed before and is taken back (its contribution
    /// is subtracted), because the real completion of its request replaced it.
    pub retract: bool,
    pub event_ms: i64,
    pub tenant_id: String,
    /// The model priced and reported: the model name the upstream served.
    pub model: String,
    pub outcome: Outcome,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_input_tokens: u64,
    pub output_tokens: u64,
    pub usage_counted: bool,
    pub ttft_ms: Option<u64>,
    /// Answered from a response cache: what the answer would have cost, and the part billed.
    pub cache: Option<Box<CacheHit>>,
    pub details: Option<Box<Details>>,
}

/// A cache hit's billing: the original answer's usage, priced like a completion's, and the
/// fraction of that price billed; the rest is what the hit saved the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHit {
    pub saved: TokenUsage,
    #[serde(with = "rust_decimal::serde::str")]
    pub fraction: Decimal,
}

impl CacheHit {
    /// From a completion event's fields ([`tollgate_schemas::pricing::cache_hit_terms`]);
    /// `Err` says why they cannot be billed.
    fn parse(
        hit: bool,
        saved: Option<&TokenUsage>,
        fraction: Option<&str>,
    ) -> Result<Option<Box<CacheHit>>, String> {
        Ok(
            tollgate_schemas::pricing::cache_hit_terms(hit, saved, fraction)?
                .map(|(saved, fraction)| Box::new(CacheHit { saved, fraction })),
        )
    }
}

/// The dimensions of a completion that only analytics reads (see [`Fact`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    pub received_ms: i64,
    pub key_id: String,
    pub request_id: String,
    pub route: String,
    pub requested_model: String,
    pub provider: String,
    pub deployment: String,
    pub stream: bool,
    pub latency_ms: u64,
    pub retries: u32,
    pub fallbacks: u32,
    pub partition: u32,
    pub offset: i64,
}

/// Longest time to first token or latency kept (a week): analytics sums stay in range
/// whatever a producer writes. Billing does not use them.
const MAX_DURATION_MS: u64 = 7 * 86_400_000;

impl Completion {
    /// Parses a `llm.completions` message, with its [`Details`] if `with_details`; `Err` says
    /// why it cannot be billed (the same checks either way).
    pub fn parse(record: &SourceRecord, with_details: bool) -> Result<Completion, String> {
        let event: CompletionWire<'_> = serde_json::from_slice(&record.payload)
            .map_err(|e| format!("not a completion event: {e}"))?;
        if event.schema_version != tollgate_schemas::events::SCHEMA_VERSION {
            return Err(format!(
                "unsupported schema_version {}",
                event.schema_version
            ));
        }
        let event_id = uuid::Uuid::parse_str(&event.event_id)
            .map_err(|e| format!("event_id is not a UUID: {e}"))?
            .as_u128();
        let time = |s: &str, field: &str| {
            fast_event_ms(s)
                .or_else(|| parse_event_time(s).map(unix_ms))
                .ok_or_else(|| format!("{field} is not an RFC 3339 time: {s:?}"))
        };
        let event_ms = time(&event.event_time, "event_time")?;
        let received_ms = time(&event.received_at, "received_at")?;
        if event.tenant_id.is_empty() {
            return Err("tenant_id is empty".into());
        }
        let u = event.usage;
        for (field, n) in [
            ("input_tokens", u.input_tokens),
            ("cached_input_tokens", u.cached_input_tokens),
            ("cache_write_input_tokens", u.cache_write_input_tokens),
            ("output_tokens", u.output_tokens),
        ] {
            if n > MAX_TOKENS_PER_COUNT {
                return Err(format!(
                    "usage.{field} = {n} is above the most a completion may count ({MAX_TOKENS_PER_COUNT})"
                ));
            }
        }
        let cache = CacheHit::parse(
            event.cache_hit,
            event.cache_saved_usage.as_ref(),
            event.cache_price_fraction.as_deref(),
        )?;
        let request_key = request_key(&event.request_id);
        let details = with_details.then(|| {
            Box::new(Details {
                received_ms,
                key_id: event.key_id.into_owned(),
                request_id: event.request_id.into_owned(),
                route: event.route.into_owned(),
                requested_model: event.requested_model.into_owned(),
                provider: event.provider.into_owned(),
                deployment: event.deployment.into_owned(),
                stream: event.stream,
                latency_ms: event.latency_ms.min(MAX_DURATION_MS),
                retries: event.retries,
                fallbacks: event.fallbacks,
                partition: record.partition,
                offset: record.offset,
            })
        });
        Ok(Completion {
            event_id,
            request_key,
            recovered: u.source == tollgate_schemas::UsageSource::Recovered,
            retract: false,
            event_ms,
            tenant_id: event.tenant_id.into_owned(),
            model: event.upstream_model.into_owned(),
            outcome: event.status.into(),
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            cache_write_input_tokens: u.cache_write_input_tokens,
            output_tokens: u.output_tokens,
            usage_counted: u.source != tollgate_schemas::UsageSource::Provider,
            ttft_ms: event.ttft_ms.map(|ms| ms.min(MAX_DURATION_MS)),
            cache,
            details,
        })
    }

    pub fn usage(&self) -> TokenUsage {
        usage(self.tokens(), self.usage_counted)
    }

    fn tokens(&self) -> [u64; 4] {
        [
            self.input_tokens,
            self.cached_input_tokens,
            self.cache_write_input_tokens,
            self.output_tokens,
        ]
    }

    /// The whole [`Fact`] (for analytics), if this completion was parsed with its details.
    pub fn into_fact(self) -> Option<Fact> {
        let d = *self.details?;
        Some(Fact {
            event_id: self.event_id,
            event_ms: self.event_ms,
            received_ms: d.received_ms,
            tenant_id: self.tenant_id,
            key_id: d.key_id,
            request_id: d.request_id,
            route: d.route,
            requested_model: d.requested_model,
            model: self.model,
            provider: d.provider,
            deployment: d.deployment,
            stream: d.stream,
            outcome: self.outcome,
            input_tokens: self.input_tokens,
            cached_input_tokens: self.cached_input_tokens,
            cache_write_input_tokens: self.cache_write_input_tokens,
            output_tokens: self.output_tokens,
            usage_counted: self.usage_counted,
            ttft_ms: self.ttft_ms,
            latency_ms: d.latency_ms,
            retries: d.retries,
            fallbacks: d.fallbacks,
            partition: d.partition,
            offset: d.offset,
        })
    }
}

/// A request id as a number, the key completions of one request are deduplicated and routed
/// by: the gateway's ids (`req_` and a UUID in 32 hex digits) are that UUID; any other form
/// is hashed (128-bit FNV-1a: stable across processes and builds).
pub fn request_key(request_id: &str) -> u128 {
    if let Some(hex) = request_id.strip_prefix("req_") {
        if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Ok(v) = u128::from_str_radix(hex, 16) {
                return v;
            }
        }
    }
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    request_id
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

/// The fields of a `llm.completions` event that billing reads ([`tollgate_schemas::events::CompletionEvent`] is the
/// full contract), all required. Strings are borrowed from the message when they contain no
/// escapes: only the ones kept are copied (two without analytics).
#[derive(Deserialize)]
struct CompletionWire<'a> {
    schema_version: u32,
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    event_time: Cow<'a, str>,
    #[serde(borrow)]
    received_at: Cow<'a, str>,
    #[serde(borrow)]
    tenant_id: Cow<'a, str>,
    #[serde(borrow)]
    key_id: Cow<'a, str>,
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    #[serde(borrow)]
    route: Cow<'a, str>,
    #[serde(borrow)]
    requested_model: Cow<'a, str>,
    #[serde(borrow)]
    upstream_model: Cow<'a, str>,
    #[serde(borrow)]
    provider: Cow<'a, str>,
    #[serde(borrow)]
    deployment: Cow<'a, str>,
    stream: bool,
    status: CompletionStatus,
    usage: TokenUsage,
    ttft_ms: Option<u64>,
    latency_ms: u64,
    retries: u32,
    fallbacks: u32,
    #[serde(default)]
    cache_hit: bool,
    #[serde(default)]
    cache_saved_usage: Option<TokenUsage>,
    #[serde(default, borrow)]
    cache_price_fraction: Option<Cow<'a, str>>,
}

/// Parses the gateway's own `event_time` shape (`YYYY-MM-DDTHH:MM:SS.mmmZ`) without a general
/// RFC 3339 parser; `None` for anything else (the caller then uses the general one).
fn fast_event_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        b[from..to].iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second, milli) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let date = time::Date::from_calendar_date(
        i32::try_from(year).ok()?,
        time::Month::try_from(u8::try_from(month).ok()?).ok()?,
        u8::try_from(day).ok()?,
    )
    .ok()?;
    let days = i64::from(date.to_julian_day()) - 2_440_588; // 1970-01-01
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli)
}

/// A fact with the price that applied at its event time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PricedFact {
    pub fact: Fact,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    pub currency: String,
    /// `effective_from` of the price row used; `None` when no price applied.
    pub price_from_ms: Option<i64>,
    /// Whether a tenant override (not the list price) applied.
    pub price_override: bool,
    /// The unit prices applied (per million tokens; zero when unpriced).
    #[serde(default)]
    pub unit: UnitPrices,
    /// A cache hit: what it saved the tenant (the part of the original answer's price not
    /// billed; zero when unpriced). `None` for any other completion: `Some` says it is a hit.
    #[serde(default)]
    pub cache_savings: Option<Decimal>,
}

/// Prices per million tokens, as applied to one completion.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct UnitPrices {
    #[serde(with = "rust_decimal::serde::str")]
    pub input_per_mtok: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub cached_input_per_mtok: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub output_per_mtok: Decimal,
}

impl UnitPrices {
    /// The unit prices of a price-book row.
    pub fn of(p: &PriceRow) -> UnitPrices {
        UnitPrices {
            input_per_mtok: p.input_per_mtok,
            cached_input_per_mtok: p.cached_input_per_mtok,
            output_per_mtok: p.output_per_mtok,
        }
    }
}

/// The currency of unpriced completions.
pub const DEFAULT_CURRENCY: &str = "USD";

impl PricedFact {
    /// A fact with `price`'s cost of its usage and, for a cache hit, what it saved (computed
    /// by the caller).
    pub fn with_cost(
        fact: Fact,
        price: Option<&PriceRow>,
        cost: Decimal,
        cache_savings: Option<Decimal>,
    ) -> PricedFact {
        match price {
            Some(p) => PricedFact {
                cost,
                currency: p.currency.clone(),
                price_from_ms: Some(p.effective_from_ms),
                price_override: p.tenant_id.is_some(),
                unit: UnitPrices::of(p),
                fact,
                cache_savings,
            },
            None => PricedFact {
                fact,
                cost: Decimal::ZERO,
                currency: DEFAULT_CURRENCY.to_string(),
                price_from_ms: None,
                price_override: false,
                unit: UnitPrices::default(),
                cache_savings,
            },
        }
    }

    /// Key of the per tenant × model × minute aggregate.
    pub fn minute_key(&self) -> MinuteKey {
        MinuteKey {
            tenant_id: self.fact.tenant_id.clone(),
            model: self.fact.model.clone(),
            minute_ms: self.fact.event_ms.div_euclid(60_000) * 60_000,
            currency: self.currency.clone(),
        }
    }

    /// This completion's contribution to any aggregate.
    pub fn totals(&self) -> Totals {
        let f = &self.fact;
        let mut t = Totals::default();
        t.count(
            [
                f.input_tokens,
                f.cached_input_tokens,
                f.cache_write_input_tokens,
                f.output_tokens,
            ],
            f.outcome,
            f.ttft_ms,
            &self.cost,
            self.price_from_ms.is_some(),
            self.cache_savings.as_ref(),
        );
        t
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The billing period of an instant: its calendar month in UTC, `YYYY-MM`.
pub fn billing_period(ms: i64) -> String {
    let (year, month) = year_month(ms);
    format!("{year:04}-{month:02}")
}

/// The calendar month (UTC) of an instant: (year, 1..=12).
pub fn year_month(ms: i64) -> (i32, u8) {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    (t.year(), u8::from(t.month()))
}

/// Upper bounds (inclusive, ms) of the time-to-first-token buckets; the last bucket is open.
pub const TTFT_BUCKETS_MS: [u64; 7] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000];

fn ttft_bucket(ms: u64) -> usize {
    TTFT_BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(TTFT_BUCKETS_MS.len())
}

/// Per tenant × model × minute.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MinuteKey {
    pub tenant_id: String,
    pub model: String,
    /// Start of the minute, ms since the Unix epoch.
    pub minute_ms: i64,
    pub currency: String,
}

/// Per tenant × billing period (of the event) × model × price in force: what invoice lines
/// are made of. The ledger books a line into a later period when its own is closed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LineKey {
    pub tenant_id: String,
    /// `YYYY-MM` of the completions' event time.
    pub period: String,
    pub model: String,
    pub currency: String,
    /// `effective_from` of the price row; -1 for unpriced completions.
    pub price_from_ms: i64,
    pub price_override: bool,
    pub unit: UnitPrices,
}

/// Per tenant × billing period.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeriodKey {
    pub tenant_id: String,
    /// `YYYY-MM`.
    pub period: String,
    pub currency: String,
}

/// Sums over completions: what every aggregate keeps. A commutative group, so it can also
/// serve as a differential dataflow difference (added, retracted, consolidated).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Totals {
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_input_tokens: i64,
    pub output_tokens: i64,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    pub errors: i64,
    pub client_disconnects: i64,
    pub unpriced: i64,
    pub ttft_count: i64,
    pub ttft_sum_ms: i64,
    /// Completions per [`TTFT_BUCKETS_MS`] bucket (last: above the largest bound).
    pub ttft_buckets: [i64; 8],
    /// Completions answered from a response cache (also in `requests`).
    #[serde(default)]
    pub cache_hits: i64,
    /// What those hits saved: the part of their original answers' price not billed.
    #[serde(default, with = "rust_decimal::serde::str")]
    pub cache_savings: Decimal,
}

impl Totals {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.cache_write_input_tokens += other.cache_write_input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost += other.cost;
        self.errors += other.errors;
        self.client_disconnects += other.client_disconnects;
        self.unpriced += other.unpriced;
        self.ttft_count += other.ttft_count;
        self.ttft_sum_ms += other.ttft_sum_ms;
        for (a, b) in self.ttft_buckets.iter_mut().zip(other.ttft_buckets.iter()) {
            *a += b;
        }
        self.cache_hits += other.cache_hits;
        self.cache_savings += other.cache_savings;
    }

    /// Adds one completion: its tokens (input, cached input, cache-write input, output), how
    /// it ended, its time to first token, its cost, whether a price applied and, for a cache
    /// hit, what it saved.
    pub fn count(
        &mut self,
        tokens: [u64; 4],
        outcome: Outcome,
        ttft_ms: Option<u64>,
        cost: &Decimal,
        priced: bool,
        cache_savings: Option<&Decimal>,
    ) {
        if let Some(saved) = cache_savings {
            self.cache_hits += 1;
            self.cache_savings += saved;
        }
        self.requests += 1;
        self.input_tokens += to_i64(tokens[0]);
        self.cached_input_tokens += to_i64(tokens[1]);
        self.cache_write_input_tokens += to_i64(tokens[2]);
        self.output_tokens += to_i64(tokens[3]);
        self.cost += cost;
        self.errors += i64::from(outcome == Outcome::UpstreamError);
        self.client_disconnects += i64::from(outcome == Outcome::ClientDisconnected);
        self.unpriced += i64::from(!priced);
        if let Some(ms) = ttft_ms {
            self.ttft_count += 1;
            self.ttft_sum_ms += to_i64(ms);
            self.ttft_buckets[ttft_bucket(ms)] += 1;
        }
    }

    fn scale(&mut self, k: i64) {
        self.requests *= k;
        self.input_tokens *= k;
        self.cached_input_tokens *= k;
        self.cache_write_input_tokens *= k;
        self.output_tokens *= k;
        self.cost *= Decimal::from(k);
        self.errors *= k;
        self.client_disconnects *= k;
        self.unpriced *= k;
        self.ttft_count *= k;
        self.ttft_sum_ms *= k;
        for a in self.ttft_buckets.iter_mut() {
            *a *= k;
        }
        self.cache_hits *= k;
        self.cache_savings *= Decimal::from(k);
    }
}

impl differential_dataflow::difference::IsZero for Totals {
    fn is_zero(&self) -> bool {
        // Decimal equality is numeric: 0.00 equals 0.
        *self == Totals::default()
    }
}

impl differential_dataflow::difference::Semigroup for Totals {
    fn plus_equals(&mut self, rhs: &Self) {
        self.add(rhs);
    }
}

impl differential_dataflow::difference::Monoid for Totals {
    fn zero() -> Self {
        Totals::default()
    }
}

impl differential_dataflow::difference::Abelian for Totals {
    fn negate(&mut self) {
        self.scale(-1);
    }
}

impl differential_dataflow::difference::Multiply<isize> for Totals {
    type Output = Totals;
    fn multiply(mut self, rhs: &isize) -> Totals {
        self.scale(i64::try_from(*rhs).unwrap_or(i64::MAX));
        self
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_fast_event_time_parser_agrees_with_rfc3339() {
        for ms in [
            0i64,
            1_772_323_199_999,
            1_772_323_200_000,
            1_795_750_320_007,
            951_782_400_123,
        ] {
            let t = std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_millis(u64::try_from(ms).unwrap());
            let s = tollgate_schemas::events::format_event_time(t);
            assert_eq!(fast_event_ms(&s), Some(ms), "{s}");
        }
        assert_eq!(fast_event_ms("2026-11-27T04:00:00Z"), None);
        assert_eq!(fast_event_ms("2026-13-27T04:00:00.000Z"), None);
    }

    #[test]
    fn request_keys_are_the_uuid_of_gateway_ids_and_a_hash_otherwise() {
        assert_eq!(
            request_key("req_0192f0c2a1b27c3d8e9f001122334455"),
            0x0192f0c2a1b27c3d8e9f001122334455
        );
        let other = request_key("req_0192f0c2-a1b2-7c3d-8e9f-001122334455");
        assert_eq!(
            other,
            request_key("req_0192f0c2-a1b2-7c3d-8e9f-001122334455")
        );
        assert_ne!(
            other,
            request_key("req_0192f0c2-a1b2-7c3d-8e9f-001122334456")
        );
        assert_ne!(request_key("a"), request_key("b"));
    }

    #[test]
    fn billing_period_is_the_utc_month() {
        assert_eq!(billing_period(0), "1970-01");
        // 2026-02-28T23:59:59.999Z and the next millisecond.
        assert_eq!(billing_period(1_772_323_199_999), "2026-02");
        assert_eq!(billing_period(1_772_323_200_000), "2026-03");
    }

    #[test]
    fn totals_form_a_group() {
        use differential_dataflow::difference::{Abelian, IsZero, Semigroup};
        let mut a = Totals {
            requests: 2,
            cost: Decimal::new(15, 1),
            ttft_buckets: [1, 0, 0, 0, 0, 0, 0, 1],
            ..Totals::default()
        };
        let mut minus = a.clone();
        minus.negate();
        a.plus_equals(&minus);
        assert!(a.is_zero());
        assert!(!minus.is_zero());
    }
}
