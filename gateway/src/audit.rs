//! The audit trail of requests (`[audit]`, off by default): for the tenants it names, each
//! request's body and the response the client received, redacted and capped, as one
//! `llm.audit` event ([`tollgate_schemas::events::AuditEvent`]).
//!
//! Where it happens: when an audited request ends, `Exchange::end` hands an [`AuditRecord`]
//! to the event sink next to the completion record (the same bounded hand-off, never awaited,
//! no durability barrier; a full queue spills to the overflow spool like any record). The
//! request path only clones reference-counted bytes and the completion's fields: redaction,
//! capping and serialization run on the sink's writer thread ([`AuditRecord::to_event`]).
//! The pipeline's audit consumer (`tollgate_pipeline::audit`) writes the events to
//! ClickHouse's `audit_log`; [`find_requests`] reads them back, for the tenant itself
//! (`GET /v1/audit/requests`) and for the operator (admin API, CLI).
//!
//! What is recorded: the client's request body as it sent it; for a non-streamed (or cached)
//! response its JSON body; for a stream the output text relayed (the text the relay already
//! assembles for the fallback token count: content, tool names and arguments). Headers are
//! never recorded, so the tenant's API key is not.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tollgate_pipeline::audit::{AuditRow, AuditStore};
use tollgate_schemas::events::{
    format_event_time, AuditEvent, AuditResponseKind, CompletionStatus, SCHEMA_VERSION,
};

use crate::auth::Caller;
use crate::config::ConfigError;
use crate::error::GatewayError;
use crate::relay::{CompletionRecord, Outcome};

/// What replaces a secret in an audited body.
pub const REDACTED: &str = "[REDACTED]";

/// Largest `max_body_bytes` accepted (each body of an audit event is capped at it).
const MAX_BODY_CAP: usize = 16 * 1024 * 1024;

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Record audit events at all.
    pub enabled: bool,
    /// Audit every tenant (`tenants` is then ignored).
    pub all: bool,
    /// Tenants to audit, by name or id.
    pub tenants: Vec<String>,
    /// Each body (request, response) is cut at this many bytes (on a UTF-8 boundary) and
    /// marked truncated.
    pub max_body_bytes: usize,
    /// Rows older than this are removed from ClickHouse's `audit_log`.
    pub retention_days: u32,
    /// ClickHouse's HTTP interface (e.g. `http://127.0.0.1:8123`): where the embedded
    /// pipeline writes `audit_log` and where `GET /v1/audit/requests` and the admin API read
    /// it. Unset: the embedded pipeline writes no audit rows and both routes answer 404.
    pub clickhouse_url: Option<String>,
    pub clickhouse_database: String,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: false,
            all: false,
            tenants: Vec::new(),
            max_body_bytes: 16 * 1024,
            retention_days: 30,
            clickhouse_url: None,
            clickhouse_database: "default".to_string(),
        }
    }
}

impl AuditConfig {
    /// Where audited requests are read back (`audit_log` in `clickhouse_database` at
    /// `clickhouse_url`); `None` without a URL.
    pub fn reader(&self) -> Option<AuditStore> {
        self.clickhouse_url
            .as_deref()
            .map(|url| AuditStore::new(url, &self.clickhouse_database, self.retention_days))
    }

