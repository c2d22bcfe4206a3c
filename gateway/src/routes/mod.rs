//! HTTP handlers, one file per API surface.
//!
//! | file | routes |
//! |---|---|
//! | `inference.rs` | the shared request path of chat requests in either dialect |
//! | `chat.rs` | `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages` (Anthropic) |
//! | `embeddings.rs` | `POST /v1/embeddings` |
//! | `models.rs` | `GET /v1/models` |
//! | `health.rs` | `/healthz`, `/readyz`, `/metrics` |

pub mod chat;
pub mod embeddings;
pub mod health;
pub mod inference;
pub mod models;
