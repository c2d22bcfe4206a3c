//! What to do after a failed attempt: the classification of upstream errors, exponential
//! backoff with full jitter, and the deadline that bounds everything before the first byte.

use std::time::{Duration, Instant};

use rand::Rng;

use super::config::RetryConfig;
use crate::error::GatewayError;

/// The next step after an attempt failed with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The client's own fault (bad request, not found...): answer it, no retry anywhere.
    Fatal,
    /// The upstream may succeed if asked again: back off and retry this deployment while
    /// retries last, then move on.
    Retry,
    /// This deployment cannot serve now (rate-limited, credential refused, hung): the next one.
    NextDeployment,
    /// The prompt is over this model's context window: the alias's context-window fallback.
    ContextWindow,
    /// Refused under the provider's content policy: the alias's content-policy fallback.
    ContentPolicy,
}

/// How an attempt's error is handled.
pub fn classify(e: &GatewayError, retry_timeouts: bool) -> Disposition {
    match e {
        GatewayError::Upstream {
            status,
            code,
            message,
            ..
        } => match *status {
            429 => Disposition::NextDeployment,
            // The gateway's credential or the deployment's model name is wrong: another
            // deployment may well work, retrying this one will not.
            401 | 403 | 404 => Disposition::NextDeployment,
            s if s >= 500 => Disposition::Retry,
            _ if is_context_window(code.as_deref(), message) => Disposition::ContextWindow,
            _ if is_content_policy(code.as_deref(), message) => Disposition::ContentPolicy,
            _ => Disposition::Fatal,
        },
        GatewayError::UpstreamUnavailable(_) | GatewayError::UpstreamProtocol(_) => {
            Disposition::Retry
        }
        GatewayError::UpstreamTimeout(_) if retry_timeouts => Disposition::Retry,
        GatewayError::UpstreamTimeout(_) => Disposition::NextDeployment,
        _ => Disposition::Fatal,
    }
}

/// OpenAI's `context_length_exceeded`; Anthropic's "prompt is too long"; vLLM's "maximum
/// context length".
fn is_context_window(code: Option<&str>, message: &str) -> bool {
    if code == Some("context_length_exceeded") {
        return true;
    }
    let m = message.to_ascii_lowercase();
    m.contains("prompt is too long")
        || m.contains("maximum context length")
        || m.contains("context window")
}

/// OpenAI's `content_policy_violation` / `content_filter`; Anthropic's policy refusals.
fn is_content_policy(code: Option<&str>, message: &str) -> bool {
    if matches!(code, Some("content_policy_violation" | "content_filter")) {
        return true;
    }
    message.to_ascii_lowercase().contains("content policy")
}

/// Backoff before retry `n` (0-based): uniform in `[0, min(max, base × 2^n)]` (full jitter).
pub fn backoff(cfg: &RetryConfig, n: u32, rng: &mut impl Rng) -> Duration {
    let cap = backoff_cap(cfg, n);
    if cap == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.gen_range(0..=cap))
}

/// The upper bound of the jittered backoff before retry `n`, in ms.
pub fn backoff_cap(cfg: &RetryConfig, n: u32) -> u64 {
    let exp = cfg
        .base_backoff_ms
        .saturating_mul(1u64.checked_shl(n.min(32)).unwrap_or(u64::MAX));
    exp.min(cfg.max_backoff_ms)
}

/// The instant by which the first byte must be on its way.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

impl Deadline {
    pub fn after(from: Instant, ms: u64) -> Deadline {
        Deadline(from + Duration::from_millis(ms))
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= self.0
    }

    /// Whether waiting `wait` still leaves time for an attempt.
    pub fn allows_wait(&self, wait: Duration) -> bool {
        wait < self.remaining()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn upstream(status: u16, code: Option<&str>, message: &str) -> GatewayError {
        GatewayError::Upstream {
            status,
            message: message.to_string(),
            retry_after_s: None,
            param: None,
            code: code.map(str::to_string),
        }
    }

    #[test]
    fn client_faults_are_never_retried() {
        assert_eq!(
            classify(&upstream(400, None, "bad temperature"), false),
            Disposition::Fatal
        );
        assert_eq!(
            classify(&upstream(422, None, "x"), false),
            Disposition::Fatal
        );
        assert_eq!(
            classify(&GatewayError::bad_request("x"), false),
            Disposition::Fatal
        );
    }

    #[test]
    fn server_faults_retry_and_limits_move_on() {
        for s in [500, 502, 503, 529] {
            assert_eq!(classify(&upstream(s, None, "x"), false), Disposition::Retry);
        }
        assert_eq!(
            classify(&upstream(429, None, "x"), false),
            Disposition::NextDeployment
        );
        assert_eq!(
            classify(&upstream(401, None, "x"), false),
            Disposition::NextDeployment
        );
        assert_eq!(
            classify(&GatewayError::UpstreamUnavailable("reset".into()), false),
            Disposition::Retry
        );
        let timeout = GatewayError::UpstreamTimeout("no body".into());
        assert_eq!(classify(&timeout, false), Disposition::NextDeployment);
        assert_eq!(classify(&timeout, true), Disposition::Retry);
    }

    #[test]
    fn context_window_and_content_policy_are_recognised() {
        assert_eq!(
            classify(
                &upstream(400, Some("context_length_exceeded"), "too long"),
                false
            ),
            Disposition::ContextWindow
        );
        assert_eq!(
            classify(
                &upstream(
                    400,
                    None,
                    "prompt is too long: 250000 tokens > 200000 maximum"
                ),
                false
            ),
            Disposition::ContextWindow
        );
        assert_eq!(
            classify(
                &upstream(400, Some("content_policy_violation"), "no"),
                false
            ),
            Disposition::ContentPolicy
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let cfg = RetryConfig {
            base_backoff_ms: 100,
            max_backoff_ms: 1_000,
            ..RetryConfig::default()
        };
        assert_eq!(
            (0..6).map(|n| backoff_cap(&cfg, n)).collect::<Vec<_>>(),
            vec![100, 200, 400, 800, 1_000, 1_000]
        );
        assert_eq!(backoff_cap(&cfg, 200), 1_000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in 0..6 {
            let cap = Duration::from_millis(backoff_cap(&cfg, n));
            let samples: Vec<Duration> = (0..500).map(|_| backoff(&cfg, n, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d <= cap));
            // Full jitter spreads over the whole range: some short, some long waits.
            assert!(samples.iter().any(|d| *d < cap / 4), "{n}");
            assert!(samples.iter().any(|d| *d > cap * 3 / 4), "{n}");
        }
    }

    #[test]
    fn deadlines_bound_waits() {
        let d = Deadline::after(Instant::now(), 1_000);
        assert!(d.allows_wait(Duration::from_millis(10)));
        assert!(!d.allows_wait(Duration::from_secs(2)));
        assert!(!d.passed());
        assert!(Deadline::after(Instant::now(), 0).passed());
    }
}
