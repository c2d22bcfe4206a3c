//! HTTP handlers, one file per API surface.
//!
//! | file | routes |
//! |---|---|
//! | `inference/` | the one request path of every inference request (parse, authenticate, admit, route, respond) |
//! | `chat.rs` | `POST /v1/chat/completions` (OpenAI), `POST /v1/messages` (Anthropic), `POST /v1/embeddings` |
//! | `query.rs` | query strings into typed values, errors in the API's shape |
//! | `request_id.rs` | the layer giving every request its id (`x-request-id`) |
//! | `realtime.rs` | `GET /v1/realtime/chat`: chat completions over a WebSocket, on the inference path |
//! | `models.rs` | `GET /v1/models` |
//! | `usage.rs` | `GET /v1/usage` (the caller's tenant, from the ledger) |
//! | `admin.rs` | `/admin/v1/...`: tenants, keys, limits, plans, prices, credentials, audit |
//! | `health.rs` | `/healthz`, `/readyz`, `/metrics` |

pub mod admin;
pub mod chat;
pub mod health;
pub mod inference;
pub mod models;
pub mod query;
pub mod realtime;
pub mod request_id;
pub mod usage;
