//! `envoy.service.ratelimit.v3.RateLimitService`: Envoy's rate-limit filter asks whether a
//! request's descriptors are within their limits.
//!
//! Descriptors are built by Envoy from the identity headers ext_authz set
//! (`deploy/envoy/envoy.yaml`); their entries:
//!
//! | entry | value | meaning |
//! |---|---|---|
//! | `credential` | `x-tollgate-key-hash` | whose limits (resolved through the key cache); required |
//! | `tenant` | `x-tollgate-tenant` | checked against the key's tenant |
//! | `key` | `x-tollgate-key-id` | present: the key's own limit; absent: the tenant's |
//! | `usage` | `tokens` | tokens per minute: `hits_addend` tokens counted if they fit (0 only reads: refused once the minute is full); absent: requests per minute |
//! | `usage` | `tokens_used` | tokens per minute: what a finished request used (`hits_addend`, sent by Envoy when the stream ends), counted whatever the window holds and never refused |
//!
//! The limits are the ones the HTTP path enforces (the key's `rpm_limit`/`tpm_limit`, the
//! tenant's `*` row or plan), counted by the same limiter (memory or Redis) over the same
//! sliding minute, on the edge's own counters ([`Limiter::count_at_edge`]). A descriptor
//! without a limit is `OK`. A refusal carries OpenAI's `x-ratelimit-*` headers (the tightest
//! descriptor of each kind), `retry-after` and the 429 body the HTTP path would send; an
//! allowed request gets those headers from the gateway that serves it. Per-descriptor
//! statuses feed Envoy's own `x-ratelimit-limit/remaining/reset` headers.
//!
//! With more than one gateway the limiter must be shared (`limits.backend = "redis"`): Envoy
//! spreads its calls over every gateway's service, and in-memory counts would be per gateway.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit as Limit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use super::EdgeMetrics;
use crate::api::WireFormat;
use crate::auth::Authenticator;
use crate::error::GatewayError;
use crate::limits::{EdgeCount, EdgeHits, Kind, Limiter, Scope};

/// The generated server types.
pub mod pb {
    pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
        RateLimitService, RateLimitServiceServer,
    };
}

/// The RateLimitService.
pub struct RateLimit {
    auth: Arc<Authenticator>,
    limiter: Arc<Limiter>,
    metrics: EdgeMetrics,
}

/// What one descriptor asks about.
#[derive(Debug, PartialEq, Eq)]
struct Asked<'a> {
    credential: &'a str,
    tenant: Option<&'a str>,
    key: Option<&'a str>,
    scope: Scope,
    kind: Kind,
    /// `usage = tokens_used`: a record of tokens used, not a question.
    record: bool,
}

/// Reads a descriptor's entries; `None` when it names no credential (not one of ours).
fn asked(d: &RateLimitDescriptor) -> Option<Asked<'_>> {
    let entries: HashMap<&str, &str> = d
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    let key = entries.get("key").copied();
    let usage = entries.get("usage").copied();
    Some(Asked {
        credential: entries
            .get("credential")
            .copied()
            .filter(|c| !c.is_empty())?,
        tenant: entries.get("tenant").copied(),
        key,
        scope: if key.is_some() {
            Scope::Key
        } else {
            Scope::Tenant
        },
        kind: match usage {
            Some("tokens" | "tokens_used") => Kind::Tokens,
            _ => Kind::Requests,
        },
        record: usage == Some("tokens_used"),
    })
}

impl RateLimit {
    pub fn new(auth: Arc<Authenticator>, limiter: Arc<Limiter>, metrics: EdgeMetrics) -> Self {
        RateLimit {
            auth,
            limiter,
            metrics,
        }
    }

    /// Counts one descriptor; `None` when no limit applies to it.
    async fn count(&self, d: &RateLimitDescriptor, hits: u64) -> Result<Option<Counted>, Status> {
        let Some(asked) = asked(d) else {
            return Ok(None);
        };
        let caller = match self.auth.authenticate_hash(asked.credential).await {
            Ok(caller) => caller,
            // ext_authz refuses unknown and revoked keys; one revoked in between is refused
            // by the gateway it reaches. Nothing to count here.
            Err(GatewayError::Unauthorized(_) | GatewayError::Forbidden(_)) => return Ok(None),
            Err(e) => return Err(Status::unavailable(e.to_string())),
        };
        if asked.tenant.is_some_and(|t| t != caller.tenant_id)
            || asked.key.is_some_and(|k| k != caller.key_id)
        {
            return Err(Status::invalid_argument(
                "descriptor: tenant or key does not match the credential",
            ));
        }
        Ok(self
            .limiter
            .count_at_edge(
                &caller,
                asked.scope,
                asked.kind,
                if asked.record {
                    EdgeHits::Record(hits)
                } else {
                    EdgeHits::Ask(hits)
                },
            )
            .await
            .map(|count| Counted {
                kind: asked.kind,
                scope: asked.scope,
                count,
            }))
    }
}

