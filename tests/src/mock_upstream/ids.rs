//! Identifiers and timestamps shaped like the real providers' (`chatcmpl-…`, `msg_01…`,
//! `toolu_01…`, `call_…`, `req_…`), unique within a process, with no randomness source needed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` pseudo-random characters from `alphabet`, different on every call.
fn token(len: usize, alphabet: &[u8]) -> String {
    let seed = COUNTER.fetch_add(1, Ordering::Relaxed) ^ process_salt();
    let mut state = splitmix64(seed);
    let mut out = String::with_capacity(len);
    for i in 0..len {
        if i % 8 == 7 {
            state = splitmix64(state);
        }
        let idx = (state % alphabet.len() as u64) as usize;
        state /= alphabet.len() as u64;
        out.push(char::from(alphabet[idx]));
    }
    out
}

fn process_salt() -> u64 {
    static SALT: AtomicU64 = AtomicU64::new(0);
    let salt = SALT.load(Ordering::Relaxed);
    if salt != 0 {
        return salt;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    SALT.store(now, Ordering::Relaxed);
    now
}

/// OpenAI chat completion id, e.g. `chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT`.
pub(crate) fn chatcmpl_id() -> String {
    format!("chatcmpl-{}", token(29, BASE62))
}

/// OpenAI tool call id, e.g. `call_DdmO9pD3xa9XTPNJ32zg2hcA`.
pub(crate) fn call_id() -> String {
    format!("call_{}", token(24, BASE62))
}

/// Anthropic message id, e.g. `msg_013Zva2CMHLNnXjNJJKqJ2EF`.
pub(crate) fn msg_id() -> String {
    format!("msg_01{}", token(22, BASE62))
}

/// Anthropic tool use id, e.g. `toolu_01T1x1fJ34qAmk2tNTrN7Up6`.
pub(crate) fn toolu_id() -> String {
    format!("toolu_01{}", token(22, BASE62))
}

/// OpenAI `x-request-id` value.
pub(crate) fn openai_request_id() -> String {
    format!("req_{}", token(32, b"0123456789abcdef"))
}

/// Anthropic `request-id` value.
pub(crate) fn anthropic_request_id() -> String {
    format!("req_011C{}", token(20, BASE62))
}

/// The `system_fingerprint` every OpenAI response carries.
pub(crate) const SYSTEM_FINGERPRINT: &str = "fp_560af6e559";

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `unix` seconds as an RFC 3339 UTC timestamp (`2025-01-31T12:00:00Z`), as Anthropic's
/// `anthropic-ratelimit-*-reset` headers carry it.
pub(crate) fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's date algorithms.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_real_shapes() {
        let a = chatcmpl_id();
        assert!(a.starts_with("chatcmpl-") && a.len() == 38);
        assert_ne!(a, chatcmpl_id());
        assert!(msg_id().starts_with("msg_01"));
        assert!(toolu_id().starts_with("toolu_01"));
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
    }
}
