//! The floor of the proxy stack tollgate is built on: a pingora reverse proxy that does
//! nothing but forward, with the same pingora version, features, thread count and upstream
//! connection settings as `tollgate serve`. `benches/load.sh` measures it beside nginx and
//! tollgate (target `pingora`), so the table separates what pingora itself costs per request
//! from what tollgate adds on top (auth, estimate, journal, meter, settle, log).
//!
//! ```sh
//! cargo build --release --example pingora_floor
//! target/release/examples/pingora_floor --listen 127.0.0.1:8081 --upstream 127.0.0.1:8080 --threads 2
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session, http_proxy_service};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// The plain-HTTP upstream every request goes to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Forward {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(Duration::from_secs(1));
        o.read_timeout = Some(Duration::from_secs(10));
        o.write_timeout = Some(Duration::from_secs(10));
        o.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        Forward {
            upstream: args.upstream,
        },
    );
    service.add_tcp(&args.listen);
    server.add_service(service);
    server.run_forever()
}
