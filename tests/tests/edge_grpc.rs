//! The edge's gRPC services called the way Envoy calls them (a tonic client), against an
//! in-process gateway with the embedded store and in-memory limiter: ext_authz decisions
//! and headers, requests and token hits (`hits_addend`) per key and tenant, finished
//! requests' tokens recorded past the limit, health, reflection; and the token count the
//! gateway hands Envoy at a response's end (`x-tollgate-usage-tokens`, a stream's trailer).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::print_stderr
)] // test code: failing loudly and reporting measurements is the point

use std::collections::HashMap;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request as AttrRequest},
    authorization_client::AuthorizationClient,
    check_response::HttpResponse,
    AttributeContext, CheckRequest,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{
    rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient, RateLimitRequest,
    RateLimitResponse,
};
use serde_json::Value;
use tollgate_gateway::auth::keys;
use tollgate_gateway::store::{KeyLimits, NewKey, TenantLimit};
use tollgate_tests::harness::Harness;

/// Starts the edge services of `h`'s gateway on a loopback port; returns its URL.
async fn serve_edge(h: &Harness) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tollgate_gateway::edge::serve(
        listener,
        h.state.clone(),
        std::future::pending(),
    ));
    format!("http://{addr}")
}

/// A key of `tenant` with `limits`: (secret, key id).
async fn key(h: &Harness, tenant: &str, limits: KeyLimits) -> (String, String) {
    let k = keys::generate();
    let spec = NewKey {
        tenant_id: tenant.to_string(),
        name: "edge".to_string(),
        limits,
        ..Default::default()
    };
    let summary = h
        .state
        .store
        .create_key(&spec, &k.hash, &k.display_prefix)
        .await
        .unwrap();
    (k.secret, summary.id)
}

fn check_request(headers: &[(&str, &str)], path: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    path: path.to_string(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..HttpRequest::default()
                }),
                ..AttrRequest::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

