//! The pre-flight estimate: prompt tokens (tiktoken, see [`crate::tokens`]) plus the output
//! the request may produce (its `max_tokens`, else `limits.default_max_output_tokens`),
//! priced with the price book at the highest price among the models that may serve it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use tollgate_schemas::pricing::{PriceRow, PriceSchedule};
use tollgate_schemas::TokenUsage;

use crate::error::GatewayError;
use crate::store::MetaStore;

/// How often the price book is re-read from the store.
const REFRESH: Duration = Duration::from_secs(30);

/// A request's pre-flight estimate.
#[derive(Debug, Clone, Default)]
pub struct Estimate {
    pub prompt_tokens: u64,
    pub max_output_tokens: u64,
    /// Whether the request itself caps its output at `max_output_tokens` (then the
    /// reservation covers the whole response and a stream never needs more).
    pub output_capped: bool,
    /// Upstream models that may serve the request (priced at the dearest).
    pub models: Vec<String>,
}

impl Estimate {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.max_output_tokens)
    }

    /// The estimate as usage, for pricing.
    pub fn usage(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.prompt_tokens,
            output_tokens: self.max_output_tokens,
            ..TokenUsage::default()
        }
    }
}

/// The price book, by model, as the pipeline bills it (tenant overrides, effective dates).
#[derive(Clone)]
pub struct PriceBook {
    by_model: Arc<RwLock<HashMap<String, PriceSchedule>>>,
}

impl PriceBook {
    /// Loads the book and keeps it fresh (re-read every 30 s).
    pub async fn load(store: Arc<dyn MetaStore>) -> Result<PriceBook, GatewayError> {
        let book = PriceBook {
            by_model: Arc::default(),
        };
        book.refresh(store.as_ref()).await?;
        let (weak, store) = (Arc::downgrade(&book.by_model), store);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                let Some(by_model) = weak.upgrade() else {
                    return;
                };
                let book = PriceBook { by_model };
                if let Err(e) = book.refresh(store.as_ref()).await {
                    tracing::warn!("price book refresh failed: {e}");
                }
            }
        });
        Ok(book)
    }

    /// A book from rows.
    #[cfg(test)]
    pub(crate) fn from_rows(rows: Vec<PriceRow>) -> PriceBook {
        let mut by_model: HashMap<String, Vec<PriceRow>> = HashMap::new();
        for r in rows {
            by_model.entry(r.model.clone()).or_default().push(r);
        }
        let book = by_model
            .into_iter()
            .map(|(m, rows)| (m, PriceSchedule::new(rows)))
            .collect();
        PriceBook {
            by_model: Arc::new(RwLock::new(book)),
        }
    }

    /// Re-reads the book from the store.
    pub async fn refresh(&self, store: &dyn MetaStore) -> Result<(), GatewayError> {
        let book = crate::store::price_schedules(store.list_prices(None).await?);
        *self.by_model.write() = book;
        Ok(())
    }

    /// The row in force now for `tenant_id` and `model`, if it is priced.
    pub fn lookup(&self, tenant_id: &str, model: &str) -> Option<PriceRow> {
        self.by_model
            .read()
            .get(model)
            .and_then(|s| s.lookup(tenant_id, now_ms()))
            .cloned()
    }

    /// The dearest row in force now for `tenant_id` among `models` (compared on the
    /// output price, then the input price).
    pub fn price(&self, tenant_id: &str, models: &[String]) -> Option<PriceRow> {
        let now = now_ms();
        let book = self.by_model.read();
        models
            .iter()
            .filter_map(|m| book.get(m).and_then(|s| s.lookup(tenant_id, now)))
            .max_by(|a, b| {
                (a.output_per_mtok, a.input_per_mtok).cmp(&(b.output_per_mtok, b.input_per_mtok))
            })
            .cloned()
    }
}

fn now_ms() -> i64 {
    tollgate_schemas::events::unix_ms(std::time::SystemTime::now())
}

/// The billing period (UTC month) now, as the pipeline names it.
pub fn current_period() -> String {
    tollgate_pipeline::fact::billing_period(now_ms())
}

/// What `usage` costs at `price`, in whole micro-units rounded up; a cost beyond the exact
/// range (absurd counts) is as much as can be counted, so that any spend limit refuses it.
pub fn cost_micros(price: &PriceRow, usage: &TokenUsage) -> u64 {
    price.cost(usage).map_or(u64::MAX, micros)
}

/// `amount` in whole micro-units, rounded up (never under-counts spend).
pub fn micros(amount: Decimal) -> u64 {
    amount
        .checked_mul(Decimal::from(1_000_000u32))
        .map_or(u64::MAX, |m| whole_micros(m.ceil()))
}

/// A limit in whole micro-units, rounded down (never allows more than the limit).
pub fn micros_floor(amount: Decimal) -> u64 {
    amount
        .checked_mul(Decimal::from(1_000_000u32))
        .map_or(u64::MAX, |m| whole_micros(m.floor()))
}

/// A whole number of micro-units; negative amounts are none, huge ones saturate.
fn whole_micros(scaled: Decimal) -> u64 {
    scaled.to_u64().unwrap_or(if scaled.is_sign_negative() {
        0
    } else {
        u64::MAX
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, tenant: Option<&str>, input: i64, output: i64) -> PriceRow {
        PriceRow {
            model: model.into(),
            tenant_id: tenant.map(str::to_string),
            effective_from_ms: 0,
            input_per_mtok: Decimal::new(input, 0),
            cached_input_per_mtok: Decimal::ZERO,
            output_per_mtok: Decimal::new(output, 0),
            currency: "USD".into(),
        }
    }

    #[test]
    fn micro_units_round_against_the_tenant_never_for_it() {
        assert_eq!(micros(Decimal::new(12_345_671, 7)), 1_234_568);
        assert_eq!(micros(Decimal::new(2, 0)), 2_000_000);
        assert_eq!(micros_floor(Decimal::new(12_345_679, 7)), 1_234_567);
        assert_eq!(micros(Decimal::new(-5, 0)), 0);
    }

    #[test]
    fn the_dearest_candidate_and_tenant_overrides_price_the_estimate() {
        let book = PriceBook::from_rows(vec![
            row("a", None, 1, 2),
            row("b", None, 3, 10),
            row("b", Some("t1"), 1, 1),
        ]);
        let models = vec!["a".to_string(), "b".to_string(), "missing".to_string()];
        assert_eq!(
            book.price("t2", &models).map(|r| r.output_per_mtok),
            Some(Decimal::new(10, 0))
        );
        assert_eq!(
            book.price("t1", &models).map(|r| r.output_per_mtok),
            Some(Decimal::new(2, 0))
        );
        assert!(book.price("t1", &["missing".to_string()]).is_none());
        let e = Estimate {
            prompt_tokens: 1000,
            max_output_tokens: 500,
            output_capped: true,
            models,
        };
        let cost = book.price("t2", &e.models).and_then(|p| p.cost(&e.usage()));
        // 1000 × 3 + 500 × 10 per million.
        assert_eq!(cost, Some(Decimal::new(8, 3)));
    }
}
