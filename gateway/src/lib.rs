//! The Tollgate gateway: one OpenAI- and Anthropic-compatible API in front of every provider.
//!
//! Where a request goes, in order:
//!
//! | module | owns |
//! |---|---|
//! | [`server`] | acceptor, one single-threaded serving runtime per core, busy polling |
//! | [`app`] | state, router, layers |
//! | [`routes`] | HTTP handlers per API surface |
//! | [`auth`] | API key format, authentication and its cache |
//! | [`edge`] | Envoy in front: ext_authz and rate-limit gRPC services, trusted identity headers |
//! | [`store`] | metadata store seam: PostgreSQL, SQLite embedded |
//! | [`admin`] | admin actions shared by the admin API and the CLI |
//! | [`secrets`] | provider credentials encrypted at rest (AES-256-GCM) |
//! | [`api`] | OpenAI and Anthropic request/response types, validation |
//! | [`cache`] | the exact response cache: key, memory and Redis stores |
//! | [`limits`] | quotas and rate limits: pre-flight estimate, reserve/settle (Redis or memory) |
//! | [`routing`] | model aliases → deployments; strategy, retries, fallbacks, breakers, hedging, rate-limit steering |
//! | [`providers`] | provider seam: OpenAI(-compatible), Anthropic, mock |
//! | [`translate`] | OpenAI ↔ Anthropic translation (requests, responses, streams, usage) |
//! | [`relay`] | SSE relay, usage capture, completion record |
//! | [`tokens`] | tiktoken counting (pre-flight estimate, fallback) |
//! | [`events`] | event-sink seam: request, chunk and completion events to Kafka (spooled when it is down) or the local log |
//! | [`invoices`] | invoices per tenant × period from the ledger's invoice lines; CSV/JSON/HTML |
//! | [`billing`] | `[billing]` config; the billing pipeline embedded in the gateway process |
//! | [`metrics`] | Prometheus metrics |
//! | [`access_log`] | one log line per inference request |
//! | [`telemetry`] | OpenTelemetry traces: `[tracing]`, the request's spans, trace context in and out |
//! | [`config`] | configuration file and environment |

pub mod access_log;
pub mod admin;
pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod billing;
pub mod cache;
pub mod config;
pub mod edge;
pub mod error;
pub mod events;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod invoices;
pub mod limits;
pub mod metrics;
pub mod privacy;
pub mod providers;
pub mod reconcile;
pub mod relay;
pub mod routes;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod translate;
