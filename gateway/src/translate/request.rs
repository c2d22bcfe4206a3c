//! Request bodies across dialects.
//!
//! OpenAI → Anthropic: system and developer messages become `system`; tool results become
//! `tool_result` blocks in a user turn; consecutive same-role turns are merged (Anthropic
//! wants alternation); `max_tokens` is required there, so the OpenAI cap or
//! [`DEFAULT_MAX_TOKENS`] is sent; `temperature` is clamped to Anthropic's 0..=1;
//! `response_format` becomes a system instruction (Anthropic has no JSON mode); `n > 1` is
//! refused. Dropped (no Anthropic equivalent): `seed`, `logprobs`, `top_logprobs`,
//! `logit_bias`, penalties, `reasoning_effort`.
//!
//! Anthropic → OpenAI: `system` becomes the first message; `tool_result` blocks become `tool`
//! messages; `tool_use` blocks become `tool_calls`; images become `image_url` parts (data URLs
//! for base64). Dropped: `top_k`, `thinking`, cache-control marks.

use serde_json::{json, Map, Value};

use crate::api::{anthropic, openai};
use crate::error::GatewayError;

/// Output cap sent to Anthropic when an OpenAI client set none.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// An OpenAI chat request as an Anthropic Messages request for `upstream_model`.
pub fn openai_to_anthropic(
    req: &openai::ChatRequest,
    upstream_model: &str,
) -> Result<Value, GatewayError> {
    if req.n.unwrap_or(1) > 1 {
        return Err(GatewayError::bad_param(
            "`n` greater than 1 is not supported by Anthropic deployments.",
            "n",
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(anthropic::Role, Vec<Value>)> = Vec::new();
    let mut push = |role: anthropic::Role, blocks: Vec<Value>| {
        if blocks.is_empty() {
            return;
        }
        match turns.last_mut() {
            Some((r, existing)) if *r == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    };
    for (i, m) in req.messages.iter().enumerate() {
        match m {
            openai::ChatMessage::System { content, .. }
            | openai::ChatMessage::Developer { content, .. } => system.push(content.text()),
            openai::ChatMessage::User { content, .. } => {
                push(anthropic::Role::User, content_blocks(content, i)?)
            }
            openai::ChatMessage::Assistant {
                content,
                tool_calls,
                refusal,
                ..
            } => {
                let mut blocks = match content {
                    Some(c) => content_blocks(c, i)?,
                    None => Vec::new(),
                };
                if let Some(r) = refusal {
                    blocks.push(json!({"type": "text", "text": r}));
                }
                for (j, call) in tool_calls.iter().flatten().enumerate() {
                    let input: Value = if call.function.arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&call.function.arguments).map_err(|e| {
                            GatewayError::bad_param(
                                format!("tool call arguments are not valid JSON: {e}"),
                                format!("messages[{i}].tool_calls[{j}].function.arguments"),
                            )
                        })?
                    };
                    blocks.push(json!({"type": "tool_use", "id": call.id,
                        "name": call.function.name, "input": input}));
                }
                push(anthropic::Role::Assistant, blocks);
            }
            openai::ChatMessage::Tool {
                content,
                tool_call_id,
            } => push(
                anthropic::Role::User,
                vec![json!({"type": "tool_result", "tool_use_id": tool_call_id,
                    "content": content.text()})],
            ),
            openai::ChatMessage::Function { content, name } => push(
                anthropic::Role::User,
                vec![json!({"type": "text",
                    "text": format!("Result of {name}: {}", content.as_deref().unwrap_or(""))})],
            ),
        }
    }
    if let Some(instruction) = response_format_instruction(req.response_format.as_ref()) {
        system.push(instruction);
    }

    let mut body = Map::new();
    body.insert("model".into(), json!(upstream_model));
    body.insert(
        "max_tokens".into(),
        json!(req.output_cap().unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    body.insert(
        "messages".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, blocks)| json!({"role": role, "content": blocks}))
                .collect(),
        ),
    );
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(stop) = req.stop.clone() {
        body.insert("stop_sequences".into(), json!(stop.into_vec()));
    }
    if let Some(user) = &req.user {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
    if req.is_stream() {
        body.insert("stream".into(), json!(true));
    }
    let parallel_off = req.parallel_tool_calls == Some(false);
    if let Some(tools) = &req.tools {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut tool = json!({"name": t.function.name,
                    "input_schema": t.function.parameters.clone()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}}))});
                if let Some(d) = &t.function.description {
                    tool["description"] = json!(d);
                }
                tool
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    let choice = match &req.tool_choice {
        None => parallel_off.then(|| json!({"type": "auto"})),
        Some(openai::ToolChoice::Mode(m)) => Some(match m.as_str() {
            "none" => json!({"type": "none"}),
            "required" => json!({"type": "any"}),
            _ => json!({"type": "auto"}),
        }),
        Some(openai::ToolChoice::Named(n)) => {
            Some(json!({"type": "tool", "name": n.function.name}))
        }
    };
    if let Some(mut choice) = choice {
        if parallel_off && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = json!(true);
        }
        // Anthropic rejects tool_choice without tools.
        if req.tools.is_some() {
            body.insert("tool_choice".into(), choice);
        }
    }
    Ok(Value::Object(body))
}