#[tokio::test]
async fn ext_authz_passes_good_keys_with_identity_headers_and_refuses_the_rest() {
    let h = Harness::start().await;
    let url = serve_edge(&h).await;
    let mut client = AuthorizationClient::connect(url).await.unwrap();
    let bearer = format!("Bearer {}", h.key);

    let ok = client
        .check(check_request(
            &[("authorization", &bearer)],
            "/v1/chat/completions",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = ok.http_response else {
        panic!("an OK response");
    };
    let added: HashMap<String, String> = ok
        .headers
        .iter()
        .filter_map(|o| o.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    let caller = h.state.auth.authenticate_secret(&h.key).await.unwrap();
    assert_eq!(added["x-tollgate-tenant"], caller.tenant_id);
    assert_eq!(added["x-tollgate-key-id"], caller.key_id);
    assert_eq!(added["x-tollgate-key-hash"], keys::hash(&h.key));
    assert_eq!(ok.headers_to_remove, vec!["authorization", "x-api-key"]);

    // x-api-key works too; a bad key is a 401 in the API's shape, by path.
    let anthropic = client
        .check(check_request(&[("x-api-key", "tg_nope")], "/v1/messages"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        anthropic.status.unwrap().code,
        tonic::Code::Unauthenticated as i32
    );
    let Some(HttpResponse::DeniedResponse(denied)) = anthropic.http_response else {
        panic!("a denied response");
    };
    assert_eq!(denied.status.unwrap().code, 401);
    let body: Value = serde_json::from_str(&denied.body).unwrap();
    assert_eq!(body["type"], "error", "Anthropic's shape: {body}");
    let openai = client
        .check(check_request(&[], "/v1/chat/completions"))
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::DeniedResponse(denied)) = openai.http_response else {
        panic!("a denied response");
    };
    let body: Value = serde_json::from_str(&denied.body).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    // A suspended tenant is a 403.
    let (tenant, secret) = h.add_tenant("suspended").await;
    h.state
        .store
        .set_tenant_status(&tenant, "suspended")
        .await
        .unwrap();
    let r = client
        .check(check_request(
            &[("authorization", &format!("Bearer {secret}"))],
            "/v1/chat/completions",
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::DeniedResponse(denied)) = r.http_response else {
        panic!("a denied response");
    };
    assert_eq!(denied.status.unwrap().code, 403);
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        hits_addend: hits.map(|value| envoy_types::pb::google::protobuf::UInt64Value { value }),
        ..RateLimitDescriptor::default()
    }
}

async fn ask(
    client: &mut RateLimitServiceClient<tonic::transport::Channel>,
    descriptors: Vec<RateLimitDescriptor>,
) -> RateLimitResponse {
    client
        .should_rate_limit(RateLimitRequest {
            domain: "tollgate".to_string(),
            descriptors,
            hits_addend: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn the_rate_limit_service_counts_requests_and_token_hits_per_key_and_tenant() {
    let h = Harness::start().await;
    let url = serve_edge(&h).await;
    let mut client = RateLimitServiceClient::connect(url).await.unwrap();
    let (tenant, _) = h.add_tenant("metered").await;
    h.state
        .store
        .set_tenant_limit(&TenantLimit {
            tenant_id: tenant.clone(),
            model: "*".to_string(),
            limits: KeyLimits {
                rpm_limit: Some(3),
                ..KeyLimits::default()
            },
        })
        .await
        .unwrap();
    let (secret, key_id) = key(
        &h,
        &tenant,
        KeyLimits {
            rpm_limit: Some(2),
            tpm_limit: Some(1000),
            ..KeyLimits::default()
        },
    )
    .await;
    let hash = keys::hash(&secret);
    let by_key = || {
        descriptor(
            &[("tenant", &tenant), ("key", &key_id), ("credential", &hash)],
            None,
        )
    };
    let by_tenant = || descriptor(&[("tenant", &tenant), ("credential", &hash)], None);

    // Two requests fit the key's 2 per minute; the third is over, named, with headers.
    for remaining in [1, 0] {
        let r = ask(&mut client, vec![by_key(), by_tenant()]).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, remaining);
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            2
        );
        assert_eq!(
            r.statuses[1]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            3
        );
        assert!(
            r.response_headers_to_add.is_empty(),
            "the gateway sends them"
        );
    }
    let r = ask(&mut client, vec![by_key(), by_tenant()]).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    let headers: HashMap<&str, &str> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(headers["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["param"], "key_requests_per_minute");

    // Descriptors are counted each on its own (as Envoy's reference service does): the
    // refused request's tenant descriptor fit and counted, so the tenant's 3 are used.
    assert_eq!(r.statuses[1].limit_remaining, 0);
    let r = ask(&mut client, vec![by_tenant()]).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let body: Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["param"], "tenant_requests_per_minute");

    // Token costs: a finished stream's usage as hits_addend, against tokens per minute.
    let tokens = |hits| {
        descriptor(
            &[
                ("tenant", &tenant),
                ("key", &key_id),
                ("credential", &hash),
                ("usage", "tokens"),
            ],
            Some(hits),
        )
    };
    let r = ask(&mut client, vec![tokens(600)]).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].limit_remaining, 400);
    // Reading (0 hits) while under the limit is OK, then over once the window is full.
    assert_eq!(
        ask(&mut client, vec![tokens(0)]).await.overall_code,
        Code::Ok as i32
    );
    assert_eq!(
        ask(&mut client, vec![tokens(500)]).await.overall_code,
        Code::OverLimit as i32
    );
    assert_eq!(
        ask(&mut client, vec![tokens(400)]).await.overall_code,
        Code::Ok as i32
    );
    let full = ask(&mut client, vec![tokens(0)]).await;
    assert_eq!(full.overall_code, Code::OverLimit as i32);
    let body: Value = serde_json::from_slice(&full.raw_body).unwrap();
    assert_eq!(body["error"]["type"], "tokens", "{body}");

    // A finished request's tokens (`usage = tokens_used`, what Envoy sends when a stream
    // ends) are recorded even past the limit, never refused; the next read sees them.
    let used = |hits| {
        descriptor(
            &[
                ("tenant", &tenant),
                ("key", &key_id),
                ("credential", &hash),
                ("usage", "tokens_used"),
            ],
            Some(hits),
        )
    };
    let (other, other_id) = key(
        &h,
        &tenant,
        KeyLimits {
            tpm_limit: Some(100),
            ..KeyLimits::default()
        },
    )
    .await;
    let other_hash = keys::hash(&other);
    let read_other = || {
        descriptor(
            &[
                ("tenant", &tenant),
                ("key", &other_id),
                ("credential", &other_hash),
                ("usage", "tokens"),
            ],
            Some(0),
        )
    };
    let record_other = |hits| {
        descriptor(
            &[
                ("tenant", &tenant),
                ("key", &other_id),
                ("credential", &other_hash),
                ("usage", "tokens_used"),
            ],
            Some(hits),
        )
    };
    let r = ask(&mut client, vec![record_other(60)]).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].limit_remaining, 40);
    // 60 more do not fit in 100: recorded anyway (they were used), and still OK.
    let r = ask(&mut client, vec![record_other(60)]).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let r = ask(&mut client, vec![read_other()]).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32, "120 of 100 used");
    // The first key's full window takes records too.
    assert_eq!(
        ask(&mut client, vec![used(10)]).await.overall_code,
        Code::Ok as i32
    );

    // Descriptors not about a known key, and keys without limits, are OK and count nothing.
    let r = ask(
        &mut client,
        vec![
            descriptor(&[("generic_key", "x")], None),
            descriptor(&[("credential", &keys::hash(&h.key))], None),
            descriptor(&[("credential", "0000")], None),
        ],
    )
    .await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert!(r.statuses.iter().all(|s| s.current_limit.is_none()));

    // A descriptor whose tenant does not match its credential is an error, not a pass.
    let err = client
        .should_rate_limit(RateLimitRequest {
            domain: "tollgate".to_string(),
            descriptors: vec![descriptor(
                &[("tenant", "someone-else"), ("credential", &hash)],
                None,
            )],
            hits_addend: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn the_edge_reports_its_services_healthy() {
    let h = Harness::start().await;
    let url = serve_edge(&h).await;
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in [
        "",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ratelimit.v3.RateLimitService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
}

#[tokio::test]
async fn the_edge_lists_its_services_by_reflection() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let h = Harness::start().await;
    let url = serve_edge(&h).await;
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| {
        futures_util::stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }])
    };
    let mut answers = client
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("a list of services");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "envoy.service.auth.v3.Authorization",
            "envoy.service.ratelimit.v3.RateLimitService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    );

    // Health is described (its file descriptor is served)...
    let mut answers = client
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "grpc.health.v1.Health".to_string(),
        )))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap().message_response;
    assert!(
        matches!(answer, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{answer:?}"
    );
    // ...Envoy's services are not (envoy-types exports no descriptor set): not found.
    let mut answers = client
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "envoy.service.ratelimit.v3.RateLimitService".to_string(),
        )))
        .await
        .unwrap()
        .into_inner();
    let missing = answers.message().await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
}

