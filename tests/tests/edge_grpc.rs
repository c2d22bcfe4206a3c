//! The edge's gRPC services called the way Envoy calls them (a tonic client), against an
//! in-process gateway with the embedded store and in-memory limiter: ext_authz decisions
//! and headers, requests and token hits (`hits_addend`) per key and tenant, health.

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