fn response_format_instruction(format: Option<&openai::ResponseFormat>) -> Option<String> {
    match format? {
        openai::ResponseFormat::Text => None,
        openai::ResponseFormat::JsonObject => {
            Some("Respond with a single valid JSON object and nothing else.".to_string())
        }
        openai::ResponseFormat::JsonSchema { json_schema } => Some(format!(
            "Respond with a single valid JSON value and nothing else. It must conform to this JSON Schema (named `{}`): {}",
            json_schema.name,
            json_schema.schema.clone().unwrap_or(json!({}))
        )),
    }
}

fn content_blocks(content: &openai::Content, msg: usize) -> Result<Vec<Value>, GatewayError> {
    match content {
        openai::Content::Text(s) if s.is_empty() => Ok(Vec::new()),
        openai::Content::Text(s) => Ok(vec![json!({"type": "text", "text": s})]),
        openai::Content::Parts(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| match p {
                openai::ContentPart::Text { text } => Ok(json!({"type": "text", "text": text})),
                openai::ContentPart::Refusal { refusal } => {
                    Ok(json!({"type": "text", "text": refusal}))
                }
                openai::ContentPart::ImageUrl { image_url } => image_block(&image_url.url)
                    .ok_or_else(|| {
                        GatewayError::bad_param(
                            "image_url must be an https URL or a base64 data URL",
                            format!("messages[{msg}].content[{j}].image_url.url"),
                        )
                    }),
                openai::ContentPart::InputAudio { .. } | openai::ContentPart::File { .. } => {
                    Err(GatewayError::bad_param(
                        "audio and file parts are not supported by Anthropic deployments",
                        format!("messages[{msg}].content[{j}]"),
                    ))
                }
            })
            .collect(),
    }
}

fn image_block(url: &str) -> Option<Value> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',')?;
        let media_type = meta.strip_suffix(";base64")?;
        return Some(json!({"type": "image", "source": {"type": "base64",
            "media_type": media_type, "data": data}}));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Some(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    None
}

