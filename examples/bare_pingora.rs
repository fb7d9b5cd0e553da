//! Bench-only: the floor tollgate builds on. A Pingora `ProxyHttp` that only
//! picks a peer (round robin over `LoadBalancer`), with no routing, no path
//! handling, no headers and no logging, with Pingora's defaults throughout
//! (allocator, buffers). `make bench` measures tollgate's pass-through
//! against it: the difference is what tollgate adds, less what its tuning
//! saves.
//!
//! Usage: `bare_pingora LISTEN UPSTREAM [THREADS]`

/// The same allocator as tollgate's binary, so the two compare like for
/// like.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use async_trait::async_trait;
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;
use std::sync::Arc;

struct Bare(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        let backend = self
            .0
            .select(b"", 256)
            .ok_or_else(|| pingora::Error::new_str("no upstream"))?;
        Ok(Box::new(HttpPeer::new(backend, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: bare_pingora LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    }
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let upstreams = match LoadBalancer::try_from_iter([args[2].as_str()]) {
        Ok(lb) => lb,
        Err(e) => {
            eprintln!("bad upstream {}: {e}", args[2]);
            std::process::exit(2);
        }
    };
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, Bare(Arc::new(upstreams)));
    proxy.add_tcp(&args[1]);
    server.add_service(proxy);
    server.run_forever();
}
