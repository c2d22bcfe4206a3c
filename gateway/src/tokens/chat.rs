//! The pre-flight estimate of an OpenAI Chat Completions request's prompt tokens.
//!
//! Messages follow the OpenAI cookbook ("How to count tokens with tiktoken"): every message
//! costs 3 tokens plus its role and content, a `name` costs its tokens plus 1 (the
//! `gpt-3.5-turbo-0301` snapshot: 4 per message, and a name replaces the role), and the reply
//! is primed with 3 more. Tool definitions follow the cookbook's `num_tokens_for_tools`:
//! per function `func_init` (7 on GPT-4o and later, 10 on GPT-4 and GPT-3.5) plus
//! `name:description`, per property 3 plus `name:type:description`, 3 more when there are
//! properties, per enum value 3 plus its tokens (less 3 per enum), and 12 once at the end.
//! Nested objects and array items, `response_format` schemas and tool calls have no published
//! formula: they are counted the same way, an approximation.

use serde_json::Value;

use super::media::{self, ImageDetail};
use super::{Family, Tally, CLAUDE_TEXT_FACTOR};
use crate::api::openai;

/// Tokens priming the assistant's reply (`<|start|>assistant<|message|>`).
const REPLY_PRIMING: u64 = 3;
/// Per tool call in an assistant message, beyond its name and arguments (the recipient and
/// separators; unpublished, an approximation).
const TOOL_CALL_OVERHEAD: u64 = 3;

/// The cookbook's constants for tool definitions.
struct ToolCosts {
    func_init: u64,
    prop_init: u64,
    prop_key: u64,
    enum_init: i64,
    enum_item: u64,
    func_end: u64,
}

/// Per-model constants of the chat format.
struct Format {
    enc: super::TextCounter,
    family: Family,
    per_message: u64,
    /// Added per `name` on top of its tokens; -1 on `gpt-3.5-turbo-0301`, where the name
    /// replaces the role.
    per_name: i64,
    tools: ToolCosts,
}

impl Format {
    fn for_model(model: &str, enc: super::TextCounter) -> Format {
        let m = super::bare(model);
        let legacy_0301 = m.starts_with("gpt-3.5-turbo-0301") || m.starts_with("gpt-35-turbo-0301");
        Format {
            enc,
            family: Family::of(model),
            per_message: if legacy_0301 { 4 } else { 3 },
            per_name: if legacy_0301 { -1 } else { 1 },
            tools: ToolCosts {
                func_init: if super::uses_cl100k(model) { 10 } else { 7 },
                prop_init: 3,
                prop_key: 3,
                enum_init: -3,
                enum_item: 3,
                func_end: 12,
            },
        }
    }

    fn count(&self, text: &str) -> u64 {
        self.enc.count(text)
    }
}

/// Estimated prompt tokens of an OpenAI chat request: messages (roles, names, text, images,
/// files, tool calls), tool definitions and a `json_schema` response format.
pub fn count_openai_prompt(req: &openai::ChatRequest) -> u64 {
    openai_prompt(req, super::TextCounter::exact(&req.model))
}

/// [`count_openai_prompt`] for the pre-flight estimate: never waits for the encoding to load
/// (see the module's "Memory").
pub fn estimate_openai_prompt(req: &openai::ChatRequest) -> u64 {
    openai_prompt(req, super::TextCounter::estimate(&req.model))
}

fn openai_prompt(req: &openai::ChatRequest, enc: super::TextCounter) -> u64 {
    let model = req.model.as_str();
    let f = Format::for_model(model, enc);
    let mut t = Tally::default();
    t.fixed(REPLY_PRIMING);
    for m in &req.messages {
        count_message(&f, model, m, &mut t);
    }
    if let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) {
        for tool in tools {
            let d = &tool.function;
            count_function(
                &f,
                &d.name,
                d.description.as_deref(),
                d.parameters.as_ref(),
                &mut t,
            );
        }
        t.fixed(f.tools.func_end);
    }
    if let Some(openai::ResponseFormat::JsonSchema { json_schema: s }) = &req.response_format {
        count_function(
            &f,
            &s.name,
            s.description.as_deref(),
            s.schema.as_ref(),
            &mut t,
        );
        t.fixed(f.tools.func_end);
    }
    let factor = if f.family == Family::Claude {
        CLAUDE_TEXT_FACTOR
    } else {
        1.0
    };
    t.total(factor)
}

