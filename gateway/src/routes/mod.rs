//! HTTP handlers, one file per API surface.
//!
//! | file | routes |
//! |---|---|
//! | `inference/` | the one request path of every inference request (parse, authenticate, admit, route, respond) |
//! | `chat.rs` | `POST /v1/chat/completions` (OpenAI), `POST /v1/messages` (Anthropic), `POST /v1/embeddings` |
//! | `query.rs` | query strings into typed values, errors in the API's shape |
//! | `caller.rs` | the caller of a tenant's non-inference routes, from its API key |
//! | `request_id.rs` | the layer giving every request its id (`x-request-id`) |
//! | `realtime.rs` | `GET /v1/realtime/chat`: chat completions over a WebSocket, on the inference path |
//! | `models.rs` | `GET /v1/models` |
//! | `usage.rs` | `GET /v1/usage` (the caller's tenant, from the ledger) |
//! | `audit.rs` | `GET /v1/audit/requests` (the caller's tenant's audited requests, from ClickHouse) |
//! | `admin.rs` | `/admin/v1/...`: tenants, keys, limits, plans, prices, credentials, audit |
//! | `health.rs` | `/healthz`, `/readyz`, `/metrics` |

pub mod admin;
pub mod audit;
pub mod caller;
pub mod chat;
pub mod health;
pub mod inference;
pub mod models;
pub mod query;
pub mod realtime;
pub mod request_id;
pub mod usage;
