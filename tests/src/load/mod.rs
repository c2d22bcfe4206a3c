//! A lean load generator for streaming LLM APIs, measuring what a client sees: time to
//! response headers, time to first SSE data event (TTFT), time to end of stream, events and
//! bytes per response, and whether each stream ended with its terminator.
//!
//! | file | owns |
//! | --- | --- |
//! | `sse.rs` | incremental SSE scanning: events, first data line, terminator |
//! | `client.rs` | one keep-alive HTTP/1.1 connection per worker; timing one request |
//! | `run.rs` | workers, warmup barrier, request/duration bounds, aggregation |
//! | `report.rs` | the report: JSON fields for scripts, a table for people |
//!
//! The binary `tollgate-load` is the CLI around [`run::run`].

pub mod client;
pub mod report;
pub mod run;
pub mod sse;

use std::fmt;
use std::net::ToSocketAddrs;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{HeaderMap, Uri};

pub use client::RequestTemplate;

/// Which API the target speaks; decides the auth headers, the default body and the terminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// `/v1/chat/completions`, `Authorization: Bearer`, stream ends with `data: [DONE]`.
    OpenAi,
    /// `/v1/messages`, `x-api-key`, stream ends with `event: message_stop`.
    Anthropic,
}

impl WireFormat {
    /// Lower-case name, as on the command line and in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            WireFormat::OpenAi => "openai",
            WireFormat::Anthropic => "anthropic",
        }
    }
}

/// Anything that stops a load run from starting or finishing.
#[derive(Debug)]
pub enum LoadError {
    /// The URL is not an absolute `http://` URL with a host.
    Url(String),
    /// The URL's host did not resolve.
    Resolve(String, std::io::Error),
    /// A `--header` was not `Name: value`, or a value was not a valid header.
    Header(String),
    /// The request body file could not be read.
    BodyFile(String, std::io::Error),
    /// Creating the latency histograms failed.
    Histogram(String),
    /// A worker task panicked or was cancelled.
    Worker(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Url(msg) => write!(f, "invalid URL: {msg}"),
            LoadError::Resolve(host, e) => write!(f, "cannot resolve {host}: {e}"),
            LoadError::Header(msg) => write!(f, "invalid header: {msg}"),
            LoadError::BodyFile(path, e) => write!(f, "cannot read body file {path}: {e}"),
            LoadError::Histogram(msg) => write!(f, "histogram: {msg}"),
            LoadError::Worker(msg) => write!(f, "worker failed: {msg}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// What to send, before it is turned into a [`RequestTemplate`].
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub url: String,
    pub format: WireFormat,
    pub api_key: Option<String>,
    pub model: String,
    /// A request body to send as is; `None` sends the default chat request for `format`.
    pub body: Option<Bytes>,
    /// Whether to expect SSE. `None`: true for the default body, else the body's `"stream"`.
    pub stream: Option<bool>,
    /// Extra `Name: value` headers, added last (they may override the defaults).
    pub extra_headers: Vec<String>,
    pub timeout: Duration,
}

/// The default request: a one-line chat in the target's own format.
pub fn default_body(format: WireFormat, model: &str, stream: bool) -> Bytes {
    let body = match format {
        WireFormat::OpenAi => serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "Say hello"}],
            "stream": stream,
        }),
        WireFormat::Anthropic => serde_json::json!({
            "model": model,
            "max_tokens": 256,
            "messages": [{"role": "user", "content": "Say hello"}],
            "stream": stream,
        }),
    };
    Bytes::from(body.to_string())
}

