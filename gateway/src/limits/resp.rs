//! A minimal Redis client for the limiter's hot path: a pool of plain connections, each used
//! by one request at a time, speaking RESP2 directly from the request's task. A multiplexed
//! client hands every command to a driver task and back (two cross-thread wake-ups per
//! command); on the limiter's path, before every upstream call, that hand-off cost more than
//! Redis itself. Only what the limiter needs: `EVALSHA` (falling back to `EVAL` once after a
//! `NOSCRIPT`), `PING`, `AUTH`/`SELECT` at connect.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Unavailable;
use crate::server::{serving_thread, PerThread};

/// Idle connections kept per pool and serving thread.
const MAX_IDLE: usize = 64;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// The serving thread that opened it (whose reactor it is registered with).
    thread: usize,
}

/// Where and how to connect, from a `redis://[user:password@]host:port[/db]` URL.
#[derive(Clone)]
pub struct Target {
    addr: String,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let client = ::redis::Client::open(url).map_err(|e| e.to_string())?;
        let info = client.get_connection_info();
        let addr = match info.addr() {
            ::redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            _ => return Err("only redis:// (plain TCP) URLs are supported".to_string()),
        };
        let settings = info.redis_settings();
        Ok(Target {
            addr,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
        })
    }
}

/// A pool of connections to one server, with one set of idle connections per serving thread
/// (a connection belongs to the runtime of the thread that opened it).
pub struct Pool {
    target: Target,
    idle: PerThread<Vec<Conn>>,
}

fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the front of `buf`: `Ok(None)` when it is not complete yet.
/// [`parse`]'s length only (the fuzz tests' entry point).
pub(crate) fn parse_reply(buf: &[u8]) -> Result<Option<usize>, String> {
    parse(buf).map(|r| r.map(|(_, n)| n))
}

fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    parse_nested(buf, 0)
}

/// Arrays nest at most this deep (the gateway's scripts return flat arrays).
const MAX_DEPTH: usize = 8;

fn parse_nested(buf: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, String> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    if line_end == 0 {
        return Err("a reply line without a type byte".to_string());
    }
    let (kind, line) = (buf[0], &buf[1..line_end]);
    let text = std::str::from_utf8(line).map_err(|e| e.to_string())?;
    let after = line_end + 2;
    let int = || {
        text.parse::<i64>()
            .map_err(|e| format!("bad integer {text:?}: {e}"))
    };
    Ok(match kind {
        b'+' => Some((Reply::Simple(text.to_string()), after)),
        b'-' => Some((Reply::Error(text.to_string()), after)),
        b':' => Some((Reply::Int(int()?), after)),
        b'$' => {
            let n = int()?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let n = usize::try_from(n).map_err(|e| e.to_string())?;
            let Some(end) = after.checked_add(n).filter(|e| e.checked_add(2).is_some()) else {
                return Err(format!("bulk string of {n} bytes"));
            };
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err("a bulk string not followed by CRLF".to_string());
            }
            Some((Reply::Bulk(Some(buf[after..end].to_vec())), end + 2))
        }
        b'*' => {
            let n = int()?;
            if n < 0 {
                return Ok(Some((Reply::Array(Vec::new()), after)));
            }
            if depth >= MAX_DEPTH {
                return Err(format!("arrays nested deeper than {MAX_DEPTH}"));
            }
            let mut items = Vec::new();
            let mut at = after;
            for _ in 0..n {
                match parse_nested(&buf[at..], depth + 1)? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Some((Reply::Array(items), at))
        }
        other => return Err(format!("unexpected reply type byte {other}")),
    })
}

impl Conn {
    async fn call(&mut self, command: &[u8]) -> Result<Reply, Unavailable> {
        let io = |e: std::io::Error| Unavailable(e.to_string());
        self.stream.write_all(command).await.map_err(io)?;
        loop {
            if let Some((reply, used)) = parse(&self.buf).map_err(Unavailable)? {
                self.buf.advance(used);
                return Ok(reply);
            }
            if self.stream.read_buf(&mut self.buf).await.map_err(io)? == 0 {
                return Err(Unavailable("Redis closed the connection".to_string()));
            }
        }
    }
}

