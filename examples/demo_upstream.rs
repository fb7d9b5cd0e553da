//! The demo upstream `make run` starts beside the gateway: a small HTTP
//! server answering every request with JSON describing what it received,
//! so `curl localhost:8080/...` shows what tollgate forwarded.
//!
//! Usage: `demo_upstream [ADDR NAME]...` (default: 127.0.0.1:9001 users-1
//! 127.0.0.1:9002 users-2 127.0.0.1:9003 orders-1). It is the same server the
//! integration tests start.

#[path = "../tests/support/http.rs"]
mod http;
#[path = "../tests/support/upstream.rs"]
mod upstream;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pairs: Vec<(String, String)> = if args.is_empty() {
        vec![
            ("127.0.0.1:9001".into(), "users-1".into()),
            ("127.0.0.1:9002".into(), "users-2".into()),
            ("127.0.0.1:9003".into(), "orders-1".into()),
        ]
    } else if args.len().is_multiple_of(2) {
        args.chunks(2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect()
    } else {
        eprintln!("usage: demo_upstream [ADDR NAME]...");
        std::process::exit(2);
    };
    let mut running = Vec::new();
    for (addr, name) in &pairs {
        match upstream::Upstream::start_on(addr, name) {
            Ok(u) => {
                println!("demo upstream {name} on http://{}", u.addr);
                running.push(u);
            }
            Err(e) => {
                eprintln!("demo upstream {name}: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        }
    }
    loop {
        std::thread::park();
    }
}
