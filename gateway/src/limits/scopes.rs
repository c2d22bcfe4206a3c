//! Which limits apply to a request: the key's own, the tenant's (its `*` row, else its
//! plan's) and the tenant × model row for the requested model alias, each expanded into one
//! [`Check`] per limit that is set.

use crate::auth::Caller;
use crate::store::{Enforcement, KeyLimits, ALL_MODELS};

/// What a check counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Requests per minute.
    Requests,
    /// Input + output tokens per minute.
    Tokens,
    /// Requests in flight.
    Concurrency,
    /// Spend per billing period.
    Spend,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Requests => "requests_per_minute",
            Kind::Tokens => "tokens_per_minute",
            Kind::Concurrency => "concurrent_requests",
            Kind::Spend => "spend_per_period",
        }
    }

    /// The one-letter kind `reserve.lua` reads.
    pub(crate) fn code(self, ledger: bool) -> &'static str {
        match (self, ledger) {
            (Kind::Requests, _) => "r",
            (Kind::Tokens, _) => "t",
            (Kind::Concurrency, _) => "c",
            (Kind::Spend, false) => "s",
            (Kind::Spend, true) => "S",
        }
    }
}

/// Whose limit it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Tenant,
    TenantModel,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Tenant => "tenant",
            Scope::TenantModel => "tenant_model",
        }
    }
}

/// The tenant, billing period and currency of a balance the pipeline publishes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BalanceRef {
    pub tenant_id: String,
    pub period: String,
    pub currency: String,
    /// Its Redis key.
    pub key: String,
}

/// One limit to check.
#[derive(Debug, Clone)]
pub struct Check {
    pub scope: Scope,
    pub kind: Kind,
    /// The limit: requests, tokens, or micro-units of the currency.
    pub limit: u64,
    pub soft: bool,
    /// Base of this check's keys (Redis) or map entries (memory): unique per scope, kind
    /// and, for spend, billing period.
    pub key: String,
    /// For tenant-wide spend: the pipeline's balance, the authority.
    pub balance: Option<BalanceRef>,
    /// The model alias, for tenant × model checks (in messages).
    pub model: Option<String>,
}

/// Whether any limit could apply (no allocation: the common case of an unlimited key).
pub fn any_apply(caller: &Caller, model: &str) -> bool {
    !caller.limits.is_empty()
        || caller.plan_limits.as_ref().is_some_and(|l| !l.is_empty())
        || caller
            .tenant_limits
            .iter()
            .any(|l| (l.model == ALL_MODELS || l.model == model) && !l.limits.is_empty())
}

/// Every check for `caller` using `model` in billing `period`.
pub fn checks(caller: &Caller, model: &str, period: &str, prefix: &str) -> Vec<Check> {
    let mut out = Vec::new();
    let tenant = caller.tenant_id.as_str();
    let tag = |scope: &str| format!("{prefix}rl:{{{tenant}}}:{scope}");
    expand(
        &mut out,
        &caller.limits,
        Scope::Key,
        &tag(&format!("k:{}", caller.key_id)),
        None,
        period,
        None,
    );
    let tenant_wide = caller
        .tenant_limits
        .iter()
        .find(|l| l.model == ALL_MODELS)
        .map(|l| &l.limits)
        .or(caller.plan_limits.as_ref());
    if let Some(limits) = tenant_wide {
        let balance = BalanceRef {
            tenant_id: tenant.to_string(),
            period: period.to_string(),
            currency: caller.currency.clone(),
            key: tollgate_pipeline::sink::redis::balance_key(
                prefix,
                tenant,
                period,
                &caller.currency,
            ),
        };
        expand(
            &mut out,
            limits,
            Scope::Tenant,
            &tag("t"),
            Some(balance),
            period,
            None,
        );
    }
    if let Some(row) = caller.tenant_limits.iter().find(|l| l.model == model) {
        expand(
            &mut out,
            &row.limits,
            Scope::TenantModel,
            &tag(&format!("m:{model}")),
            None,
            period,
            Some(model),
        );
    }
    out
}

fn expand(
    out: &mut Vec<Check>,
    limits: &KeyLimits,
    scope: Scope,
    base: &str,
    balance: Option<BalanceRef>,
    period: &str,
    model: Option<&str>,
) {
    let soft = limits.enforcement == Enforcement::Soft;
    let positive = |v: Option<i64>| v.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0);
    let mut push = |kind: Kind, limit: u64, key: String, balance: Option<BalanceRef>| {
        out.push(Check {
            scope,
            kind,
            limit,
            soft,
            key,
            balance,
            model: model.map(str::to_string),
        })
    };
    if let Some(n) = positive(limits.rpm_limit) {
        push(Kind::Requests, n, format!("{base}:rpm"), None);
    }
    if let Some(n) = positive(limits.tpm_limit) {
        push(Kind::Tokens, n, format!("{base}:tpm"), None);
    }
    if let Some(n) = positive(limits.max_concurrent) {
        push(Kind::Concurrency, n, format!("{base}:conc"), None);
    }
    if let Some(amount) = limits.spend_limit {
        push(
            Kind::Spend,
            super::estimate::micros_floor(amount),
            format!("{base}:spend:{period}"),
            balance,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TenantLimit;
    use rust_decimal::Decimal;

    fn caller() -> Caller {
        let mut c = Caller::for_tests("ten_1", "key_1");
        c.limits.rpm_limit = Some(10);
        c.plan_limits = Some(KeyLimits {
            tpm_limit: Some(1000),
            spend_limit: Some(Decimal::new(5, 0)),
            ..KeyLimits::default()
        });
        c
    }

    #[test]
    fn plan_limits_apply_without_a_tenant_row() {
        let c = caller();
        let checks = checks(&c, "gpt-4o", "2026-11", "tg:");
        let kinds: Vec<_> = checks.iter().map(|c| (c.scope, c.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (Scope::Key, Kind::Requests),
                (Scope::Tenant, Kind::Tokens),
                (Scope::Tenant, Kind::Spend)
            ]
        );
        assert_eq!(checks[2].limit, 5_000_000);
        assert_eq!(checks[2].key, "tg:rl:{ten_1}:t:spend:2026-11");
        assert_eq!(
            checks[2].balance.as_ref().map(|b| b.key.as_str()),
            Some("tg:balance:ten_1:2026-11:USD")
        );
    }

    #[test]
    fn a_tenant_row_replaces_the_plan_and_model_rows_add_checks() {
        let mut c = caller();
        c.tenant_limits = vec![
            TenantLimit {
                tenant_id: "ten_1".into(),
                model: "*".into(),
                limits: KeyLimits {
                    max_concurrent: Some(2),
                    enforcement: Enforcement::Soft,
                    ..KeyLimits::default()
                },
            },
            TenantLimit {
                tenant_id: "ten_1".into(),
                model: "gpt-4o".into(),
                limits: KeyLimits {
                    tpm_limit: Some(50),
                    ..KeyLimits::default()
                },
            },
        ];
        let for_4o = checks(&c, "gpt-4o", "2026-11", "tg:");
        let kinds: Vec<_> = for_4o.iter().map(|c| (c.scope, c.kind, c.soft)).collect();
        assert_eq!(
            kinds,
            vec![
                (Scope::Key, Kind::Requests, false),
                (Scope::Tenant, Kind::Concurrency, true),
                (Scope::TenantModel, Kind::Tokens, false)
            ]
        );
        assert_eq!(checks(&c, "other", "2026-11", "tg:").len(), 2);
    }
}
