//! The exact cache's key: SHA-256 over the tenant, the API, the model the client asked for and
//! the canonical JSON of every member of the request body that can change the answer.
//!
//! Canonical: object members sorted by name at every depth, no whitespace, numbers as
//! `serde_json` prints them (so `0.7` and `0.70` are one value), strings re-escaped the one
//! way `serde_json` escapes them. Field order and formatting never change the key; any change
//! of a value (`temperature`, `tools`, `response_format`, a message...) always does.
//!
//! Left out, because they do not change the answer: `user` and `metadata` (end-user ids for
//! abuse tracking). `stream` and `stream_options` stay in: a streamed answer is replayed as
//! the stream it was, a whole one as JSON, each under its own key.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;

/// Members that never change the answer.
const IGNORED: [&str; 2] = ["user", "metadata"];

/// A cache key (hex of the SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(pub String);

/// The key of a request: `tenant`, `api` (the route label), `model` as the client named it,
/// and its body.
pub fn cache_key(
    tenant: &str,
    api: &str,
    model: &str,
    body: &[u8],
) -> Result<CacheKey, GatewayError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::bad_request(format!("The body is not valid JSON: {e}")))?;
    let mut canonical = Vec::with_capacity(body.len());
    match &value {
        Value::Object(members) => {
            let mut names: Vec<&String> = members
                .keys()
                .filter(|k| !IGNORED.contains(&k.as_str()))
                .collect();
            names.sort();
            canonical.push(b'{');
            for (i, name) in names.into_iter().enumerate() {
                if i > 0 {
                    canonical.push(b',');
                }
                write_canonical(&Value::String(name.clone()), &mut canonical);
                canonical.push(b':');
                write_canonical(&members[name], &mut canonical);
            }
            canonical.push(b'}');
        }
        other => write_canonical(other, &mut canonical),
    }
    let mut h = Sha256::new();
    for part in [tenant.as_bytes(), api.as_bytes(), model.as_bytes()] {
        // Length-prefixed, so that no two (tenant, api, model) run into each other.
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(&canonical);
    Ok(CacheKey(hex::encode(h.finalize())))
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (name, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(&Value::String(name.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => {
            // Scalars print one way whatever the input's spelling.
            if serde_json::to_writer(&mut *out, scalar).is_err() {
                out.extend_from_slice(b"null");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(body: &str) -> CacheKey {
        cache_key("t1", "chat", "smart", body.as_bytes()).unwrap()
    }

    const BASE: &str = r#"{"model":"smart","temperature":0.7,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}}}}}]}"#;

    #[test]
    fn order_whitespace_and_number_spelling_do_not_change_the_key() {
        let reordered = r#"{ "tools": [ {"function": {"parameters": {"properties": {"b": {"type":"integer"}, "a": {"type":"string"}}, "type":"object"}, "name":"f"}, "type":"function"} ],
            "messages": [ {"content": "hi", "role": "user"} ], "temperature": 0.70, "model": "smart" }"#;
        assert_eq!(key(BASE), key(reordered));
        // End-user ids do not change the answer.
        let with_user = BASE.replacen('{', r#"{"user":"u-42","metadata":{"x":"y"},"#, 1);
        assert_eq!(key(BASE), key(&with_user));
    }

    #[test]
    fn any_changed_value_changes_the_key() {
        let changes = [
            BASE.replace("0.7", "0.8"),
            BASE.replace(r#""hi""#, r#""hi!""#),
            BASE.replace(r#""integer""#, r#""number""#),
            BASE.replacen('{', r#"{"response_format":{"type":"json_object"},"#, 1),
            BASE.replacen('{', r#"{"seed":1,"#, 1),
            BASE.replacen('{', r#"{"stream":true,"#, 1),
            BASE.replacen('{', r#"{"max_tokens":5,"#, 1),
            BASE.replacen('{', r#"{"tool_choice":"none","#, 1),
        ];
        for changed in &changes {
            assert_ne!(key(BASE), key(changed), "{changed}");
        }
        // Without tools is another request too.
        let v: Value = serde_json::from_str(BASE).unwrap();
        let mut no_tools = v.clone();
        no_tools.as_object_mut().unwrap().remove("tools");
        assert_ne!(key(BASE), key(&no_tools.to_string()));
    }

    #[test]
    fn tenants_apis_and_models_never_share_a_key() {
        let k = |t: &str, a: &str, m: &str| cache_key(t, a, m, BASE.as_bytes()).unwrap();
        assert_ne!(k("t1", "chat", "smart"), k("t2", "chat", "smart"));
        assert_ne!(k("t1", "chat", "smart"), k("t1", "messages", "smart"));
        assert_ne!(k("t1", "chat", "smart"), k("t1", "chat", "fast"));
        // Length prefixes: ("ab", "c") is not ("a", "bc").
        assert_ne!(k("ab", "c", "smart"), k("a", "bc", "smart"));
    }
}
