//! `GET /v1/usage`: the caller's tenant's tokens and cost for a billing period (a calendar
//! month, UTC; `?period=YYYY-MM`, default the current one), in total, by model and by day,
//! read from the ledger the billing pipeline writes. Cache hits are counted in `requests`
//! and `cost` (at the fraction billed) and apart in `cache_hits` and `cache_savings`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;
use time::{Date, Month, OffsetDateTime, Time};

use super::caller::TenantCaller;
use super::query::OpenAiQuery;
use crate::api::WireFormat;
use crate::app::AppState;
use crate::error::{ApiError, GatewayError, InFormat};
use crate::store::UsageRow;

/// `?period=YYYY-MM`; anything else is refused (a `tenant` parameter would suggest another
/// tenant's usage could be asked for: the caller's key decides the tenant).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    period: Option<String>,
}

/// First instants of the month `period` (`YYYY-MM`) and of the next month.
pub fn period_bounds(period: &str) -> Result<(OffsetDateTime, OffsetDateTime), GatewayError> {
    let bad =
        || GatewayError::bad_param(format!("period must be YYYY-MM, got `{period}`"), "period");
    let (y, m) = period.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let year: i32 = y.parse().map_err(|_| bad())?;
    let month = Month::try_from(m.parse::<u8>().map_err(|_| bad())?).map_err(|_| bad())?;
    let start = Date::from_calendar_date(year, month, 1).map_err(|_| bad())?;
    let (ny, nm) = if month == Month::December {
        (year + 1, Month::January)
    } else {
        (year, month.next())
    };
    let end = Date::from_calendar_date(ny, nm, 1).map_err(|_| bad())?;
    Ok((
        start.with_time(Time::MIDNIGHT).assume_utc(),
        end.with_time(Time::MIDNIGHT).assume_utc(),
    ))
}

#[derive(Default)]
struct Totals {
    requests: i64,
    input_tokens: i64,
    cached_input_tokens: i64,
    output_tokens: i64,
    cost: Decimal,
    cache_hits: i64,
    cache_savings: Decimal,
}

impl Totals {
    fn add(&mut self, r: &UsageRow) {
        self.requests += r.requests;
        self.input_tokens += r.input_tokens;
        self.cached_input_tokens += r.cached_input_tokens;
        self.output_tokens += r.output_tokens;
        self.cost += r.cost;
        self.cache_hits += r.cache_hits;
        self.cache_savings += r.cache_savings;
    }

    fn json(&self) -> serde_json::Value {
        json!({"requests": self.requests, "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens, "output_tokens": self.output_tokens,
            "cost": self.cost.normalize().to_string(), "cache_hits": self.cache_hits,
            "cache_savings": self.cache_savings.normalize().to_string()})
    }
}

pub async fn usage(
    State(state): State<Arc<AppState>>,
    TenantCaller(caller): TenantCaller,
    OpenAiQuery(q): OpenAiQuery<UsageQuery>,
) -> Result<Response, ApiError> {
    let now = OffsetDateTime::now_utc();
    let period = q
        .period
        .unwrap_or_else(|| format!("{:04}-{:02}", now.year(), u8::from(now.month())));
    let (from, to) = period_bounds(&period).in_format(WireFormat::OpenAi)?;
    let rows = state
        .store
        .usage(&caller.tenant_id, from, to)
        .await
        .map_err(GatewayError::from)
        .in_format(WireFormat::OpenAi)?;
    let mut total = Totals::default();
    let mut by_model: BTreeMap<&str, Totals> = BTreeMap::new();
    let mut by_day: BTreeMap<(Date, &str), Totals> = BTreeMap::new();
    for r in &rows {
        total.add(r);
        by_model.entry(&r.model).or_default().add(r);
        by_day
            .entry((r.minute.date(), &r.model))
            .or_default()
            .add(r);
    }
    let currency = rows.first().map_or("USD", |r| r.currency.as_str());
    Ok(Json(json!({
        "object": "usage",
        "tenant_id": caller.tenant_id,
        "period": period,
        "start": from.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "end": to.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "currency": currency,
        "total": total.json(),
        "by_model": by_model.iter().map(|(m, t)| { let mut v = t.json(); v["model"] = json!(m); v }).collect::<Vec<_>>(),
        "by_day": by_day.iter().map(|((d, m), t)| { let mut v = t.json(); v["date"] = json!(d.to_string()); v["model"] = json!(m); v }).collect::<Vec<_>>(),
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_period_is_a_parameter() {
        let parse = |q: &str| {
            let uri: axum::http::Uri = format!("/v1/usage{q}").parse().unwrap();
            super::super::query::parse::<UsageQuery>(&uri)
        };
        assert_eq!(
            parse("?period=2026-12").unwrap().period.as_deref(),
            Some("2026-12")
        );
        assert!(parse("").unwrap().period.is_none());
        for bad in ["?tenant=other", "?period=2026-12&tenant_id=x", "?month=12"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn periods_are_calendar_months() {
        let (a, b) = period_bounds("2026-12").unwrap();
        assert_eq!(a.date().to_string(), "2026-12-01");
        assert_eq!(b.date().to_string(), "2027-01-01");
        for bad in ["2026-13", "2026-1", "26-01", "x", "2026-00"] {
            assert!(period_bounds(bad).is_err(), "{bad}");
        }
    }
}
