//! How tollgate speaks to an upstream's targets: HTTP/1 or HTTP/2, with
//! TLS or without (`protocol`, `tls`). Compiled once per config; requests
//! and health checks apply it to their peers.

use pingora::protocols::ALPN;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::{HttpPeer, PeerOptions};
use pingora::utils::tls::CertKey;
use std::sync::Arc;

/// Concurrent requests on one HTTP/2 connection to a target (servers
/// commonly allow 100 or more).
const H2_STREAMS_PER_CONNECTION: usize = 100;

/// An upstream's transport. Equal when compiled from the same settings
/// (the files are compared by their contents' digest), so an unchanged
/// upstream keeps its cluster across reloads.
#[derive(Clone, Default)]
pub struct Transport {
    /// `None`: plain TCP.
    pub tls: Option<Arc<UpstreamTls>>,
    /// HTTP/2 (over TLS by ALPN, or h2c without).
    pub h2: bool,
    /// What it was compiled from.
    pub key: String,
    /// Its connection pool group (below).
    group: u64,
}

impl Transport {
    pub fn new(tls: Option<Arc<UpstreamTls>>, h2: bool, key: String) -> Transport {
        let group = group(&key);
        Transport {
            tls,
            h2,
            key,
            group,
        }
    }
}

/// Pingora's connection pool tells connections apart by address, SNI
/// and verification flags, not by the trusted roots or everything
/// else here: without a group of their own, an upstream that trusts
/// one CA could be handed a connection another upstream verified with
/// another CA.
fn group(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

pub struct UpstreamTls {
    /// The name sent as SNI and verified against the certificate.
    pub sni: String,
    pub verify: bool,
    /// Trusted roots instead of the system's.
    pub ca: Option<Arc<Box<[X509]>>>,
    /// A client certificate for upstreams that ask for one (mTLS).
    pub client: Option<Arc<CertKey>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

impl PartialEq for Transport {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Transport {}

impl std::hash::Hash for Transport {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl Transport {
    /// A peer for `addr` speaking this transport.
    pub fn peer(&self, addr: std::net::SocketAddr) -> HttpPeer {
        let mut peer = match &self.tls {
            Some(tls) => HttpPeer::new(addr, true, tls.sni.clone()),
            None => HttpPeer::new(addr, false, String::new()),
        };
        self.apply(&mut peer.options);
        if self.tls.is_some() {
            peer.group_key = self.group;
        }
        if let Some(client) = self.tls.as_ref().and_then(|t| t.client.as_ref()) {
            peer.client_cert_key = Some(Arc::clone(client));
        }
        peer
    }

    /// The options a peer of this transport needs (health checks build
    /// their own peers from a template).
    pub fn apply(&self, options: &mut PeerOptions) {
        options.alpn = if self.h2 { ALPN::H2 } else { ALPN::H1 };
        if self.h2 {
            // Requests share an HTTP/2 connection (Pingora's default is one
            // stream per connection: a connection, and a handshake, per
            // concurrent request).
            options.max_h2_streams = H2_STREAMS_PER_CONNECTION;
        }
        if let Some(tls) = &self.tls {
            options.verify_cert = tls.verify;
            options.verify_hostname = tls.verify;
            options.ca = tls.ca.clone();
        }
    }
}

/// Reads a PEM bundle of trusted certificates; `seen` gets the file's
/// bytes (the transport's fingerprint).
pub fn load_ca(path: &str, seen: &mut impl FnMut(&[u8])) -> Result<Box<[X509]>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    seen(&pem);
    let certs = X509::stack_from_pem(&pem).map_err(|e| format!("{path} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path} holds no certificate"));
    }
    Ok(certs.into_boxed_slice())
}

/// Reads a client certificate chain and its key; `seen` gets both files'
/// bytes.
pub fn load_client(cert: &str, key: &str, seen: &mut impl FnMut(&[u8])) -> Result<CertKey, String> {
    let pem = std::fs::read(cert).map_err(|e| format!("cannot read {cert}: {e}"))?;
    seen(&pem);
    let chain = X509::stack_from_pem(&pem).map_err(|e| format!("{cert} is not PEM: {e}"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("{cert} holds no certificate"))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read {key}: {e}"))?;
    seen(&key_pem);
    let key_value = pingora::tls::pkey::PKey::private_key_from_pem(&key_pem)
        .map_err(|e| format!("{key} is not a PEM private key: {e}"))?;
    if !leaf.public_key().is_ok_and(|p| p.public_eq(&key_value)) {
        return Err(format!("{key} is not the key of {cert}"));
    }
    Ok(CertKey::new(chain, key_value))
}
