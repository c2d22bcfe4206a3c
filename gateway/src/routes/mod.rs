//! HTTP handlers, one file per API surface.
//!
//! | file | routes |
//! |---|---|
//! | `inference.rs` | the shared request path of chat requests in either dialect |
//! | `chat.rs` | `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages` (Anthropic) |
//! | `embeddings.rs` | `POST /v1/embeddings` |
//! | `models.rs` | `GET /v1/models` |
//! | `usage.rs` | `GET /v1/usage` (the caller's tenant, from the ledger) |
//! | `admin.rs` | `/admin/v1/...`: tenants, keys, limits, plans, prices, credentials, audit |
//! | `health.rs` | `/healthz`, `/readyz`, `/metrics` |

pub mod admin;
pub mod chat;
pub mod embeddings;
pub mod health;
pub mod inference;
pub mod models;
pub mod usage;
