//! A small gRPC server and client over h2c, for tests that pass gRPC
//! through the gateway. Messages are gRPC's length-prefixed frames (one
//! flag byte, a 4-byte big-endian length, the bytes); no protobuf is
//! needed to carry them.
//!
//! The server echoes every request message back as it arrives, then ends
//! with `grpc-status: 0`, except on `/test.Echo/Fail`, which ends with
//! `grpc-status: 5` (NOT_FOUND) and a message.

use bytes::{Buf, Bytes, BytesMut};
use std::net::SocketAddr;
use std::time::Duration;

/// One gRPC message frame.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.freeze()
}

/// Takes the complete messages off the front of `buf`.
fn take_messages(buf: &mut BytesMut) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).to_vec());
    }
    out
}

pub struct GrpcServer {
    pub addr: SocketAddr,
}

impl GrpcServer {
    /// Serves until the test process ends (its thread is detached).
    pub fn start() -> GrpcServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let Ok(mut conn) = h2::server::handshake(tcp).await else {
                            return;
                        };
                        while let Some(Ok((req, respond))) = conn.accept().await {
                            tokio::spawn(echo(req, respond));
                        }
                    });
                }
            });
        });
        GrpcServer { addr }
    }
}

async fn echo(req: http::Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    let path = req.uri().path().to_owned();
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("response");
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    let mut body = req.into_body();
    // Each piece goes back as it arrives: a client that waits for the echo
    // of its first message before sending the second proves streaming.
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    let mut trailers = http::HeaderMap::new();
    if path == "/test.Echo/Fail" {
        trailers.insert("grpc-status", "5".parse().expect("value"));
        trailers.insert("grpc-message", "no such thing".parse().expect("value"));
    } else {
        trailers.insert("grpc-status", "0".parse().expect("value"));
    }
    trailers.insert("x-echo-path", path.parse().expect("value"));
    let _ = send.send_trailers(trailers);
}

/// What a call got back.
#[derive(Debug, Default)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub messages: Vec<Vec<u8>>,
    pub trailers: http::HeaderMap,
    /// The response's headers ended the stream ("trailers-only").
    pub trailers_only: bool,
}

impl Reply {
    /// Where a gRPC client reads the status: the trailers, or the headers
    /// of a trailers-only response (headers that ended the stream). In
    /// headers followed by a body or an empty end, clients ignore it.
    fn status_block(&self) -> &http::HeaderMap {
        if self.trailers_only {
            &self.headers
        } else {
            &self.trailers
        }
    }

    pub fn grpc_status(&self) -> Option<&str> {
        self.status_block()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    pub fn grpc_message(&self) -> Option<&str> {
        self.status_block()
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
    }
}

/// Calls `path` on an h2c server with `messages`. `lockstep`: each message
/// is sent only after the previous one's echo came back (a bidirectional
/// stream); otherwise all are sent at once.
pub fn call(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
    messages: &[&[u8]],
    lockstep: bool,
) -> Reply {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        tokio::time::timeout(
            Duration::from_secs(20),
            call_async(addr, path, extra, messages, lockstep),
        )
        .await
        .expect("the call finished in time")
    })
}

async fn call_async(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
    messages: &[&[u8]],
    lockstep: bool,
) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.expect("ready");
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://grpc.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    let (response, mut send) = client
        .send_request(req.body(()).expect("request"), false)
        .expect("send");
    let mut reply = Reply::default();
    let mut pending = BytesMut::new();
    if !lockstep {
        for m in messages {
            send.send_data(frame(m), false).expect("send data");
        }
        send.send_data(Bytes::new(), true).expect("end");
    }
    let response = response.await.expect("response");
    reply.status = response.status().as_u16();
    reply.headers = response.headers().clone();
    let mut body = response.into_body();
    reply.trailers_only = body.is_end_stream();
    if lockstep {
        for m in messages {
            send.send_data(frame(m), false).expect("send data");
            let want = reply.messages.len() + 1;
            while reply.messages.len() < want {
                match body.data().await {
                    Some(Ok(chunk)) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        pending.extend_from_slice(&chunk);
                        reply.messages.extend(take_messages(&mut pending));
                    }
                    _ => return reply,
                }
            }
        }
        send.send_data(Bytes::new(), true).expect("end");
    }
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        pending.extend_from_slice(&chunk);
        reply.messages.extend(take_messages(&mut pending));
    }
    if let Ok(Some(trailers)) = body.trailers().await {
        reply.trailers = trailers;
    }
    reply
}