    /// Refuses settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_CAP {
            return Err(ConfigError::Invalid(format!(
                "audit.max_body_bytes must be between 1 and {MAX_BODY_CAP}"
            )));
        }
        if self.retention_days == 0 || self.retention_days > 36_500 {
            return Err(ConfigError::Invalid(
                "audit.retention_days must be between 1 and 36500".to_string(),
            ));
        }
        if self.enabled && !self.all && self.tenants.is_empty() {
            return Err(ConfigError::Invalid(
                "audit.enabled = true needs audit.tenants (names or ids) or audit.all = true"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

/// What reading audited requests answers when no ClickHouse is configured (a 404).
pub const NO_CLICKHOUSE: &str = "The audit log is not available: it lives in ClickHouse, and no \
    ClickHouse is configured ([audit] clickhouse_url, or --clickhouse-url).";

/// Rows [`find_requests`] returns when no `limit` is given.
pub const DEFAULT_FIND_LIMIT: u64 = 20;
/// The most rows one [`find_requests`] returns.
pub const MAX_FIND_LIMIT: u64 = 1000;
/// Longest wait for ClickHouse's answer to one read: a hung ClickHouse must not hold the
/// caller's connection forever.
const FIND_TIMEOUT: Duration = Duration::from_secs(10);

/// The audited requests of `tenant_id`, newest first: the rows of `request_id` (none when it
/// is unknown or another tenant's: the query matches tenant and request id together, so
/// another tenant's request is indistinguishable from one that never existed), or the latest
/// `limit` rows (default [`DEFAULT_FIND_LIMIT`], 1 to [`MAX_FIND_LIMIT`], else a 400).
///
/// The one read behind `GET /v1/audit/requests` (the tenant from the caller's key), the admin
/// API and the CLI (a tenant the operator names). `store` is `None` when no ClickHouse is
/// configured: a 404 saying so ([`NO_CLICKHOUSE`]). ClickHouse's own error is logged, not
/// returned: its text (the query, the database) is not for tenants.
pub async fn find_requests(
    store: Option<&AuditStore>,
    tenant_id: &str,
    request_id: Option<&str>,
    limit: Option<u64>,
) -> Result<Vec<AuditRow>, GatewayError> {
    let limit = limit.unwrap_or(DEFAULT_FIND_LIMIT);
    if !(1..=MAX_FIND_LIMIT).contains(&limit) {
        return Err(GatewayError::bad_param(
            format!("limit must be between 1 and {MAX_FIND_LIMIT}, got {limit}"),
            "limit",
        ));
    }
    let store = store.ok_or_else(|| GatewayError::NotFound(NO_CLICKHOUSE.to_string()))?;
    match tokio::time::timeout(FIND_TIMEOUT, store.find(tenant_id, request_id, limit)).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reading the audit log from ClickHouse failed");
            Err(GatewayError::Internal(
                "the audit log could not be read (ClickHouse failed; see the gateway's log)"
                    .to_string(),
            ))
        }
        Err(_) => {
            tracing::warn!(
                timeout_s = FIND_TIMEOUT.as_secs(),
                "reading the audit log from ClickHouse timed out"
            );
            Err(GatewayError::Internal(
                "the audit log could not be read (ClickHouse did not answer in time)".to_string(),
            ))
        }
    }
}

/// Decides which requests are audited, and with what policy.
pub struct Auditor {
    enabled: bool,
    all: bool,
    tenants: HashSet<String>,
    policy: Arc<AuditPolicy>,
}

impl Auditor {
    /// An auditor for `config`, redacting `secrets` (the deployments' credentials) besides
    /// the API-key shapes [`AuditRedactor`] knows.
    pub fn new(config: &AuditConfig, secrets: Vec<String>) -> Auditor {
        Auditor {
            enabled: config.enabled,
            all: config.all,
            tenants: config.tenants.iter().cloned().collect(),
            policy: Arc::new(AuditPolicy {
                max_body_bytes: config.max_body_bytes.max(1),
                redactor: AuditRedactor::new(secrets),
            }),
        }
    }

    /// Audits nothing.
    pub fn off() -> Auditor {
        Auditor::new(&AuditConfig::default(), Vec::new())
    }

    /// Whether `caller`'s requests are audited.
    pub fn covers(&self, caller: &Caller) -> bool {
        self.enabled
            && (self.all
                || self.tenants.contains(&caller.tenant_id)
                || self.tenants.contains(&caller.tenant_name))
    }

    /// What an audited request keeps until it ends (`None`: not audited). `body` is the
    /// request body as the client sent it (shared bytes: nothing is copied).
    pub fn capture(&self, caller: &Caller, body: Bytes) -> Option<Arc<AuditCapture>> {
        self.covers(caller).then(|| {
            Arc::new(AuditCapture {
                request_body: body,
                policy: self.policy.clone(),
            })
        })
    }
}

/// How audited bodies are capped and redacted.
#[derive(Debug)]
pub struct AuditPolicy {
    pub max_body_bytes: usize,
    pub redactor: AuditRedactor,
}

/// An audited request's body, kept from routing to its end.
#[derive(Debug)]
pub struct AuditCapture {
    pub request_body: Bytes,
    pub policy: Arc<AuditPolicy>,
}

/// The response as the client received it.
#[derive(Debug, Clone)]
pub enum AuditResponse {
    /// A whole JSON body (non-streamed, or replayed from the cache).
    Body(Bytes),
    /// A stream's output text.
    Text(String),
    /// Nothing reached the client.
    None,
}

/// One audited request, as handed to the event sink.
#[derive(Debug)]
pub struct AuditRecord {
    pub completion: CompletionRecord,
    pub capture: Arc<AuditCapture>,
    pub response: AuditResponse,
}

impl AuditRecord {
    /// The event (redacted and capped here, on the sink's writer thread).
    pub fn to_event(&self, event_id: String) -> AuditEvent {
        let c = &self.completion;
        let policy = &self.capture.policy;
        let (status, error) = match &c.outcome {
            Outcome::Completed => (CompletionStatus::Completed, None),
            Outcome::ClientDisconnected => (CompletionStatus::ClientDisconnected, None),
            Outcome::UpstreamError(e) => (CompletionStatus::UpstreamError, Some(e.as_str())),
            Outcome::LimitExceeded(e) => (CompletionStatus::LimitExceeded, Some(e.as_str())),
        };
        let request = capped(policy, &self.capture.request_body);
        let (kind, response) = match &self.response {
            AuditResponse::Body(b) => (AuditResponseKind::Body, capped(policy, b)),
            AuditResponse::Text(t) => (AuditResponseKind::Text, capped(policy, t.as_bytes())),
            AuditResponse::None => (AuditResponseKind::None, capped(policy, b"")),
        };
        AuditEvent {
            schema_version: SCHEMA_VERSION,
            event_id,
            event_time: format_event_time(c.ended_at),
            request_id: c.request_id.clone(),
            tenant_id: c.tenant_id.clone(),
            key_id: c.key_id.clone(),
            route: c.route.to_string(),
            requested_model: c.requested_model.clone(),
            model_alias: c.model_label.clone(),
            deployment: c.deployment.clone(),
            provider: c.provider.to_string(),
            upstream_model: c.upstream_model.clone(),
            stream: c.stream,
            status,
            error: error.map(|e| policy.redactor.redact_for_audit(e).into_owned()),
            usage: c.usage,
            received_at: format_event_time(c.received_at()),
            request_body: request.text,
            request_bytes: request.bytes,
            request_truncated: request.truncated,
            response_kind: kind,
            response_body: response.text,
            response_bytes: response.bytes,
            response_truncated: response.truncated,
        }
    }
}

/// A body as recorded.
struct Capped {
    text: String,
    /// Size before redaction and capping.
    bytes: u64,
    truncated: bool,
}

/// Redacts `body` and caps it at `max_body_bytes`. Only a window a little larger than the
/// cap is redacted (a secret straddling the cap is still matched by its part inside it: the
/// patterns match any long enough prefix), so a large body costs no more than a small one.
fn capped(policy: &AuditPolicy, body: &[u8]) -> Capped {
    let max = policy.max_body_bytes;
    let window = &body[..body.len().min(max.saturating_add(1024))];
    let text = String::from_utf8_lossy(window);
    let redacted = policy.redactor.redact_for_audit(&text);
    let (text, cut) = truncate_utf8(&redacted, max);
    Capped {
        text: text.to_string(),
        bytes: u64::try_from(body.len()).unwrap_or(u64::MAX),
        truncated: cut || window.len() < body.len(),
    }
}

/// The longest prefix of `s` of at most `max` bytes ending on a character boundary, and
/// whether anything was cut.
fn truncate_utf8(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

/// API-key-shaped secrets: OpenAI/Anthropic-style `sk-...` keys, Tollgate's own `tg_` keys.
static KEY_SHAPES: LazyLock<Option<regex::Regex>> =
    LazyLock::new(|| regex::Regex::new(r"sk-[A-Za-z0-9_\-]{16,}|tg_[0-9A-Za-z]{38}").ok());
/// A bearer token (as in an `Authorization` header pasted into a prompt).
static BEARER: LazyLock<Option<regex::Regex>> =
    LazyLock::new(|| regex::Regex::new(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=\-]{8,}").ok());

/// The one place audited text is redacted. It removes, in this order:
/// 1. every deployment credential the gateway holds (from the environment or the credential
///    store; values of at least 4 characters, like the provider error redaction);
/// 2. API-key-shaped secrets: `sk-` followed by 16 or more of `[A-Za-z0-9_-]` (OpenAI,
///    Anthropic and most OpenAI-compatible keys) and Tollgate API keys (`tg_` + 38
///    alphanumerics);
/// 3. bearer tokens: `Bearer` (any case), white space, then 8 or more token characters
///    (`[A-Za-z0-9._~+/=-]`); the word `Bearer` is kept.
///
/// Each is replaced by `[REDACTED]`. Then
/// 4. personal data, by the PII masking's detectors (`crate::privacy::detect`: e-mails,
///    phone numbers, payment cards, IBANs, US SSNs, UK NHS numbers, IP addresses, secrets by
///    prefix), whatever the tenant's masking policy: each value becomes its kind (`[EMAIL]`).
///    Person names are not detected.
#[derive(Debug, Default)]
pub struct AuditRedactor {
    secrets: Vec<String>,
}

impl AuditRedactor {
    pub fn new(secrets: Vec<String>) -> AuditRedactor {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        // Longest first: a credential that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        AuditRedactor { secrets }
    }

    /// `text` with the secrets above replaced; borrowed when there were none.
    pub fn redact_for_audit<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), REDACTED));
            }
        }
        if let Some(re) = KEY_SHAPES.as_ref() {
            if re.is_match(&out) {
                out = Cow::Owned(re.replace_all(&out, REDACTED).into_owned());
            }
        }
        if let Some(re) = BEARER.as_ref() {
            if re.is_match(&out) {
                out = Cow::Owned(re.replace_all(&out, "${1}${2}[REDACTED]").into_owned());
            }
        }
        // The PII masking's detectors: each value becomes its kind, e.g. `[EMAIL]` (nothing
        // is restored from an audit row, so no placeholder key is needed).
        let found = crate::privacy::detect::detect(&out, true);
        if !found.is_empty() {
            let mut masked = String::with_capacity(out.len());
            let mut at = 0;
            for f in &found {
                masked.push_str(&out[at..f.start]);
                masked.push('[');
                masked.push_str(f.entity.label());
                masked.push(']');
                at = f.end;
            }
            masked.push_str(&out[at..]);
            out = Cow::Owned(masked);
        }
        out
    }
}