/// An Anthropic Messages request as an OpenAI chat request for `upstream_model`.
pub fn anthropic_to_openai(req: &anthropic::MessagesRequest, upstream_model: &str) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = &req.system {
        messages.push(json!({"role": "system", "content": system.text()}));
    }
    for m in &req.messages {
        let blocks = m.content.clone().into_blocks();
        match m.role {
            anthropic::Role::User => {
                let mut parts: Vec<Value> = Vec::new();
                for b in blocks {
                    match b {
                        anthropic::ContentBlock::ToolResult {
                            tool_use_id,
                            content,
                            is_error,
                        } => {
                            let mut text = content.map(|c| c.text()).unwrap_or_default();
                            if is_error == Some(true) {
                                text = format!("Error: {text}");
                            }
                            messages.push(
                                json!({"role": "tool", "tool_call_id": tool_use_id, "content": text}),
                            );
                        }
                        anthropic::ContentBlock::Text { text, .. } => {
                            parts.push(json!({"type": "text", "text": text}))
                        }
                        anthropic::ContentBlock::Image { source } => {
                            let url = match source {
                                anthropic::ImageSource::Base64 { media_type, data } => {
                                    format!("data:{media_type};base64,{data}")
                                }
                                anthropic::ImageSource::Url { url } => url,
                            };
                            parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                        }
                        _ => {}
                    }
                }
                if !parts.is_empty() {
                    let content = if parts.len() == 1 && parts[0]["type"] == "text" {
                        parts[0]["text"].clone()
                    } else {
                        Value::Array(parts)
                    };
                    messages.push(json!({"role": "user", "content": content}));
                }
            }
            anthropic::Role::Assistant => {
                let mut text = String::new();
                let mut calls: Vec<Value> = Vec::new();
                for b in blocks {
                    match b {
                        anthropic::ContentBlock::Text { text: t, .. } => text.push_str(&t),
                        anthropic::ContentBlock::ToolUse { id, name, input } => calls
                            .push(json!({"id": id, "type": "function",
                                "function": {"name": name, "arguments": input.to_string()}})),
                        _ => {}
                    }
                }
                let mut msg = json!({"role": "assistant",
                    "content": if text.is_empty() { Value::Null } else { json!(text) }});
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                messages.push(msg);
            }
        }
    }

    let mut body = Map::new();
    body.insert("model".into(), json!(upstream_model));
    body.insert("messages".into(), Value::Array(messages));
    body.insert("max_tokens".into(), json!(req.max_tokens));
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(stop) = &req.stop_sequences {
        body.insert("stop".into(), json!(stop));
    }
    if let Some(user) = req.metadata.as_ref().and_then(|m| m.user_id.clone()) {
        body.insert("user".into(), json!(user));
    }
    if req.is_stream() {
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = &req.tools {
        let tools: Vec<Value> = tools
            .iter()
            .filter(|t| t.input_schema.is_some())
            .map(|t| {
                let mut f = json!({"name": t.name, "parameters": t.input_schema});
                if let Some(d) = &t.description {
                    f["description"] = json!(d);
                }
                json!({"type": "function", "function": f})
            })
            .collect();
        if !tools.is_empty() {
            body.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = &req.tool_choice {
        let (value, disable_parallel) = match choice {
            anthropic::ToolChoice::Auto {
                disable_parallel_tool_use,
            } => (json!("auto"), *disable_parallel_tool_use),
            anthropic::ToolChoice::Any {
                disable_parallel_tool_use,
            } => (json!("required"), *disable_parallel_tool_use),
            anthropic::ToolChoice::Tool {
                name,
                disable_parallel_tool_use,
            } => (
                json!({"type": "function", "function": {"name": name}}),
                *disable_parallel_tool_use,
            ),
            anthropic::ToolChoice::None => (json!("none"), None),
        };
        if body.contains_key("tools") {
            body.insert("tool_choice".into(), value);
            if disable_parallel == Some(true) {
                body.insert("parallel_tool_calls".into(), json!(false));
            }
        }
    }
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai(body: &str) -> openai::ChatRequest {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn openai_to_anthropic_maps_system_tools_and_results() {
        let req = openai(
            r#"{"model":"gpt-4o","max_completion_tokens":50,"temperature":1.5,"stop":"END",
            "messages":[{"role":"system","content":"Be brief."},
              {"role":"user","content":[{"type":"text","text":"Weather?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,QUJD"}}]},
              {"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},
                {"id":"call_2","type":"function","function":{"name":"get_time","arguments":"{}"}}]},
              {"role":"tool","tool_call_id":"call_1","content":"sunny"},
              {"role":"tool","tool_call_id":"call_2","content":"noon"}],
            "tools":[{"type":"function","function":{"name":"get_weather","description":"d","parameters":{"type":"object"}}}],
            "tool_choice":"required","parallel_tool_calls":false,"stream":true}"#,
        );
        let out = openai_to_anthropic(&req, "claude-x").unwrap();
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["system"], "Be brief.");
        assert_eq!(out["max_tokens"], 50);
        assert_eq!(out["temperature"], 1.0);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        let msgs = out["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0]["content"][1]["source"]["media_type"], "image/png");
        assert_eq!(msgs[1]["content"][0]["input"]["city"], "Paris");
        // Both tool results merged into one user turn.
        assert_eq!(msgs[2]["role"], "user");
        assert_eq!(msgs[2]["content"].as_array().unwrap().len(), 2);
        assert_eq!(
            out["tool_choice"],
            json!({"type":"any","disable_parallel_tool_use":true})
        );
        assert_eq!(out["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(out["stream"], true);
    }

    #[test]
    fn invalid_tool_arguments_name_the_field() {
        let req = openai(
            r#"{"model":"m","messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{oops"}}]}]}"#,
        );
        let err = openai_to_anthropic(&req, "c").unwrap_err();
        assert!(
            matches!(err, GatewayError::BadRequest { param: Some(p), .. } if p == "messages[0].tool_calls[0].function.arguments")
        );
    }

    #[test]
    fn n_above_one_is_refused() {
        let req = openai(r#"{"model":"m","n":2,"messages":[{"role":"user","content":"x"}]}"#);
        assert!(openai_to_anthropic(&req, "c").is_err());
    }

    #[test]
    fn anthropic_to_openai_maps_blocks_and_choice() {
        let req: anthropic::MessagesRequest = serde_json::from_str(
            r#"{"model":"claude","max_tokens":20,"system":"Sys","stream":true,
            "messages":[{"role":"user","content":"Hi"},
              {"role":"assistant","content":[{"type":"text","text":"Calling."},{"type":"tool_use","id":"tu_1","name":"f","input":{"a":1}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"tu_1","content":[{"type":"text","text":"done"}]},{"type":"text","text":"Thanks"}]}],
            "tools":[{"name":"f","input_schema":{"type":"object"}}],
            "tool_choice":{"type":"tool","name":"f","disable_parallel_tool_use":true},"top_k":5}"#,
        )
        .unwrap();
        let out = anthropic_to_openai(&req, "gpt-4o");
        let msgs = out["messages"].as_array().unwrap();
        assert_eq!(msgs[0], json!({"role":"system","content":"Sys"}));
        assert_eq!(
            msgs[2]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(
            msgs[3],
            json!({"role":"tool","tool_call_id":"tu_1","content":"done"})
        );
        assert_eq!(msgs[4], json!({"role":"user","content":"Thanks"}));
        assert_eq!(out["tool_choice"]["function"]["name"], "f");
        assert_eq!(out["parallel_tool_calls"], false);
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert!(out.get("top_k").is_none());
    }
}
