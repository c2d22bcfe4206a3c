//! Events end to end without external services: the relay reports one request, one chunk per
//! SSE data event the client receives and one completion per request, in every dialect
//! pairing; and the embedded default (the SQLite event log) receives them in order.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use serde_json::{json, Value};
use tollgate_gateway::events::LocalEventLog;
use tollgate_schemas::events::{ChunkEvent, CompletionEvent, RequestEvent};
use tollgate_tests::harness::{sse_events, Harness};
use tollgate_tests::mock_upstream::MockOptions;

fn chat(model: &str, include_usage: bool) -> Value {
    let mut b = json!({"model": model, "stream": true,
        "messages": [{"role": "user", "content": "Tell me about Paris."}]});
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

fn messages(model: &str) -> Value {
    json!({"model": model, "stream": true, "max_tokens": 256,
        "messages": [{"role": "user", "content": "Tell me about Paris."}]})
}

#[tokio::test]
async fn one_chunk_record_per_sse_event_the_client_receives_in_every_dialect() {
    let h = Harness::start().await;
    let cases = [
        ("/v1/chat/completions", chat("oa/normal", true)),
        ("/v1/chat/completions", chat("oa/normal", false)),
        ("/v1/chat/completions", chat("an/normal", true)),
        ("/v1/messages", messages("an/normal")),
        ("/v1/messages", messages("oa/normal")),
    ];
    for (n, (path, body)) in cases.iter().enumerate() {
        let resp = h.post(path, body).await;
        assert_eq!(resp.status(), 200);
        let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let text = resp.text().await.unwrap();
        let client_events = sse_events(&text).len() as u64;
        let done = h.completions(n + 1).await;
        let completion = done
            .iter()
            .find(|c| c.request_id == request_id)
            .expect("completion");
        let chunks: Vec<_> = h
            .sink
            .chunks()
            .into_iter()
            .filter(|c| c.stream.request_id == request_id)
            .collect();
        let case = format!("{path} {body}");
        assert_eq!(chunks.len() as u64, client_events, "{case}\n{text}");
        assert_eq!(completion.chunks, client_events, "{case}");
        let seqs: Vec<u64> = chunks.iter().map(|c| c.sequence).collect();
        assert_eq!(seqs, (0..client_events).collect::<Vec<_>>(), "{case}");
        // Without comment frames, the chunks' bytes are the whole body.
        let bytes: u64 = chunks.iter().map(|c| c.bytes).sum();
        assert_eq!(bytes, text.len() as u64, "{case}");
        assert!(chunks.windows(2).all(|w| w[0].offset <= w[1].offset));
        let requests = h.sink.requests();
        let r: Vec<_> = requests
            .iter()
            .filter(|r| r.request_id == request_id)
            .collect();
        assert_eq!(r.len(), 1, "{case}");
        assert_eq!(r[0].tenant_id, completion.tenant_id);
        assert!(r[0].prompt_estimate > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_event_log_receives_every_event_in_order() {
    let h = Harness::start_with_events(MockOptions::default(), "", "type = \"local\"").await;
    let mut ids = Vec::new();
    let mut client_events = Vec::new();
    for i in 0..6 {
        let body = if i % 2 == 0 {
            chat("oa/normal", true)
        } else {
            messages("an/normal")
        };
        let path = if i % 2 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/messages"
        };
        let resp = h.post(path, &body).await;
        assert_eq!(resp.status(), 200);
        ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_string());
        client_events.push(sse_events(&resp.text().await.unwrap()).len());
    }
    h.events.shutdown().await;

    let log = LocalEventLog::open(&LocalEventLog::default_path(h.data_dir()))
        .await
        .unwrap();
    let all = log.read(1, 10_000).await.unwrap();
    for (id, n) in ids.iter().zip(&client_events) {
        let mine: Vec<_> = all
            .iter()
            .filter(|r| serde_json::from_str::<Value>(&r.payload).unwrap()["request_id"] == **id)
            .collect();
        assert_eq!(mine.len(), n + 2, "{id}");
        let first: RequestEvent = serde_json::from_str(&mine[0].payload).unwrap();
        assert_eq!(mine[0].topic, "llm.requests");
        assert_eq!(mine[0].key, first.tenant_id);
        // Chunks in order; the completion comes before the chunks that waited for it to be
        // durable (they are recorded as they leave, and carry no running count; the log may
        // also skip counting chunks committed with their completion).
        let at = mine
            .iter()
            .position(|r| r.topic == "llm.completions")
            .unwrap();
        let last: CompletionEvent = serde_json::from_str(&mine[at].payload).unwrap();
        assert_eq!(last.chunks, *n as u64);
        assert!(last.usage.output_tokens > 0);
        let chunks: Vec<(usize, ChunkEvent)> = mine
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 0 && *i != at)
            .map(|(i, r)| {
                assert_eq!(r.topic, "llm.chunks");
                (i, serde_json::from_str(&r.payload).unwrap())
            })
            .collect();
        for (seq, (i, c)) in chunks.iter().enumerate() {
            assert_eq!(c.sequence, seq as u64);
            if *i > at {
                assert_eq!(c.tokens, None, "{id}: chunk {seq}");
            }
        }
        assert!(
            at < mine.len() - 1,
            "{id}: the terminal event leaves after the completion"
        );
    }
    let mut offsets: Vec<u64> = all.iter().map(|r| r.offset).collect();
    offsets.dedup();
    assert_eq!(offsets.len(), all.len());
}
