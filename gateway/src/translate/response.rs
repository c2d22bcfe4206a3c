//! Non-streaming responses across dialects.

use serde_json::{json, Value};

use super::{finish_reason_from_anthropic, stop_reason_from_openai, usage};
use crate::api::{anthropic, openai, unix_now};

/// An Anthropic `message` as an OpenAI `chat.completion`.
pub fn anthropic_to_openai(resp: &anthropic::MessagesResponse) -> Value {
    let mut text = String::new();
    let mut calls: Vec<Value> = Vec::new();
    for block in &resp.content {
        match block {
            anthropic::ContentBlock::Text { text: t, .. } => text.push_str(t),
            anthropic::ContentBlock::ToolUse { id, name, input } => calls
                .push(json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": input.to_string()}})),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) },
        "refusal": null});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let finish = resp
        .stop_reason
        .as_deref()
        .map(finish_reason_from_anthropic)
        .unwrap_or("stop");
    json!({
        "id": format!("chatcmpl-{}", resp.id.trim_start_matches("msg_")),
        "object": "chat.completion",
        "created": unix_now(),
        "model": resp.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        // A report that does not add up is shown as zeros (and billed by the gateway's count).
        "usage": usage::to_openai(&usage::from_anthropic(&resp.usage).unwrap_or_default()),
    })
}

/// An OpenAI `chat.completion` as an Anthropic `message`.
pub fn openai_to_anthropic(resp: &openai::ChatResponse) -> Value {
    let mut content: Vec<Value> = Vec::new();
    let choice = resp.choices.first();
    if let Some(c) = choice {
        let text = c
            .message
            .content
            .clone()
            .or_else(|| c.message.refusal.clone())
            .unwrap_or_default();
        if !text.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        for call in c.message.tool_calls.iter().flatten() {
            let input: Value =
                serde_json::from_str(&call.function.arguments).unwrap_or_else(|_| json!({}));
            content.push(json!({"type": "tool_use", "id": call.id,
                "name": call.function.name, "input": input}));
        }
    }
    let stop = choice
        .and_then(|c| c.finish_reason.as_deref())
        .map(stop_reason_from_openai)
        .unwrap_or("end_turn");
    let u = resp
        .usage
        .as_ref()
        .and_then(|u| usage::from_openai(u).ok())
        .unwrap_or_default();
    json!({
        "id": format!("msg_{}", resp.id.trim_start_matches("chatcmpl-")),
        "type": "message",
        "role": "assistant",
        "model": resp.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": usage::to_anthropic(&u),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_tool_use_becomes_tool_calls() {
        let resp: anthropic::MessagesResponse = serde_json::from_str(
            r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude","content":[
              {"type":"text","text":"Let me check."},
              {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}],
             "stop_reason":"tool_use","stop_sequence":null,
             "usage":{"input_tokens":10,"cache_read_input_tokens":4,"cache_creation_input_tokens":0,"output_tokens":20}}"#,
        )
        .unwrap();
        let out = anthropic_to_openai(&resp);
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["choices"][0]["message"]["content"], "Let me check.");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(out["usage"]["prompt_tokens"], 14);
        assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        assert_eq!(out["usage"]["completion_tokens"], 20);
    }

    #[test]
    fn openai_completion_becomes_message() {
        let resp: openai::ChatResponse = serde_json::from_str(
            r#"{"id":"chatcmpl-9","object":"chat.completion","created":1,"model":"gpt-4o",
             "choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"length"}],
             "usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":2}}}"#,
        )
        .unwrap();
        let out = openai_to_anthropic(&resp);
        assert_eq!(out["id"], "msg_9");
        assert_eq!(out["content"][0]["text"], "Hi");
        assert_eq!(out["stop_reason"], "max_tokens");
        assert_eq!(out["usage"]["input_tokens"], 10);
        assert_eq!(out["usage"]["cache_read_input_tokens"], 2);
        assert_eq!(out["usage"]["output_tokens"], 3);
    }
}