impl Pool {
    pub fn new(target: Target) -> Pool {
        Pool {
            target,
            idle: PerThread::default(),
        }
    }

    async fn connect(&self) -> Result<Conn, Unavailable> {
        let stream = TcpStream::connect(&self.target.addr)
            .await
            .map_err(|e| Unavailable(format!("cannot connect to Redis: {e}")))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Unavailable(e.to_string()))?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(1024),
            thread: serving_thread(),
        };
        let t = &self.target;
        if let Some(password) = &t.password {
            let mut cmd = Vec::new();
            match &t.username {
                Some(u) => encode(&mut cmd, &[b"AUTH", u.as_bytes(), password.as_bytes()]),
                None => encode(&mut cmd, &[b"AUTH", password.as_bytes()]),
            }
            if let Reply::Error(e) = conn.call(&cmd).await? {
                return Err(Unavailable(format!("Redis refused AUTH: {e}")));
            }
        }
        if t.db != 0 {
            let mut cmd = Vec::new();
            encode(&mut cmd, &[b"SELECT", t.db.to_string().as_bytes()]);
            if let Reply::Error(e) = conn.call(&cmd).await? {
                return Err(Unavailable(format!("Redis refused SELECT: {e}")));
            }
        }
        Ok(conn)
    }

    /// Sends one command on a pooled connection (a failed connection is dropped).
    pub async fn call(&self, args: &[&[u8]]) -> Result<Reply, Unavailable> {
        let mut command = Vec::with_capacity(256);
        encode(&mut command, args);
        let pooled = self.idle.with(serving_thread(), Vec::pop);
        let mut conn = match pooled {
            Some(c) => c,
            None => self.connect().await?,
        };
        let reply = conn.call(&command).await?;
        self.idle.with(conn.thread, |idle| {
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        });
        Ok(reply)
    }

    /// Runs a script by its SHA-1, loading it with `EVAL` if the server does not have it.
    pub async fn eval(
        &self,
        sha: &str,
        script: &str,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Reply, Unavailable> {
        let nkeys = keys.len().to_string();
        let mut cmd: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
        cmd.extend_from_slice(&[b"EVALSHA", sha.as_bytes(), nkeys.as_bytes()]);
        cmd.extend_from_slice(keys);
        cmd.extend_from_slice(args);
        match self.call(&cmd).await? {
            Reply::Error(e) if e.starts_with("NOSCRIPT") => {
                cmd[0] = b"EVAL";
                cmd[1] = script.as_bytes();
                self.call(&cmd).await
            }
            reply => Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_whole_or_not_at_all() {
        assert_eq!(parse(b":42\r\n"), Ok(Some((Reply::Int(42), 5))));
        assert_eq!(parse(b":42\r"), Ok(None));
        assert_eq!(
            parse(b"*2\r\n:1\r\n$3\r\nabc\r\n"),
            Ok(Some((
                Reply::Array(vec![Reply::Int(1), Reply::Bulk(Some(b"abc".to_vec()))]),
                17
            )))
        );
        assert_eq!(parse(b"*2\r\n:1\r\n$3\r\nab"), Ok(None));
        assert_eq!(parse(b"$-1\r\n"), Ok(Some((Reply::Bulk(None), 5))));
        assert_eq!(
            parse(b"-NOSCRIPT No matching script\r\n"),
            Ok(Some((
                Reply::Error("NOSCRIPT No matching script".into()),
                30
            )))
        );
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b":x\r\n").is_err());
    }

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"PING"]);
        assert_eq!(out, b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn urls_give_address_credentials_and_database() {
        let t = Target::parse("redis://user:secret@127.0.0.1:6380/2").unwrap();
        assert_eq!(t.addr, "127.0.0.1:6380");
        assert_eq!(t.username.as_deref(), Some("user"));
        assert_eq!(t.password.as_deref(), Some("secret"));
        assert_eq!(t.db, 2);
        assert!(!format!("{t:?}").contains("secret"));
    }
}
