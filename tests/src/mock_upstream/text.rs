//! What the mock "generates" and how it counts tokens: deterministic, so tests can predict
//! every byte and every usage number.

use serde_json::Value;

/// Words after the first; piece `i >= 1` is `WORDS[(i - 1) % WORDS.len()]`. Each is a common
/// English word with its leading space, one token in the usual BPE vocabularies, so a
/// tokenizer-based fallback count of the reply agrees with the reported output tokens.
const WORDS: [&str; 16] = [
    " world", " this", " is", " a", " test", " of", " the", " stream", " and", " it", " goes",
    " on", " for", " a", " while", ".",
];

/// The `i`-th content piece of a text reply: `"Hello"`, then `" world"`, `" this"`, ...
pub fn reply_piece(i: usize) -> &'static str {
    match i.checked_sub(1) {
        None => "Hello",
        Some(j) => WORDS[j % WORDS.len()],
    }
}

/// The full text of a reply made of `pieces` content chunks.
pub fn reply_text(pieces: usize) -> String {
    (0..pieces).map(reply_piece).collect()
}

/// The `arguments` (OpenAI) / `input` (Anthropic) of the two parallel tool calls in the
/// `tools` scenario, as compact JSON.
pub const TOOL_CALL_ARGUMENTS: [&str; 2] = [
    r#"{"location":"Paris, France","unit":"celsius"}"#,
    r#"{"location":"Tokyo, Japan","unit":"celsius"}"#,
];

/// Size of the argument fragments a tool call is streamed in (the last may be shorter).
pub(crate) const TOOL_FRAGMENT_CHARS: usize = 7;

/// Text the Anthropic `tools` reply says before its `tool_use` blocks, one piece per delta.
pub(crate) const TOOL_PREAMBLE: [&str; 3] = ["I'll check", " the weather", " in both cities."];

/// The argument string of a tool call cut into its streamed fragments.
pub(crate) fn tool_fragments(arguments: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arguments;
    while !rest.is_empty() {
        let mut cut = TOOL_FRAGMENT_CHARS.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    out
}

/// Output tokens the mock reports for a `tools` reply: one per streamed argument fragment,
/// plus (Anthropic) one per preamble text piece.
pub fn tool_output_tokens(with_text_preamble: bool) -> u64 {
    let fragments: usize = TOOL_CALL_ARGUMENTS
        .iter()
        .map(|args| tool_fragments(args).len())
        .sum();
    let text = if with_text_preamble {
        TOOL_PREAMBLE.len()
    } else {
        0
    };
    (fragments + text) as u64
}

/// The prompt (input) token count the mock reports for a chat or messages request.
///
/// Rule: count the characters (Unicode scalar values) of all prompt text — the top-level
/// `system` (a string or an array of `{"text": ...}` blocks) and every message's `content`
/// (a string, or an array of parts whose `text` is counted; nested `content`, as in
/// Anthropic `tool_result` blocks, is counted too) — then divide by 4, rounding down, with a
/// minimum of 1. Tool definitions, images and other fields are not counted.
pub fn prompt_tokens_for(body: &Value) -> u64 {
    let mut chars = 0usize;
    if let Some(system) = body.get("system") {
        chars += text_chars(system);
    }
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for message in messages {
            if let Some(content) = message.get("content") {
                chars += text_chars(content);
            }
        }
    }
    ((chars / 4) as u64).max(1)
}

fn text_chars(value: &Value) -> usize {
    match value {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part {
                Value::String(s) => s.chars().count(),
                Value::Object(map) => {
                    map.get("text").map_or(0, text_chars) + map.get("content").map_or(0, text_chars)
                }
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Tokens the mock reports for an embeddings `input`: each string counts
/// `max(1, chars / 4)`, each pre-tokenized array counts its length.
pub fn embedding_tokens_for(input: &Value) -> u64 {
    fn one(item: &Value) -> u64 {
        match item {
            Value::String(s) => ((s.chars().count() / 4) as u64).max(1),
            Value::Array(tokens) => tokens.len() as u64,
            _ => 0,
        }
    }
    match input {
        Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
        Value::Array(items) => items.iter().map(one).sum(),
        other => one(other),
    }
}

/// A JSON string literal (with its quotes) for `s`.
pub(crate) fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn prompt_tokens_follow_the_documented_rule() {
        let openai = json!({"messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": [{"type": "text", "text": "efghijkl"}]}
        ]});
        assert_eq!(prompt_tokens_for(&openai), 3);
        let anthropic = json!({"system": [{"type": "text", "text": "abcdefgh"}], "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
              "content": [{"type": "text", "text": "abcd"}]}]}
        ]});
        assert_eq!(prompt_tokens_for(&anthropic), 3);
        assert_eq!(prompt_tokens_for(&json!({})), 1);
    }

    #[test]
    fn fragments_reassemble() {
        for args in TOOL_CALL_ARGUMENTS {
            let fragments = tool_fragments(args);
            assert!(fragments.len() > 2);
            assert_eq!(fragments.concat(), args);
        }
    }

    #[test]
    fn reply_pieces_are_stable() {
        assert_eq!(reply_text(3), "Hello world this");
        assert_eq!(reply_piece(17), " world");
    }
}
