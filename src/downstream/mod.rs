//! The client side of a connection: the HTTP/1 keepalive loop, reading and
//! checking each request head, and handing Pingora one request message at
//! a time.
//!
//! - [`connection`]: the loop; idle connections hold no request state.
//! - [`drain`]: what a stopping process does with its clients.
//! - [`h2`]: the HTTP/2 loop: request limit and body deadlines per stream.
//! - [`head`]: an HTTP/1 head's limits, request line and framing rules.
//! - [`policy`]: the head rules every protocol's requests go through
//!   (method, host, singleton and forbidden fields).
//! - [`framing`]: where a message's body ends (length or chunked).
//! - [`stream`]: the connection as Pingora sees it, one message at a time,
//!   so pipelined requests are served in order.

pub mod connection;
pub mod drain;
pub mod framing;
pub mod h2;
pub mod head;
pub mod policy;
pub mod stream;
pub mod tls;

pub use connection::{ConnectionGauge, KeepaliveSettings, LeanKeepalive};

use std::time::Duration;

/// Where the connection loops read the client limits of the running
/// configuration, before each request: the store, from its one snapshot,
/// so new limits apply from the moment the rest of a reload does.
pub trait LimitsSource: Send + Sync {
    fn limits(&self) -> Limits;
}

/// Limits that never change (tests, tools).
impl LimitsSource for Limits {
    fn limits(&self) -> Limits {
        *self
    }
}

/// What a client may send: the `limits:` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From a head's first byte to its end.
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    /// Longest gap between two reads of a request body.
    pub body_timeout: Duration,
    /// Default for routes that set none.
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            body_timeout: Duration::from_secs(30),
            max_body_bytes: 10 * 1024 * 1024,
        }
    }
}
