//! The model name the client sees: responses name the model the client asked for (an alias
//! such as `smart`), not the deployment's upstream model (`gpt-4o-2024-08-06`), which stays in
//! the completion event and the `x-tollgate-upstream-model` header.
//!
//! A same-dialect response is forwarded as the upstream wrote it, so the name is replaced in
//! place: every `"model": "..."` member's string value, found by a byte scan. Inside a JSON
//! string a quote is escaped, so `"model"` followed by a colon can only be a member name; a
//! response without one is left as it is.

use bytes::BytesMut;
use memchr::memmem;

use super::{SseFrame, StreamAdapter, StreamState};

static MODEL_KEY: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\"model\""));

/// `json` with the value of every `"model"` member set to `name` (a JSON string, quotes
/// included); `None` when it has no such member or every one already says `name`.
pub fn rename_model(json: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut at = 0;
    while let Some(i) = MODEL_KEY.find(&json[at..]) {
        let key_end = at + i + b"\"model\"".len();
        at = key_end;
        let Some(value) = string_value_after(json, key_end) else {
            continue;
        };
        if &json[value.clone()] != name {
            let buf = out.get_or_insert_with(|| Vec::with_capacity(json.len() + name.len()));
            buf.extend_from_slice(&json[copied..value.start]);
            buf.extend_from_slice(name);
            copied = value.end;
        }
        at = value.end;
    }
    let mut buf = out?;
    buf.extend_from_slice(&json[copied..]);
    Some(buf)
}

/// The range of the JSON string (quotes included) that follows `: ` at `from`, if any.
fn string_value_after(json: &[u8], from: usize) -> Option<std::ops::Range<usize>> {
    let skip_ws = |mut i: usize| {
        while json.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let colon = skip_ws(from);
    if json.get(colon) != Some(&b':') {
        return None;
    }
    let start = skip_ws(colon + 1);
    if json.get(start) != Some(&b'"') {
        return None;
    }
    let mut i = start + 1;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return Some(start..i + 1),
            _ => i += 1,
        }
    }
    None
}

/// A stream adapter whose output names `name` as the model.
pub struct Renamed {
    inner: Box<dyn StreamAdapter>,
    /// The name as a JSON string.
    name: Vec<u8>,
}

impl Renamed {
    /// `inner`'s output with `model` as the model's name.
    pub fn wrap(inner: Box<dyn StreamAdapter>, model: &str) -> Box<dyn StreamAdapter> {
        match serde_json::to_vec(model) {
            Ok(name) => Box::new(Renamed { inner, name }),
            Err(_) => inner,
        }
    }

    fn rename_from(&self, out: &mut BytesMut, from: usize) {
        if let Some(renamed) = rename_model(&out[from..], &self.name) {
            out.truncate(from);
            out.extend_from_slice(&renamed);
        }
    }
}

impl StreamAdapter for Renamed {
    fn on_frame(&mut self, frame: SseFrame, out: &mut BytesMut) {
        let from = out.len();
        self.inner.on_frame(frame, out);
        self.rename_from(out, from);
    }

    fn on_end(&mut self, out: &mut BytesMut) {
        let from = out.len();
        self.inner.on_end(out);
        self.rename_from(out, from);
    }

    fn on_error(&mut self, message: &str, out: &mut BytesMut) {
        self.inner.on_error(message, out);
    }

    fn state(&self) -> &StreamState {
        self.inner.state()
    }

    fn output_text(&self) -> String {
        self.inner.output_text()
    }

    fn keep_output_text(&mut self) {
        self.inner.keep_output_text();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renamed(json: &str) -> Option<String> {
        rename_model(json.as_bytes(), br#""smart""#).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn every_model_member_is_renamed_whatever_its_spacing() {
        assert_eq!(
            renamed(r#"{"id":"c","model":"gpt-4o-2024-08-06","choices":[]}"#).as_deref(),
            Some(r#"{"id":"c","model":"smart","choices":[]}"#)
        );
        assert_eq!(
            renamed(r#"{"message": {"model" : "claude-x", "id": "m"}}"#).as_deref(),
            Some(r#"{"message": {"model" : "smart", "id": "m"}}"#)
        );
        assert_eq!(
            renamed(r#"{"model":"a\"b","x":{"model":"c"}}"#).as_deref(),
            Some(r#"{"model":"smart","x":{"model":"smart"}}"#)
        );
    }

    #[test]
    fn text_that_mentions_model_is_left_alone() {
        // In a string the quotes are escaped; a member whose value is not a string stays.
        assert_eq!(
            renamed(r#"{"content":"the \"model\": \"x\" field","model":null}"#),
            None
        );
        assert_eq!(renamed(r#"{"model":"smart"}"#), None);
        assert_eq!(renamed(r#"{"model":"unterminated"#), None);
        assert_eq!(renamed(r#"{"model""#), None);
    }
}
