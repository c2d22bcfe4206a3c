//! PII masking before external providers: what a request sends to a deployment that is not
//! exempt passes through the detectors (`detect.rs`); each value found becomes a placeholder
//! (`[EMAIL_7f3a9c21]`), and the placeholders in the response are restored before the client
//! sees them (`restore.rs`, streams included).
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the policy (`[privacy]`, per tenant, per alias, exempt deployments), placeholders, masking or blocking one upstream body |
//! | `detect.rs` | detectors with validators (cards, IBANs, SSNs, NHS numbers, IPs, e-mails, phones, secrets) |
//! | `restore.rs` | placeholders back to values: whole responses, and the stream adapter that holds back a split placeholder |
//!
//! Placeholders need no server-side state: each is a keyed hash (HMAC-SHA256) of the entity's
//! kind and value under a per-tenant key derived from `[privacy] placeholder_key`, so the
//! same e-mail is the same placeholder in every turn of a conversation (and in every request
//! of the tenant), and another tenant's placeholder for it differs. Every request carries its
//! whole conversation, so the map placeholder → value built while masking it covers
//! everything the model can repeat.

pub mod detect;
mod names;
pub mod restore;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use prometheus::{IntCounterVec, Opts};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::routing::Deployment;
use detect::Entity;
pub use restore::{Restorer, Restoring};

/// What a policy does with personal data bound for an external provider. Ordered from the
/// least to the most restrictive: where several policies apply, the greatest wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiAction {
    /// Sent as it is.
    #[default]
    Off,
    /// Each value replaced by a placeholder, restored in the response.
    Mask,
    /// The request is refused (400) naming the kinds found.
    Block,
}

impl PiiAction {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            PiiAction::Off => "off",
            PiiAction::Mask => "mask",
            PiiAction::Block => "block",
        }
    }
}

/// `[privacy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// The policy of every request (a floor: tenants and aliases can only be stricter).
    pub default: PiiAction,
    /// Per tenant, by name or id: `[privacy.tenants] acme = "block"`.
    pub tenants: HashMap<String, PiiAction>,
    /// Whether person names are masked too (found with a gazetteer: less precise than the
    /// structured kinds; see `tests/pii/`).
    pub names: bool,
    /// Deployment types (`vllm`, `openai_compatible`, `mock`...) never masked: self-hosted.
    pub exempt_deployment_types: Vec<String>,
    /// The secret placeholders are derived from (required once any policy can mask). Keep it
    /// stable: a new key gives new placeholders, which breaks nothing but a conversation's
    /// placeholders already sent to a provider (they are no longer restored).
    pub placeholder_key: Option<String>,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            default: PiiAction::Off,
            tenants: HashMap::new(),
            names: true,
            exempt_deployment_types: vec!["vllm".to_string()],
            placeholder_key: None,
        }
    }
}

impl PrivacyConfig {
    /// Whether any policy can be something else than `off` (`alias_policies`: the aliases').
    pub fn can_apply(&self, mut alias_policies: impl Iterator<Item = PiiAction>) -> bool {
        self.default != PiiAction::Off
            || self.tenants.values().any(|a| *a != PiiAction::Off)
            || alias_policies.any(|a| a != PiiAction::Off)
    }
}

/// The gateway's privacy runtime: configuration, key and counter.
pub struct Privacy {
    config: PrivacyConfig,
    key: Vec<u8>,
    entities: IntCounterVec,
}