impl TargetSpec {
    /// Parses the URL, resolves its host once and builds the headers and body.
    pub fn into_template(self) -> Result<RequestTemplate, LoadError> {
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| LoadError::Url(format!("{}: {e}", self.url)))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(LoadError::Url(format!(
                    "{}: scheme {other} is not supported (plain http only)",
                    self.url
                )))
            }
            None => return Err(LoadError::Url(format!("{}: no scheme", self.url))),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| LoadError::Url(format!("{}: no host", self.url)))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| LoadError::Resolve(host.to_owned(), e))?
            .next()
            .ok_or_else(|| {
                LoadError::Resolve(host.to_owned(), std::io::ErrorKind::NotFound.into())
            })?;
        let path: Uri = uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse()
            .map_err(|e| LoadError::Url(format!("{}: {e}", self.url)))?;

        let (body, stream) = match self.body {
            Some(body) => {
                let stream = self.stream.unwrap_or_else(|| body_asks_for_stream(&body));
                (body, stream)
            }
            None => {
                let stream = self.stream.unwrap_or(true);
                (default_body(self.format, &self.model, stream), stream)
            }
        };

        let mut headers = HeaderMap::new();
        headers.insert(HOST, header_value(authority.as_str())?);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static("tollgate-load"));
        if let Some(key) = &self.api_key {
            match self.format {
                WireFormat::OpenAi => {
                    headers.insert(AUTHORIZATION, header_value(&format!("Bearer {key}"))?);
                }
                WireFormat::Anthropic => {
                    headers.insert("x-api-key", header_value(key)?);
                }
            }
        }
        if self.format == WireFormat::Anthropic {
            headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        }
        for raw in &self.extra_headers {
            let (name, value) = raw
                .split_once(':')
                .ok_or_else(|| LoadError::Header(format!("{raw:?} is not `Name: value`")))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| LoadError::Header(format!("{name:?}: {e}")))?;
            headers.insert(name, header_value(value.trim())?);
        }

        Ok(RequestTemplate {
            addr,
            path,
            headers,
            body,
            format: self.format,
            stream,
            timeout: self.timeout,
        })
    }
}

fn header_value(value: &str) -> Result<HeaderValue, LoadError> {
    HeaderValue::from_str(value).map_err(|e| LoadError::Header(format!("{e}")))
}

/// A body file's own `"stream"` flag (the APIs default to `false` when it is absent).
fn body_asks_for_stream(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str, format: WireFormat) -> TargetSpec {
        TargetSpec {
            url: url.to_owned(),
            format,
            api_key: Some("k".to_owned()),
            model: "mock/fast".to_owned(),
            body: None,
            stream: None,
            extra_headers: vec!["X-Extra: 1".to_owned()],
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn openai_template() {
        let t = spec(
            "http://127.0.0.1:9/v1/chat/completions?a=b",
            WireFormat::OpenAi,
        )
        .into_template()
        .unwrap();
        assert_eq!(t.addr.port(), 9);
        assert_eq!(t.path, "/v1/chat/completions?a=b");
        assert_eq!(t.headers["host"], "127.0.0.1:9");
        assert_eq!(t.headers["authorization"], "Bearer k");
        assert_eq!(t.headers["x-extra"], "1");
        assert!(t.stream);
        let body: serde_json::Value = serde_json::from_slice(&t.body).unwrap();
        assert_eq!(body["model"], "mock/fast");
        assert_eq!(body["stream"], true);
    }

    #[test]
    fn anthropic_template() {
        let t = spec("http://localhost/v1/messages", WireFormat::Anthropic)
            .into_template()
            .unwrap();
        assert_eq!(t.addr.port(), 80);
        assert_eq!(t.headers["x-api-key"], "k");
        assert_eq!(t.headers["anthropic-version"], "2023-06-01");
        assert!(t.headers.get("authorization").is_none());
        let body: serde_json::Value = serde_json::from_slice(&t.body).unwrap();
        assert_eq!(body["max_tokens"], 256);
    }

    #[test]
    fn body_file_decides_streaming_unless_told() {
        let mut s = spec("http://127.0.0.1:9/", WireFormat::OpenAi);
        s.body = Some(Bytes::from_static(b"{\"model\":\"m\",\"messages\":[]}"));
        assert!(!s.clone().into_template().unwrap().stream);
        s.stream = Some(true);
        assert!(s.into_template().unwrap().stream);
    }

    #[test]
    fn rejects_https_and_bad_headers() {
        assert!(matches!(
            spec("https://127.0.0.1/", WireFormat::OpenAi).into_template(),
            Err(LoadError::Url(_))
        ));
        let mut s = spec("http://127.0.0.1/", WireFormat::OpenAi);
        s.extra_headers = vec!["no-colon".to_owned()];
        assert!(matches!(s.into_template(), Err(LoadError::Header(_))));
    }
}
