//! gRPC through the gateway: h2c clients, an h2c upstream, unary and
//! bidirectional streaming calls with their trailers, and gateway-made
//! errors as gRPC statuses.

mod support;

use std::net::SocketAddr;
use support::grpc::{call, GrpcServer};
use support::{free_port, Gateway};

fn start(server: &GrpcServer) -> (Gateway, SocketAddr) {
    let h2c: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let body = format!(
        "auth:\n  api_keys: {{ header: X-API-Key }}\nconsumers:\n  alice: {{ api_keys: [\"{}\"] }}\nupstreams:\n  grpc: {{ targets: [\"{}\"], protocol: h2c }}\n  down: {{ targets: [\"127.0.0.1:1\"], protocol: h2c, retries: 0 }}\nroutes:\n  - {{ name: echo, path_prefix: /test.Echo/, upstream: grpc }}\n  - {{ name: private, path_prefix: /test.Private/, upstream: grpc, auth: [api_key] }}\n  - {{ name: limited, path_prefix: /test.Limited/, upstream: grpc, rate_limit: {{ rate: 1/m, burst: 1 }} }}\n  - {{ name: down, path_prefix: /test.Down/, upstream: down }}\n",
        tollgate::auth::api_key::digest_of("alice-key"),
        server.addr
    );
    let gw = Gateway::start_with_listeners(
        &[],
        "",
        &format!("  - {{ address: \"{h2c}\", h2c: true }}\n"),
        &body,
    );
    (gw, h2c)
}

#[test]
fn unary_and_bidirectional_streaming_calls_pass_with_their_trailers() {
    let server = GrpcServer::start();
    let (_gw, addr) = start(&server);

    let unary = call(addr, "/test.Echo/Say", &[], &[b"hello"], false);
    assert_eq!(unary.status, 200);
    assert_eq!(unary.messages, vec![b"hello".to_vec()]);
    assert_eq!(unary.grpc_status(), Some("0"), "{unary:?}");
    assert_eq!(
        unary.trailers.get("x-echo-path").map(|v| v.as_bytes()),
        Some(&b"/test.Echo/Say"[..])
    );

    // Each message is sent only once the previous one's echo is back: the
    // call completes only if both directions stream through the gateway.
    let messages: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("message {i}").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let bidi = call(addr, "/test.Echo/Chat", &[], &refs, true);
    assert_eq!(bidi.messages, messages, "{bidi:?}");
    assert_eq!(bidi.grpc_status(), Some("0"));

    // The upstream's own failure status and message pass unchanged.
    let failed = call(addr, "/test.Echo/Fail", &[], &[b"x"], false);
    assert_eq!(failed.grpc_status(), Some("5"), "{failed:?}");
    assert_eq!(failed.grpc_message(), Some("no such thing"));
}

#[test]
fn gateway_errors_are_grpc_statuses() {
    let server = GrpcServer::start();
    let (_gw, addr) = start(&server);
    for (path, headers, status, code) in [
        ("/nowhere.Service/Call", vec![], "12", "no_route"),
        ("/test.Private/Call", vec![], "16", "unauthorized"),
        ("/test.Down/Call", vec![], "14", "upstream_unavailable"),
    ] {
        let reply = call(addr, path, &headers, &[b"x"], false);
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        assert_eq!(reply.grpc_status(), Some(status), "{path}: {reply:?}");
        assert_eq!(
            reply.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/grpc"[..])
        );
        assert_eq!(
            reply.headers.get("x-tollgate-error").map(|v| v.as_bytes()),
            Some(code.as_bytes()),
            "{path}"
        );
        assert!(reply.grpc_message().is_some_and(|m| !m.is_empty()));
        assert!(reply.messages.is_empty());
    }
    // With the key the call goes through; over the limit, RESOURCE_EXHAUSTED.
    let ok = call(
        addr,
        "/test.Private/Call",
        &[("x-api-key", "alice-key")],
        &[b"x"],
        false,
    );
    assert_eq!(ok.grpc_status(), Some("0"), "{ok:?}");
    assert_eq!(
        call(addr, "/test.Limited/Call", &[], &[b"x"], false).grpc_status(),
        Some("0")
    );
    let limited = call(addr, "/test.Limited/Call", &[], &[b"x"], false);
    assert_eq!(limited.grpc_status(), Some("8"), "{limited:?}");
}