/// The deployments' credentials: decrypted stored ones (`credentials`) and those the config
/// names by environment variable.
pub fn deployment_secrets(
    config: &crate::config::Config,
    credentials: &std::collections::HashMap<String, String>,
) -> Vec<String> {
    use crate::config::DeploymentConfig;
    let mut out: Vec<String> = credentials.values().cloned().collect();
    for d in &config.deployments {
        if let DeploymentConfig::Openai(c)
        | DeploymentConfig::OpenaiCompatible(c)
        | DeploymentConfig::Vllm(c)
        | DeploymentConfig::Anthropic(c) = d
        {
            if let Some(v) = c.api_key_env.as_deref().and_then(|v| std::env::var(v).ok()) {
                out.push(v);
            }
        }
    }
    out
}

/// The audit consumer running inside the gateway (`[audit]` on, `clickhouse_url` set, the
/// local event log): `llm.audit` from the log into ClickHouse, on its own thread
/// `audit-consumer`, restarted after a failure (1 s doubling to 30 s) from its committed
/// position.
pub struct EmbeddedAudit {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedAudit {
    /// Starts it when `config` asks for it and `log` (the local event log) is there.
    pub fn start(
        config: &AuditConfig,
        log: Option<&std::path::Path>,
        topic: &str,
    ) -> std::io::Result<Option<EmbeddedAudit>> {
        let (true, Some(url), Some(log)) = (config.enabled, config.clickhouse_url.clone(), log)
        else {
            return Ok(None);
        };
        let options = tollgate_pipeline::audit::AuditOptions::new(
            &url,
            &config.clickhouse_database,
            config.retention_days,
        );
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let log = log.to_path_buf();
        let topic = topic.to_string();
        let thread = std::thread::Builder::new()
            .name("audit-consumer".to_string())
            .spawn(move || {
                use std::sync::atomic::Ordering;
                use std::time::Instant;
                let mut backoff = Duration::from_secs(1);
                while !flag.load(Ordering::Acquire) {
                    let started = Instant::now();
                    let result =
                        tollgate_pipeline::audit::local_log::run(&log, &topic, &options, &flag);
                    let Err(e) = result else { break };
                    if started.elapsed() >= Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                    tracing::error!(error = %e, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "audit consumer failed; audit rows are behind until it restarts");
                    let until = Instant::now() + backoff;
                    while !flag.load(Ordering::Acquire) && Instant::now() < until {
                        std::thread::park_timeout(Duration::from_millis(200));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            })?;
        Ok(Some(EmbeddedAudit {
            stop,
            thread: Some(thread),
        }))
    }

    /// Writes what the log holds, then stops.
    pub async fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_limit_out_of_bounds_is_a_400_and_no_clickhouse_a_404() {
        for limit in [0, MAX_FIND_LIMIT + 1, u64::MAX] {
            let e = find_requests(None, "ten_1", None, Some(limit))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, GatewayError::BadRequest { param: Some(p), .. } if p == "limit"),
                "{limit}: {e:?}"
            );
        }
        for limit in [None, Some(1), Some(MAX_FIND_LIMIT)] {
            let e = find_requests(None, "ten_1", Some("req_1"), limit)
                .await
                .unwrap_err();
            assert_eq!(e, GatewayError::NotFound(NO_CLICKHOUSE.to_string()));
        }
        assert!(!NO_CLICKHOUSE.contains("  "), "{NO_CLICKHOUSE}");
    }