/// Sends `request` (HTTP/1.1, `Connection: close`) to `base_url` and reads the whole raw
/// answer: status line, headers, and the chunked body with its trailers as sent.
async fn raw_http(base_url: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base_url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).await.unwrap();
    String::from_utf8(raw).unwrap()
}

fn chat_request(h: &Harness, body: &Value, te_trailers: bool) -> String {
    let body = body.to_string();
    let addr = h.base_url.trim_start_matches("http://");
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{}\r\n{body}",
        h.key,
        body.len(),
        if te_trailers { "te: trailers\r\n" } else { "" },
    )
}

/// The usage a response reports (the last `usage` object in it): prompt plus completion.
fn total_tokens(text: &str) -> u64 {
    let at = text.rfind("\"usage\":").expect("a usage object");
    let usage: Value = serde_json::Deserializer::from_str(&text[at + 8..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn responses_carry_their_tokens_for_the_edge_a_stream_as_a_trailer() {
    let h = Harness::start().await;
    // A whole answer: a header.
    let whole = h
        .post(
            "/v1/chat/completions",
            &serde_json::json!({"model": "oa/normal", "messages": [{"role": "user", "content": "count me"}]}),
        )
        .await;
    assert_eq!(whole.status(), 200);
    let header: u64 = whole.headers()["x-tollgate-usage-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = whole.text().await.unwrap();
    assert_eq!(header, total_tokens(&body), "{body}");
    assert!(header > 0);

    // A stream: declared in `Trailer`, sent after the last chunk to a client that accepts
    // trailers (Envoy, told to), with the stream's usage.
    let stream = serde_json::json!({
        "model": "oa/normal",
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "count me"}],
    });
    let raw = raw_http(&h.base_url, &chat_request(&h, &stream, true)).await;
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\ntrailer: x-tollgate-usage-tokens"),
        "{head}"
    );
    assert!(head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked"));
    let (_, trailer) = rest.rsplit_once("\r\n0\r\n").expect("the last chunk");
    let trailer_tokens: u64 = trailer
        .trim()
        .strip_prefix("x-tollgate-usage-tokens: ")
        .unwrap_or_else(|| panic!("trailer: {trailer:?}"))
        .parse()
        .unwrap();
    assert_eq!(trailer_tokens, total_tokens(rest));

    // Without `TE: trailers`, no trailer goes out (HTTP/1.1 clients that never asked).
    let raw = raw_http(&h.base_url, &chat_request(&h, &stream, false)).await;
    assert!(raw.ends_with("\r\n0\r\n\r\n"), "{raw:?}");
    assert!(!raw.contains("x-tollgate-usage-tokens: "));
}
