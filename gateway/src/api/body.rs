//! [`RequestBody`]: a client's JSON request as sent, validated once and forwarded without
//! being rebuilt.
//!
//! The body is read twice, neither time into a `serde_json::Value`: a skim that records where
//! each top-level member's value lies (no allocation per value), and the typed parse that
//! validates it (a wrong field type is a 400 naming the field). A same-dialect upstream gets
//! the client's bytes member by member, with the few members the gateway sets (`model`,
//! `stream_options`) written in place — so fields the typed view does not know pass through
//! byte for byte, and nothing is serialized that the client already wrote.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde::de::{DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// A top-level JSON object as the client sent it.
#[derive(Debug, Clone)]
pub struct RequestBody {
    bytes: Bytes,
    members: Vec<Member>,
}

#[derive(Debug, Clone)]
struct Member {
    key: Key,
    /// Where the member's value lies in the body.
    value: Range<usize>,
}

/// A member name: where it lies in the body when it has no escapes (the common case), else
/// its unescaped text.
#[derive(Debug, Clone)]
enum Key {
    InBody(Range<usize>),
    Unescaped(String),
}

impl RequestBody {
    /// Validates `bytes` as a JSON object and as `T`; errors are 400s in the API's words
    /// (unparseable JSON, not an object, or the field whose value is wrong).
    pub fn parse<T: DeserializeOwned>(bytes: Bytes) -> Result<(RequestBody, T), GatewayError> {
        // The typed parse straight from the bytes first. Only a body it refuses is read into
        // a `Value`: that finds the field to name, and accepts what JSON allows and derived
        // types do not (a repeated member: the last one counts).
        let typed = match serde_json::from_slice::<T>(&bytes) {
            Ok(t) => t,
            Err(_) => super::parse_body::<T>(&bytes)?.1,
        };
        let members = match serde_json::from_slice::<Members<'_>>(&bytes) {
            Ok(m) => m.0,
            Err(e) => {
                return Err(GatewayError::bad_request(format!(
                    "We could not parse the JSON body of your request: {e}"
                )))
            }
        };
        // Borrowed names and raw values point into `bytes`: their offsets are kept.
        let (base, len) = (bytes.as_ptr() as usize, bytes.len());
        let within = |s: &str| {
            let start = (s.as_ptr() as usize).checked_sub(base)?;
            let end = start.checked_add(s.len()).filter(|end| *end <= len)?;
            Some(start..end)
        };
        let members = members
            .into_iter()
            .map(|(key, value)| {
                Some(Member {
                    key: match key {
                        Cow::Borrowed(k) => Key::InBody(within(k)?),
                        Cow::Owned(k) => Key::Unescaped(k),
                    },
                    value: within(value.get())?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| GatewayError::Internal("request body members out of place".into()))?;
        let body = RequestBody { bytes, members };
        Ok((body, typed))
    }

    fn key<'a>(&'a self, m: &'a Member) -> &'a str {
        match &m.key {
            // In-body ranges come from `&str`s borrowed from these bytes: valid UTF-8.
            Key::InBody(r) => std::str::from_utf8(&self.bytes[r.clone()]).unwrap_or_default(),
            Key::Unescaped(k) => k,
        }
    }

    /// The body's bytes, shared (no copy).
    pub fn bytes(&self) -> Bytes {
        self.bytes.clone()
    }

    /// The body as the client sent it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The raw JSON of the last member named `key` (JSON objects keep the last duplicate).
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .rev()
            .find(|m| self.key(m) == key)
            .map(|m| &self.bytes[m.value.clone()])
    }

    /// The body with each `(name, raw JSON)` of `set` in place of the member of that name (at
    /// the position of its last occurrence; earlier duplicates are dropped), or appended when
    /// the client did not send it. Every other member is copied as sent.
    pub fn with(&self, set: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + 64);
        out.push(b'{');
        let mut written = vec![false; set.len()];
        for (i, m) in self.members.iter().enumerate() {
            let key = self.key(m);
            let value = match set.iter().position(|(k, _)| *k == key) {
                Some(j) => {
                    let last = !self.members[i + 1..].iter().any(|n| self.key(n) == key);
                    if !last {
                        continue;
                    }
                    written[j] = true;
                    set[j].1
                }
                None => &self.bytes[m.value.clone()],
            };
            push_member(&mut out, key, value);
        }
        for ((key, value), done) in set.iter().zip(written) {
            if !done {
                push_member(&mut out, key, value);
            }
        }
        out.push(b'}');
        out
    }
}

fn push_member(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    if out.len() > 1 {
        out.push(b',');
    }
    // A name is a string: serializing it cannot fail.
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
    out.extend_from_slice(value);
}

/// The top-level members of an object: names and raw values, borrowed from the input.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<Name<'de>>()? {
                    members.push((key.0, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// A member name, borrowed when it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::ChatRequest;

    fn parse(body: &str) -> Result<(RequestBody, ChatRequest), GatewayError> {
        RequestBody::parse(Bytes::copy_from_slice(body.as_bytes()))
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn members_are_replaced_in_place_and_unknown_ones_kept_as_sent() {
        let (body, req) = parse(
            r#" {"model":"alias","messages":[{"role":"user","content":"hi"}],
                "vendor_x":{"a": [1, 2.50]},"stream":true} "#,
        )
        .unwrap();
        assert_eq!(req.model, "alias");
        let out = body.with(&[
            ("model", br#""gpt-4o""#),
            ("stream_options", br#"{"include_usage":true}"#),
        ]);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"model":"gpt-4o","messages":"#),
            "{text}"
        );
        assert!(text.contains(r#""vendor_x":{"a": [1, 2.50]}"#), "{text}");
        assert!(
            text.ends_with(r#","stream_options":{"include_usage":true}}"#),
            "{text}"
        );
        assert_eq!(json(&out)["stream"], true);
        assert_eq!(body.get("stream"), Some(&b"true"[..]));
    }

    #[test]
    fn escaped_names_and_duplicates_come_out_as_json_keeps_them() {
        let (body, req) = parse(
            r#"{"model":"a","mo\u0064el":"b","messages":[{"role":"user","content":"x"}],"k\"q":1}"#,
        )
        .unwrap();
        assert_eq!(req.model, "b");
        assert_eq!(body.get("model"), Some(&br#""b""#[..]));
        let out = body.with(&[("model", br#""up""#)]);
        let v = json(&out);
        assert_eq!(v["model"], "up");
        assert_eq!(v["k\"q"], 1);
        assert_eq!(
            v.as_object().unwrap().len(),
            3,
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn bad_bodies_get_the_api_errors() {
        for (body, says) in [
            ("", "could not parse"),
            ("{\"model\":", "could not parse"),
            ("[1,2]", "must be a JSON object"),
            ("\"text\"", "must be a JSON object"),
            ("{\"model\":\"m\"} trailing", "could not parse"),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.to_string().contains(says), "{body:?}: {e}");
        }
        match parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":"two"}"#) {
            Err(GatewayError::BadRequest { param, .. }) => assert_eq!(param.as_deref(), Some("n")),
            other => panic!("unexpected {other:?}"),
        }
    }
}