fn count_message(f: &Format, model: &str, m: &openai::ChatMessage, t: &mut Tally) {
    use openai::ChatMessage as M;
    t.fixed(f.per_message);
    let (role, name) = match m {
        M::System { name, .. } => ("system", name.as_deref()),
        M::Developer { name, .. } => ("developer", name.as_deref()),
        M::User { name, .. } => ("user", name.as_deref()),
        M::Assistant { name, .. } => ("assistant", name.as_deref()),
        M::Tool { .. } => ("tool", None),
        M::Function { name, .. } => ("function", Some(name.as_str())),
    };
    t.fixed(f.count(role));
    if let Some(name) = name {
        t.text(f.count(name));
        if f.per_name >= 0 {
            t.fixed(f.per_name.unsigned_abs());
        } else {
            t.fixed = t.fixed.saturating_sub(f.per_name.unsigned_abs());
        }
    }
    match m {
        M::System { content, .. }
        | M::Developer { content, .. }
        | M::User { content, .. }
        | M::Tool { content, .. } => count_content(f, model, content, t),
        M::Assistant {
            content,
            tool_calls,
            refusal,
            ..
        } => {
            if let Some(c) = content {
                count_content(f, model, c, t);
            }
            if let Some(r) = refusal {
                t.text(f.count(r));
            }
            for call in tool_calls.iter().flatten() {
                t.text(f.count(&call.function.name) + f.count(&call.function.arguments));
                t.fixed(TOOL_CALL_OVERHEAD);
            }
        }
        M::Function { content, .. } => t.text(f.count(content.as_deref().unwrap_or(""))),
    }
}

fn count_content(f: &Format, model: &str, content: &openai::Content, t: &mut Tally) {
    match content {
        openai::Content::Text(s) => t.text(f.count(s)),
        openai::Content::Parts(parts) => {
            for p in parts {
                match p {
                    openai::ContentPart::Text { text } => t.text(f.count(text)),
                    openai::ContentPart::Refusal { refusal } => t.text(f.count(refusal)),
                    openai::ContentPart::ImageUrl { image_url } => {
                        let dims = media::image_dims_url(&image_url.url);
                        t.fixed(if f.family == Family::Claude {
                            media::anthropic_image_tokens(dims)
                        } else {
                            let detail = ImageDetail::parse(image_url.detail.as_deref());
                            media::openai_image_tokens(model, dims, detail)
                        });
                    }
                    openai::ContentPart::File { file } => t.fixed(file_tokens(file)),
                    // Audio is billed by duration, which the estimate does not read.
                    openai::ContentPart::InputAudio { .. } => {}
                }
            }
        }
    }
}

/// A `file` part: a PDF as a data URL in `file_data`, or a `file_id` (one page assumed).
fn file_tokens(file: &Value) -> u64 {
    match file.get("file_data").and_then(Value::as_str) {
        Some(data) if data.starts_with("data:") => media::pdf_tokens_url(data),
        Some(data) => media::pdf_tokens_base64(data),
        None => media::PDF_PAGE_TOKENS,
    }
}

/// One function definition by the cookbook's formula (also used for a response schema).
fn count_function(
    f: &Format,
    name: &str,
    description: Option<&str>,
    parameters: Option<&Value>,
    t: &mut Tally,
) {
    t.fixed(f.tools.func_init);
    let desc = description.unwrap_or("");
    t.text(f.count(&format!(
        "{name}:{}",
        desc.strip_suffix('.').unwrap_or(desc)
    )));
    if let Some(props) = parameters.and_then(properties) {
        count_properties(f, props, t, 0);
    }
}

