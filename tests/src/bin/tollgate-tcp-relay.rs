//! `tollgate-tcp-relay`: a byte-for-byte TCP relay (no HTTP, no parsing, no work), the floor
//! for what any proxy between a client and an upstream adds on this machine: one more
//! connection each way, one more read and write per burst, one more wake-up. The gateway
//! benchmark runs it beside the gateway so that the gateway's added latency can be read
//! against what the extra hop alone costs.
//!
//! Usage: `tollgate-tcp-relay --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT`. Prints
//! `listening on ADDR` on stdout once bound; a relay that fails ends its connection quietly
//! (the load generator counts the error).

use std::io::Write;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "Relays TCP connections to an upstream byte for byte (a benchmark floor)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// Address every accepted connection is relayed to.
    #[arg(long)]
    upstream: String,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen).await?;
    writeln!(std::io::stdout(), "listening on {}", listener.local_addr()?)?;
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = args.upstream.clone();
        tokio::spawn(async move {
            let _ = relay(client, &upstream).await;
        });
    }
}

/// Copies both ways from one task until either side closes.
async fn relay(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    let mut up = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let (mut from_client, mut from_up) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        tokio::select! {
            n = client.read(&mut from_client) => match n? {
                0 => return Ok(()),
                n => up.write_all(&from_client[..n]).await?,
            },
            n = up.read(&mut from_up) => match n? {
                0 => return Ok(()),
                n => client.write_all(&from_up[..n]).await?,
            },
        }
    }
}