    #[test]
    fn personal_data_in_audited_text_becomes_its_kind() {
        let r = AuditRedactor::new(Vec::new());
        let text = "mail jane.doe@example.com, card 4111 1111 1111 1111, order 12345";
        let out = r.redact_for_audit(text);
        assert!(!out.contains("jane.doe@example.com"), "{out}");
        assert!(!out.contains("4111 1111 1111 1111"), "{out}");
        assert!(
            out.contains("[EMAIL]") && out.contains("order 12345"),
            "{out}"
        );
        assert!(matches!(
            r.redact_for_audit("nothing here"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn redaction_removes_credentials_key_shapes_and_bearer_tokens() {
        let r = AuditRedactor::new(vec!["upstream-secret-123".into(), "ab".into()]);
        let text = "use upstream-secret-123 and sk-proj-abcdefghijklmnop1234 or \
                    tg_0123456789abcdefghijABCDEFGHIJ012345xy with Authorization: Bearer eyJhbGciOi.x-y \
                    but keep sk-short, ab and bearer";
        let out = r.redact_for_audit(text);
        assert!(!out.contains("upstream-secret-123"), "{out}");
        assert!(!out.contains("sk-proj-abcdefghijklmnop1234"), "{out}");
        assert!(!out.contains("tg_0123456789"), "{out}");
        assert!(!out.contains("eyJhbGciOi"), "{out}");
        assert!(out.contains("Bearer [REDACTED]"), "{out}");
        assert!(out.contains("sk-short, ab and bearer"), "{out}");
        assert!(matches!(
            r.redact_for_audit("nothing here"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn bodies_are_capped_on_a_character_boundary_and_flagged() {
        let policy = AuditPolicy {
            max_body_bytes: 5,
            redactor: AuditRedactor::default(),
        };
        let c = capped(&policy, "héllo wörld".as_bytes());
        assert_eq!((c.text.as_str(), c.truncated, c.bytes), ("héll", true, 13));
        let c = capped(&policy, b"abc");
        assert_eq!((c.text.as_str(), c.truncated), ("abc", false));
        // A key straddling the cap is redacted before the cut.
        let policy = AuditPolicy {
            max_body_bytes: 12,
            redactor: AuditRedactor::default(),
        };
        let c = capped(&policy, b"key sk-abcdefghijklmnopqrstuvwxyz");
        assert_eq!(c.text, "key [REDACTE");
        assert!(c.truncated);
    }

    #[test]
    fn config_needs_tenants_when_enabled_and_sane_bounds() {
        let mut c = AuditConfig {
            enabled: true,
            ..AuditConfig::default()
        };
        assert!(c.validate().is_err());
        c.tenants = vec!["acme".into()];
        assert!(c.validate().is_ok());
        c.max_body_bytes = 0;
        assert!(c.validate().is_err());
        c.max_body_bytes = 10;
        c.retention_days = 0;
        assert!(c.validate().is_err());
    }
}
