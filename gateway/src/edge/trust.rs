//! Trusting Envoy's identity headers on the HTTP path.
//!
//! When Envoy's ext_authz call to [`super::authz`] passed, Envoy forwards the request with the
//! client's key removed and [`TENANT_HEADER`], [`KEY_ID_HEADER`] and [`KEY_HASH_HEADER`]
//! added, plus [`EDGE_SECRET_HEADER`] from its own route config. The gateway believes those
//! headers only when the secret matches `edge.trusted_secret` (compared in constant time);
//! otherwise they are ignored and the request needs a key like any other. A believed identity
//! is still looked up through the key cache and its revocation feed, so a key revoked after
//! Envoy's check is refused here too.

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use super::{EDGE_SECRET_HEADER, KEY_HASH_HEADER, KEY_ID_HEADER, TENANT_HEADER};
use crate::auth::Caller;
use crate::error::GatewayError;

/// The identity Envoy vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeIdentity<'a> {
    pub key_hash: &'a str,
    pub key_id: Option<&'a str>,
    pub tenant_id: Option<&'a str>,
}

/// The identity in `headers`, when they carry the edge's shared `secret`; `None` when no
/// secret is configured, the header is missing or wrong, or no key hash came with it (the
/// caller then authenticates the request's own key).
pub fn identity<'a>(headers: &'a HeaderMap, secret: Option<&str>) -> Option<EdgeIdentity<'a>> {
    let secret = secret?;
    let presented = headers.get(EDGE_SECRET_HEADER)?.as_bytes();
    if !bool::from(presented.ct_eq(secret.as_bytes())) {
        return None;
    }
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    Some(EdgeIdentity {
        key_hash: text(KEY_HASH_HEADER).filter(|h| !h.is_empty())?,
        key_id: text(KEY_ID_HEADER),
        tenant_id: text(TENANT_HEADER),
    })
}

impl EdgeIdentity<'_> {
    /// The caller the key hash resolved to, if the other identity headers agree with it.
    pub fn check(&self, caller: Caller) -> Result<Caller, GatewayError> {
        let agrees = self.key_id.is_none_or(|k| k == caller.key_id)
            && self.tenant_id.is_none_or(|t| t == caller.tenant_id);
        if agrees {
            Ok(caller)
        } else {
            Err(GatewayError::Unauthorized(
                "The edge's identity headers do not match one key.".to_string(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                *k,
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
            );
        }
        h
    }

    #[test]
    fn identity_headers_count_only_with_the_secret() {
        let sent = headers(&[
            (EDGE_SECRET_HEADER, "s3cret-s3cret-s3cret"),
            (KEY_HASH_HEADER, "abc"),
            (KEY_ID_HEADER, "key_1"),
            (TENANT_HEADER, "ten_1"),
        ]);
        let id = identity(&sent, Some("s3cret-s3cret-s3cret"));
        assert_eq!(
            id,
            Some(EdgeIdentity {
                key_hash: "abc",
                key_id: Some("key_1"),
                tenant_id: Some("ten_1"),
            })
        );
        // No secret configured, a wrong one, or none sent: the headers are ignored.
        assert_eq!(identity(&sent, None), None);
        assert_eq!(identity(&sent, Some("another-secret-value")), None);
        let unsigned = headers(&[(KEY_HASH_HEADER, "abc"), (TENANT_HEADER, "ten_1")]);
        assert_eq!(identity(&unsigned, Some("s3cret-s3cret-s3cret")), None);
        // The secret alone names nobody.
        let bare = headers(&[(EDGE_SECRET_HEADER, "s3cret-s3cret-s3cret")]);
        assert_eq!(identity(&bare, Some("s3cret-s3cret-s3cret")), None);
    }

    #[test]
    fn identity_headers_must_agree_with_the_key() {
        let id = EdgeIdentity {
            key_hash: "abc",
            key_id: Some("key_1"),
            tenant_id: Some("ten_2"),
        };
        assert!(matches!(
            id.check(Caller::for_tests("ten_1", "key_1")),
            Err(GatewayError::Unauthorized(_))
        ));
        let id = EdgeIdentity {
            tenant_id: Some("ten_1"),
            ..id
        };
        assert!(id.check(Caller::for_tests("ten_1", "key_1")).is_ok());
    }
}