struct Counted {
    kind: Kind,
    scope: Scope,
    count: EdgeCount,
}

#[tonic::async_trait]
impl pb::RateLimitService for RateLimit {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        // Unset (0) means one hit; a descriptor's own `hits_addend` overrides it.
        let default_hits = match request.hits_addend {
            0 => 1,
            n => u64::from(n),
        };
        let mut response = RateLimitResponse {
            overall_code: Code::Ok.into(),
            ..RateLimitResponse::default()
        };
        // Per kind, the tightest descriptor: its headers go to the client.
        let mut tightest: HashMap<&'static str, &Counted> = HashMap::new();
        let mut counted = Vec::with_capacity(request.descriptors.len());
        for d in &request.descriptors {
            let hits = d.hits_addend.as_ref().map_or(default_hits, |v| v.value);
            counted.push(self.count(d, hits).await?);
        }
        let mut refusal: Option<&GatewayError> = None;
        for c in &counted {
            let Some(c) = c else {
                response.statuses.push(DescriptorStatus {
                    code: Code::Ok.into(),
                    ..DescriptorStatus::default()
                });
                continue;
            };
            let over = c.count.refusal.is_some();
            self.metrics
                .ratelimit
                .with_label_values(&[if over { "over_limit" } else { "ok" }])
                .inc();
            if over && refusal.is_none() {
                refusal = c.count.refusal.as_ref();
                response.overall_code = Code::OverLimit.into();
            }
            response.statuses.push(status(c));
            let slot = tightest.entry(c.kind.label()).or_insert(c);
            if c.count.remaining < slot.count.remaining {
                *slot = c;
            }
        }
        if let Some(e) = refusal {
            // Only on a refusal: an allowed request gets the same headers from the gateway
            // that serves it (one copy of each, counted on the same limits).
            for c in tightest.values() {
                for (name, value) in c.count.headers.lines() {
                    response.response_headers_to_add.push(HeaderValue {
                        key: name.to_string(),
                        value,
                        ..HeaderValue::default()
                    });
                }
            }
            response.raw_body = e.body(WireFormat::OpenAi).to_string().into_bytes();
            response.response_headers_to_add.push(HeaderValue {
                key: "content-type".to_string(),
                value: "application/json".to_string(),
                ..HeaderValue::default()
            });
            if let GatewayError::RateLimited { retry_after_s, .. } = e {
                response.response_headers_to_add.push(HeaderValue {
                    key: "retry-after".to_string(),
                    value: retry_after_s.to_string(),
                    ..HeaderValue::default()
                });
            }
        }
        Ok(Response::new(response))
    }
}

/// A descriptor's status: code, limit per minute, remaining, time to reset.
fn status(c: &Counted) -> DescriptorStatus {
    let per_unit = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    DescriptorStatus {
        code: if c.count.refusal.is_some() {
            Code::OverLimit
        } else {
            Code::Ok
        }
        .into(),
        current_limit: Some(Limit {
            name: format!("{}_{}", c.scope.label(), c.kind.label()),
            requests_per_unit: per_unit(c.count.limit),
            unit: Unit::Minute.into(),
        }),
        limit_remaining: per_unit(c.count.remaining),
        duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: i64::try_from(c.count.reset_ms.div_ceil(1000)).unwrap_or(60),
            nanos: 0,
        }),
        quota: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

    fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            ..RateLimitDescriptor::default()
        }
    }

    #[test]
    fn descriptors_name_scope_and_kind() {
        let d = descriptor(&[("tenant", "ten_1"), ("key", "key_1"), ("credential", "h")]);
        let a = asked(&d).unwrap();
        assert_eq!((a.scope, a.kind), (Scope::Key, Kind::Requests));
        let d = descriptor(&[
            ("tenant", "ten_1"),
            ("credential", "h"),
            ("usage", "tokens"),
        ]);
        let a = asked(&d).unwrap();
        assert_eq!(
            (a.scope, a.kind, a.record),
            (Scope::Tenant, Kind::Tokens, false)
        );
        let d = descriptor(&[
            ("tenant", "ten_1"),
            ("key", "key_1"),
            ("credential", "h"),
            ("usage", "tokens_used"),
        ]);
        let a = asked(&d).unwrap();
        assert_eq!(
            (a.scope, a.kind, a.record),
            (Scope::Key, Kind::Tokens, true)
        );
        assert_eq!(asked(&descriptor(&[("tenant", "ten_1")])), None);
        assert_eq!(asked(&descriptor(&[("credential", "")])), None);
    }
}