/// The `properties` of an object schema, if it has any.
fn properties(schema: &Value) -> Option<&serde_json::Map<String, Value>> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .filter(|p| !p.is_empty())
}

/// Nesting beyond this depth is not counted (a schema can be deep or recursive via `$ref`;
/// the estimate stays bounded).
const MAX_DEPTH: usize = 8;

fn count_properties(
    f: &Format,
    props: &serde_json::Map<String, Value>,
    t: &mut Tally,
    depth: usize,
) {
    if depth > MAX_DEPTH {
        return;
    }
    let c = &f.tools;
    t.fixed(c.prop_init);
    for (key, schema) in props {
        t.fixed(c.prop_key);
        if let Some(items) = schema.get("enum").and_then(Value::as_array) {
            count_enum(f, items, t);
        }
        let desc = schema
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("");
        let desc = desc.strip_suffix('.').unwrap_or(desc);
        t.text(f.count(&format!("{key}:{}:{desc}", type_name(schema))));
        // Nested objects and arrays of objects: their properties, counted the same way.
        if let Some(nested) = properties(schema) {
            count_properties(f, nested, t, depth + 1);
        }
        if let Some(items) = schema.get("items") {
            if let Some(e) = items.get("enum").and_then(Value::as_array) {
                count_enum(f, e, t);
            }
            if let Some(nested) = properties(items) {
                count_properties(f, nested, t, depth + 1);
            }
        }
    }
}

fn count_enum(f: &Format, items: &[Value], t: &mut Tally) {
    let c = &f.tools;
    let mut n: i64 = c.enum_init;
    for item in items {
        let text = match item {
            Value::String(s) => f.count(s),
            other => f.count(&other.to_string()),
        };
        n += (c.enum_item + text) as i64;
    }
    if n >= 0 {
        t.text(n.unsigned_abs());
    } else {
        t.fixed = t.fixed.saturating_sub(n.unsigned_abs());
    }
}

/// A schema's `type` as the cookbook writes it: `string`, or `string | null` for a list.
fn type_name(schema: &Value) -> String {
    match schema.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" | "),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> openai::ChatRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn overhead_follows_the_cookbook() {
        // 3 priming + 3 per message + 1 role + 2 content tokens.
        let r = req(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#);
        assert_eq!(count_openai_prompt(&r), 9);
    }

    #[test]
    fn a_name_costs_its_tokens_plus_one() {
        let plain = req(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#);
        let named =
            req(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi","name":"bob"}]}"#);
        assert_eq!(
            count_openai_prompt(&named) - count_openai_prompt(&plain),
            super::super::count_text("gpt-4o", "bob") + 1
        );
    }

    #[test]
    fn images_and_files_use_the_published_formulas() {
        let url = "https://example.com/cat.png";
        let body = |detail: &str| {
            format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{url}","detail":"{detail}"}}}}]}}]}}"#
            )
        };
        let base = 3 + 3 + 1;
        assert_eq!(count_openai_prompt(&req(&body("low"))), base + 85);
        assert_eq!(count_openai_prompt(&req(&body("high"))), base + 765);
        let file = req(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-1"}}]}]}"#,
        );
        assert_eq!(count_openai_prompt(&file), base + media::PDF_PAGE_TOKENS);
    }

    #[test]
    fn odd_schemas_do_not_panic() {
        let r = req(r#"{"model":"gpt-4","messages":[],"tools":[
              {"type":"function","function":{"name":"f"}},
              {"type":"function","function":{"name":"g","parameters":{"properties":{"a":{"enum":[]}}}}},
              {"type":"function","function":{"name":"h","parameters":{"properties":{"a":{"type":["string","null"],"enum":[1,null,{"x":1}]},"b":{"type":"array","items":{"type":"object","properties":{"c":{"type":"string"}}}}}}}}]}"#);
        assert!(count_openai_prompt(&r) > 3 + 12);
    }
}
