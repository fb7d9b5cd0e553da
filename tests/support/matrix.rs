//! The protocol matrix: one gateway listening for HTTP/1, h2c and h2 over
//! TLS, and one call that sends the same request over any of them, so that
//! a test of a rule about requests asserts it on every protocol.
//!
//! HTTP/1 requests are written as raw bytes; HTTP/2 ones with the h2
//! crate, which sends header names and values as given (an HTTP/2 client
//! can send what an HTTP/1 parser would refuse), with `:authority` only
//! when the request names one, and over TLS without SNI.

use super::http::Head;
use super::pki::Pki;
use super::{free_port, send_raw, Gateway, Response};
use bytes::Bytes;
use std::net::SocketAddr;

/// How a request reaches the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2c,
    H2Tls,
}

pub const PROTOCOLS: [Protocol; 3] = [Protocol::Http1, Protocol::H2c, Protocol::H2Tls];

/// A request for any protocol.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// HTTP/2's `:authority`; HTTP/1 sends it as `Host` unless `headers`
    /// has one.
    pub authority: Option<String>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            authority: Some("gateway.test".to_owned()),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    /// No `:authority` (HTTP/2) and no automatic `Host` (HTTP/1).
    pub fn without_authority(mut self) -> Request {
        self.authority = None;
        self
    }

    pub fn authority(mut self, authority: &str) -> Request {
        self.authority = Some(authority.to_owned());
        self
    }

    pub fn header(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Request {
        self.headers
            .push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    pub fn body(mut self, body: &[u8]) -> Request {
        self.body = body.to_vec();
        self
    }
}

/// A gateway with an h2c listener and a TLS listener (HTTP/2 by ALPN)
/// beside the harness's plain one.
pub struct Matrix {
    pub gw: Gateway,
    pub h2c: SocketAddr,
    pub tls: SocketAddr,
    pki: Pki,
}

impl Matrix {
    pub fn start(body: &str) -> Matrix {
        Matrix::start_with_server("", body)
    }

    pub fn start_with_server(server_extra: &str, body: &str) -> Matrix {
        let pki = Pki::new();
        pki.issue("gateway", &["gateway.test"], (-1, 90), 2);
        let h2c: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen = format!(
            "  - {{ address: \"{h2c}\", h2c: true }}\n  - address: \"{tls}\"\n    tls:\n      certificates:\n        - {{ cert: \"{}\", key: \"{}\" }}\n",
            pki.path("gateway.pem"),
            pki.path("gateway.key"),
        );
        let gw = Gateway::start_with_listeners(&[], server_extra, &listen, body);
        Matrix { gw, h2c, tls, pki }
    }

    /// Sends `req` over `protocol` on a new connection and reads the
    /// answer.
    pub fn send(&self, protocol: Protocol, req: &Request) -> Response {
        match protocol {
            Protocol::Http1 => send_raw(self.gw.addr, &http1(req)),
            Protocol::H2c | Protocol::H2Tls => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(self.h2(protocol, req))
            }
        }
    }

    /// `check` on the answer to `req` over every protocol.
    pub fn each(&self, req: &Request, mut check: impl FnMut(Protocol, Response)) {
        for protocol in PROTOCOLS {
            check(protocol, self.send(protocol, req));
        }
    }

    async fn h2(&self, protocol: Protocol, req: &Request) -> Response {
        let tcp = tokio::net::TcpStream::connect(match protocol {
            Protocol::H2c => self.h2c,
            _ => self.tls,
        })
        .await
        .unwrap();
        match protocol {
            Protocol::H2c => h2_exchange(tcp, req).await,
            _ => {
                let mut b =
                    openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())
                        .unwrap();
                b.set_ca_file(self.pki.dir.join("ca.pem")).unwrap();
                b.set_alpn_protos(b"\x02h2").unwrap();
                let mut config = b.build().configure().unwrap();
                config.set_verify_hostname(false);
                config.set_use_server_name_indication(false);
                let ssl = config.into_ssl("gateway.test").unwrap();
                let mut stream = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                std::pin::Pin::new(&mut stream).connect().await.unwrap();
                assert_eq!(stream.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
                h2_exchange(stream, req).await
            }
        }
    }
}

fn http1(req: &Request) -> Vec<u8> {
    let mut raw = format!("{} {} HTTP/1.1\r\n", req.method, req.path).into_bytes();
    let has_host = req
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(b"host"));
    if let (Some(authority), false) = (&req.authority, has_host) {
        raw.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    for (name, value) in &req.headers {
        raw.extend_from_slice(name);
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(value);
        raw.extend_from_slice(b"\r\n");
    }
    if !req.body.is_empty() {
        raw.extend_from_slice(format!("Content-Length: {}\r\n", req.body.len()).as_bytes());
    }
    raw.extend_from_slice(b"Connection: close\r\n\r\n");
    raw.extend_from_slice(&req.body);
    raw
}

async fn h2_exchange<T>(io: T, req: &Request) -> Response
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut client, conn) = h2::client::handshake(io).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = ::http::Request::builder().method(req.method.as_bytes());
    builder = match &req.authority {
        Some(authority) => builder.uri(format!("http://{authority}{}", req.path)),
        // A relative URI on an HTTP/1.1-versioned request is how the h2
        // crate sends a stream without `:authority`.
        None => builder
            .uri(req.path.as_str())
            .version(::http::Version::HTTP_11),
    };
    for (name, value) in &req.headers {
        builder = builder.header(
            ::http::HeaderName::from_bytes(name).unwrap(),
            ::http::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    let request = builder.body(()).unwrap();
    let end = req.body.is_empty();
    let (answer, mut send) = client.send_request(request, end).unwrap();
    if !end {
        send.send_data(Bytes::from(req.body.clone()), true).unwrap();
    }
    let response = answer.await;
    let response = match response {
        Ok(r) => r,
        // A stream the gateway (or Pingora before it) refused outright.
        Err(e) => {
            driver.abort();
            return Response {
                status: 0,
                head: Head {
                    start_line: format!("HTTP/2 reset: {e}"),
                    headers: Vec::new(),
                },
                body: Vec::new(),
            };
        }
    };
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body_stream = response.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = body_stream.data().await {
        let chunk = chunk.unwrap();
        let _ = body_stream.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    drop(client);
    driver.abort();
    Response {
        status,
        head: Head {
            start_line: format!("HTTP/2 {status}"),
            headers,
        },
        body,
    }
}