impl Privacy {
    /// `None` when no policy can apply (nothing is looked at then); its counter is
    /// registered with `metrics`.
    pub fn new(
        config: &PrivacyConfig,
        alias_policies: impl Iterator<Item = PiiAction>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Option<Arc<Privacy>>, GatewayError> {
        if !config.can_apply(alias_policies) {
            return Ok(None);
        }
        let entities = IntCounterVec::new(
            Opts::new(
                "tollgate_pii_entities_total",
                "Personal data entities found in requests bound for external providers, by kind and action",
            ),
            &["entity", "action"],
        )
        .map_err(|e| GatewayError::Internal(format!("the PII counter: {e}")))?;
        metrics
            .register(vec![Box::new(entities.clone())])
            .map_err(|e| GatewayError::Internal(format!("the PII counter: {e}")))?;
        Ok(Some(Arc::new(Privacy {
            key: config
                .placeholder_key
                .clone()
                .unwrap_or_default()
                .into_bytes(),
            config: config.clone(),
            entities,
        })))
    }

    /// The request's privacy, when its policy is not `off`: the most restrictive of
    /// `[privacy] default`, the tenant's (by name, else id) and the alias's.
    pub fn for_request(
        self: &Arc<Self>,
        tenant_id: &str,
        tenant_name: &str,
        alias: Option<PiiAction>,
    ) -> Option<RequestPrivacy> {
        let tenant = self
            .config
            .tenants
            .get(tenant_name)
            .or_else(|| self.config.tenants.get(tenant_id))
            .copied();
        let action = [Some(self.config.default), tenant, alias]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or_default();
        (action != PiiAction::Off).then(|| RequestPrivacy {
            action,
            masker: Masker::new(&self.key, tenant_id).with_names(self.config.names),
            privacy: self.clone(),
            counted: false,
        })
    }
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for m in message {
        inner.update(m);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Replaces entities by placeholders, remembering each placeholder's value.
pub struct Masker {
    tenant_key: [u8; 32],
    /// Placeholder → value.
    map: HashMap<String, String>,
    /// Entities found, by kind (each occurrence).
    found: HashMap<Entity, u64>,
    /// Two values met the same placeholder (a 32-bit collision): restoring is ambiguous.
    collision: bool,
    /// Person names are masked too.
    names: bool,
}

impl Masker {
    /// A masker for `tenant`, its key derived from the gateway's.
    pub fn new(key: &[u8], tenant: &str) -> Masker {
        Masker {
            tenant_key: hmac_sha256(key, &[b"tollgate-pii-placeholder\0", tenant.as_bytes()]),
            map: HashMap::new(),
            found: HashMap::new(),
            collision: false,
            names: true,
        }
    }

    /// Whether person names are masked (they are by default).
    pub fn with_names(mut self, names: bool) -> Masker {
        self.names = names;
        self
    }

    /// The placeholder of `value` (stable for the tenant).
    pub fn placeholder(&self, entity: Entity, value: &str) -> String {
        let mac = hmac_sha256(
            &self.tenant_key,
            &[entity.label().as_bytes(), b"\0", value.as_bytes()],
        );
        format!("[{}_{}]", entity.label(), hex::encode(&mac[..4]))
    }

    /// `text` with every entity replaced; `None` when it has none.
    pub fn mask_text(&mut self, text: &str) -> Option<String> {
        let found = detect::detect(text, self.names);
        if found.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in found {
            let value = &text[f.start..f.end];
            let placeholder = self.placeholder(f.entity, value);
            out.push_str(&text[at..f.start]);
            out.push_str(&placeholder);
            at = f.end;
            *self.found.entry(f.entity).or_default() += 1;
            match self.map.get(&placeholder) {
                Some(v) if v != value => self.collision = true,
                Some(_) => {}
                None => {
                    self.map.insert(placeholder, value.to_string());
                }
            }
        }
        out.push_str(&text[at..]);
        Some(out)
    }

    /// The kinds found so far.
    pub fn kinds(&self) -> BTreeSet<Entity> {
        self.found.keys().copied().collect()
    }

    /// The restorer of what was masked (`None`: nothing was).
    pub fn restorer(&self) -> Option<Arc<Restorer>> {
        (!self.map.is_empty()).then(|| Arc::new(Restorer::new(self.map.clone())))
    }

    /// Masks every string of an upstream body's content: `messages` (and their content
    /// blocks, tool calls, tool results), `system`, `input`, `prompt`. Roles, ids, types,
    /// names and base64 data stay as they are.
    pub fn mask_body(&mut self, body: &[u8]) -> Result<Option<Bytes>, GatewayError> {
        let mut value: Value = serde_json::from_slice(body).map_err(|e| {
            GatewayError::Internal(format!("the upstream body is not JSON for masking: {e}"))
        })?;
        let mut changed = false;
        if let Some(obj) = value.as_object_mut() {
            for key in ["messages", "system", "input", "prompt"] {
                if let Some(v) = obj.get_mut(key) {
                    changed |= self.mask_value(v);
                }
            }
        }
        if !changed {
            return Ok(None);
        }
        serde_json::to_vec(&value)
            .map(|v| Some(Bytes::from(v)))
            .map_err(|e| GatewayError::Internal(format!("cannot serialize a masked body: {e}")))
    }

    fn mask_value(&mut self, value: &mut Value) -> bool {
        /// Members that hold no free text (or base64 data, which only makes false hits).
        const KEEP: &[&str] = &[
            "role",
            "type",
            "id",
            "tool_call_id",
            "tool_use_id",
            "name",
            "media_type",
            "data",
            "url",
            "image_url",
            "cache_control",
            "signature",
        ];
        match value {
            Value::String(s) => match self.mask_text(s) {
                Some(masked) => {
                    *s = masked;
                    true
                }
                None => false,
            },
            Value::Array(items) => {
                let mut changed = false;
                for v in items {
                    changed |= self.mask_value(v);
                }
                changed
            }
            Value::Object(members) => {
                let mut changed = false;
                for (k, v) in members.iter_mut() {
                    if !KEEP.contains(&k.as_str()) {
                        changed |= self.mask_value(v);
                    }
                }
                changed
            }
            _ => false,
        }
    }
}

/// One request's privacy: its policy and what masking it found.
pub struct RequestPrivacy {
    action: PiiAction,
    masker: Masker,
    privacy: Arc<Privacy>,
    /// The entities were counted (once per request, however many attempts).
    counted: bool,
}

impl RequestPrivacy {
    /// The policy in force.
    pub fn action(&self) -> PiiAction {
        self.action
    }

    /// Whether `deployment` is exempt (its type is in `exempt_deployment_types`, or it says
    /// `pii_exempt = true`).
    pub fn exempt(&self, deployment: &Deployment) -> bool {
        deployment.pii_exempt
            || self
                .privacy
                .config
                .exempt_deployment_types
                .iter()
                .any(|t| t == deployment.provider.label())
    }

    /// The body for a deployment that is not exempt: masked, or refused when the policy
    /// blocks and it holds personal data. A masked body whose placeholders could not be
    /// restored unambiguously fails closed.
    pub fn apply(&mut self, body: Bytes) -> Result<Bytes, GatewayError> {
        let masked = self.masker.mask_body(&body)?;
        self.count();
        if self.action == PiiAction::Block {
            let kinds = self.masker.kinds();
            if !kinds.is_empty() {
                let names: Vec<&str> = kinds.iter().map(|k| k.label()).collect();
                return Err(GatewayError::bad_request(format!(
                    "The request contains personal data ({}), which the privacy policy for this model does not allow to leave for an external provider.",
                    names.join(", ")
                )));
            }
            return Ok(body);
        }
        if self.masker.collision {
            return Err(GatewayError::bad_request(
                "Two different values of the request would share a placeholder, so the response could not be restored safely; the request was not sent (PII masking).",
            ));
        }
        Ok(masked.unwrap_or(body))
    }

    fn count(&mut self) {
        if self.counted {
            return;
        }
        self.counted = true;
        for (entity, n) in &self.masker.found {
            self.privacy
                .entities
                .with_label_values(&[entity.label(), self.action.label()])
                .inc_by(*n);
        }
    }

    /// The restorer of the response, when something was masked.
    pub fn restorer(&self) -> Option<Arc<Restorer>> {
        if self.action != PiiAction::Mask {
            return None;
        }
        self.masker.restorer()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn placeholders_are_stable_per_tenant_and_differ_between_tenants() {
        let a1 = Masker::new(b"k", "tenant-a");
        let a2 = Masker::new(b"k", "tenant-a");
        let b = Masker::new(b"k", "tenant-b");
        let p = a1.placeholder(Entity::Email, "jane@example.com");
        assert_eq!(p, a2.placeholder(Entity::Email, "jane@example.com"));
        assert_ne!(p, b.placeholder(Entity::Email, "jane@example.com"));
        assert_ne!(p, a1.placeholder(Entity::Email, "john@example.com"));
        assert!(p.starts_with("[EMAIL_") && p.ends_with(']') && p.len() == 16);
        assert!(p.is_ascii());
        // Another gateway key, other placeholders.
        assert_ne!(
            p,
            Masker::new(b"k2", "tenant-a").placeholder(Entity::Email, "jane@example.com")
        );
    }

    #[test]
    fn a_conversation_masks_the_same_value_alike_in_every_turn() {
        let mut m = Masker::new(b"k", "t");
        let body = br#"{"model":"m","messages":[
            {"role":"user","content":"I am jane@example.com"},
            {"role":"assistant","content":"Hello","tool_calls":[{"id":"c1","type":"function","function":{"name":"send","arguments":"{\"to\":\"jane@example.com\"}"}}]},
            {"role":"user","content":[{"type":"text","text":"card 4111 1111 1111 1111, mail jane@example.com"}]}]}"#;
        let masked = m.mask_body(body).unwrap().unwrap();
        let text = std::str::from_utf8(&masked).unwrap();
        assert!(!text.contains("jane@example.com"), "{text}");
        assert!(!text.contains("4111"), "{text}");
        let p = m.placeholder(Entity::Email, "jane@example.com");
        assert_eq!(text.matches(&p).count(), 3, "{text}");
        assert_eq!(m.kinds(), BTreeSet::from([Entity::Email, Entity::Card]));
        let restored = m.restorer().unwrap().restore_text(text, false).unwrap();
        assert!(restored.contains("jane@example.com"));
    }

    #[test]
    fn policies_take_the_most_restrictive() {
        let metrics = crate::metrics::Metrics::new().unwrap();
        let mut config = PrivacyConfig::default();
        config.tenants.insert("acme".into(), PiiAction::Block);
        let p = Privacy::new(&config, std::iter::empty(), &metrics)
            .unwrap()
            .unwrap();
        let action = |id, name, alias| p.for_request(id, name, alias).map(|r| r.action());
        assert_eq!(
            action("t1", "acme", Some(PiiAction::Mask)),
            Some(PiiAction::Block)
        );
        assert_eq!(
            action("t1", "other", Some(PiiAction::Mask)),
            Some(PiiAction::Mask)
        );
        assert_eq!(action("t1", "other", None), None);
        assert_eq!(
            action("acme", "x", Some(PiiAction::Off)),
            Some(PiiAction::Block)
        );
        // Nothing configured: no runtime at all.
        assert!(
            Privacy::new(&PrivacyConfig::default(), std::iter::empty(), &metrics)
                .unwrap()
                .is_none()
        );
    }
}
