//! The access log: one line per inference request, under the `tollgate::access` target, with
//! what an operator needs to find it again (request id, tenant, key, model, deployment,
//! status, time to first token, duration, tokens, the route taken).
//!
//! Successful and client-error lines go out at `server.access_log`'s level (`info` by default,
//! `debug`, or `off`); a request the gateway or its providers failed (a 5xx, or a stream cut
//! by an upstream error) is always logged, at `warn`, with the error's detail, which the
//! tenant's response leaves out.

use std::time::Duration;

use serde::Deserialize;

/// `server.access_log`: the level of ordinary access-log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    #[default]
    Info,
    Debug,
    Off,
}

/// One request's line.
#[derive(Debug, Default)]
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub route: &'a str,
    pub tenant: Option<&'a str>,
    pub key_id: Option<&'a str>,
    /// The model the client asked for.
    pub model: Option<&'a str>,
    pub deployment: Option<&'a str>,
    /// The HTTP status the client got (200 for a stream, whatever happened after it began).
    pub status: u16,
    /// How the request ended (`completed`, `upstream_error`, `client_disconnected`...).
    pub outcome: &'a str,
    pub ttft: Option<Duration>,
    pub duration: Duration,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `deployment:outcome` per attempt.
    pub route_trace: Option<&'a str>,
    /// What went wrong, in full (never a credential: provider errors are redacted before).
    pub error: Option<&'a str>,
}

impl AccessLine<'_> {
    /// Writes the line at the level it calls for.
    pub fn write(&self, level: AccessLog) {
        let failed = self.status >= 500 || self.outcome == "upstream_error";
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "tollgate::access",
                    request_id = %self.request_id,
                    route = %self.route,
                    tenant = self.tenant.map(tracing::field::display),
                    key_id = self.key_id.map(tracing::field::display),
                    model = self.model.map(tracing::field::display),
                    deployment = self.deployment.map(tracing::field::display),
                    status = self.status,
                    outcome = %self.outcome,
                    ttft_ms = self.ttft.map(|t| t.as_secs_f64() * 1e3),
                    duration_ms = self.duration.as_secs_f64() * 1e3,
                    input_tokens = self.input_tokens,
                    output_tokens = self.output_tokens,
                    route_trace = self.route_trace.map(tracing::field::display),
                    error = self.error.map(tracing::field::display),
                    "request"
                )
            };
        }
        match (failed, level) {
            (true, _) => line!(warn),
            (false, AccessLog::Info) => line!(info),
            (false, AccessLog::Debug) => line!(debug),
            (false, AccessLog::Off) => {}
        }
    }
}
