//! TLS termination: certificates loaded and checked with the config, and
//! chosen per connection by SNI.
//!
//! A TLS listener's certificates live in the snapshot, so a reload that
//! changes them applies to the next handshake while established
//! connections keep the certificate they were given. The handshake
//! records the SNI and the certificate served ([`Served`]), which routing
//! uses to refuse a request for a host that certificate does not cover
//! (421).
//!
//! The backend is Pingora's OpenSSL one: of 0.9.1's backends it is the one
//! whose certificate callback can choose per connection with the full
//! OpenSSL API (rustls's resolver would also do, but its listener pins
//! the protocol versions; boringssl and s2n build their library from
//! source), and it links the system's libssl.

use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::tls::ext;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::{NameType, SslRef};
use pingora::tls::x509::X509;
use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Days before expiry from which `-t` and a reload warn.
pub const EXPIRY_WARNING_DAYS: i32 = 14;

/// One certificate chain and its key, with the names it covers.
pub struct Certificate {
    /// Leaf first.
    chain: Vec<X509>,
    key: PKey<Private>,
    /// DNS names from the SANs (or the subject's CN when there are none),
    /// lowercase; wildcards as `*.example.com`.
    pub names: Vec<String>,
    /// The file, for messages.
    pub cert_path: String,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("names", &self.names)
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl Certificate {
    /// Reads and checks a certificate chain and its key: readable, PEM,
    /// the key is the leaf's, the leaf is valid now. Returns a warning too
    /// when it expires within [`EXPIRY_WARNING_DAYS`].
    pub fn load(cert_path: &str, key_path: &str) -> Result<(Certificate, Option<String>), String> {
        let pem = std::fs::read(cert_path).map_err(|e| format!("cannot read {cert_path}: {e}"))?;
        let chain = X509::stack_from_pem(&pem)
            .map_err(|e| format!("{cert_path} is not a PEM certificate: {e}"))?;
        let leaf = chain
            .first()
            .ok_or_else(|| format!("{cert_path} holds no certificate"))?;
        let key_pem =
            std::fs::read(key_path).map_err(|e| format!("cannot read {key_path}: {e}"))?;
        let key = PKey::private_key_from_pem(&key_pem)
            .map_err(|e| format!("{key_path} is not a PEM private key: {e}"))?;
        let matches = leaf.public_key().is_ok_and(|public| public.public_eq(&key));
        if !matches {
            return Err(format!("{key_path} is not the key of {cert_path}"));
        }
        let now = openssl::asn1::Asn1Time::days_from_now(0)
            .map_err(|e| format!("cannot read the clock: {e}"))?;
        if leaf.not_before() > now {
            return Err(format!(
                "{cert_path} is not valid before {}",
                leaf.not_before()
            ));
        }
        if leaf.not_after() < now {
            return Err(format!("{cert_path} expired on {}", leaf.not_after()));
        }
        let warning = now
            .diff(leaf.not_after())
            .ok()
            .filter(|left| left.days < EXPIRY_WARNING_DAYS)
            .map(|_| format!("{cert_path} expires on {}", leaf.not_after()));
        let mut names: Vec<String> = leaf
            .subject_alt_names()
            .map(|sans| {
                sans.iter()
                    .filter_map(|n| n.dnsname().map(str::to_ascii_lowercase))
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            names = leaf
                .subject_name()
                .entries_by_nid(pingora::tls::nid::Nid::COMMONNAME)
                .filter_map(|e| e.data().to_string().ok().map(|s| s.to_ascii_lowercase()))
                .collect();
        }
        Ok((
            Certificate {
                chain,
                key,
                names,
                cert_path: cert_path.to_owned(),
            },
            warning,
        ))
    }

    /// Whether this certificate is valid for `host` (lowercase, no port):
    /// a name equal to it, or a wildcard covering its first label.
    pub fn covers(&self, host: &str) -> bool {
        let parent = host.split_once('.').map(|(_, rest)| rest);
        self.names.iter().any(|name| match name.strip_prefix("*.") {
            Some(domain) => parent == Some(domain),
            None => name == host,
        })
    }

    fn install(&self, ssl: &mut SslRef) -> Result<(), pingora::tls::error::ErrorStack> {
        let (leaf, intermediates) = self
            .chain
            .split_first()
            .ok_or_else(pingora::tls::error::ErrorStack::get)?;
        ext::ssl_use_certificate(ssl, leaf)?;
        ext::ssl_use_private_key(ssl, &self.key)?;
        for cert in intermediates {
            ext::ssl_add_chain_cert(ssl, cert)?;
        }
        Ok(())
    }
}

/// A TLS listener's certificates, indexed by the names they cover.
#[derive(Debug, Default)]
pub struct CertificateSet {
    certificates: Vec<Arc<Certificate>>,
    exact: HashMap<String, usize>,
    /// Keyed by the domain under the wildcard: `*.example.com` is under
    /// `example.com`.
    wildcard: HashMap<String, usize>,
}

impl CertificateSet {
    /// The first certificate that names a host wins it.
    pub fn new(certificates: Vec<Certificate>) -> Self {
        let mut set = CertificateSet::default();
        for (i, cert) in certificates.into_iter().enumerate() {
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(domain) => set.wildcard.entry(domain.to_owned()).or_insert(i),
                    None => set.exact.entry(name.clone()).or_insert(i),
                };
            }
            set.certificates.push(Arc::new(cert));
        }
        set
    }

    /// The certificate for an SNI name: the one naming it exactly, else
    /// one whose wildcard covers it, else the first.
    pub fn select(&self, sni: Option<&str>) -> Option<&Arc<Certificate>> {
        let index = sni
            .and_then(|name| {
                let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
                self.exact.get(&name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(0);
        self.certificates.get(index)
    }

    pub fn certificates(&self) -> &[Arc<Certificate>] {
        &self.certificates
    }
}

/// What a TLS handshake settled, kept with the connection.
#[derive(Debug)]
pub struct Served {
    /// The name the client asked for, lowercase, without a trailing dot.
    pub sni: Option<Box<str>>,
    pub certificate: Arc<Certificate>,
}

/// Finds a listener's current certificates.
pub trait Certificates: Send + Sync {
    fn for_listener(&self, addr: SocketAddr) -> Option<Arc<CertificateSet>>;
}

/// The certificate callback of one TLS listener.
pub struct SniCallbacks<C> {
    pub certificates: Arc<C>,
    pub addr: SocketAddr,
    /// The certificates the listener started with, for as long as the
    /// running config (reloaded without the upgrade that a listener change
    /// needs) has none for it.
    pub started_with: Arc<CertificateSet>,
}

impl<C: Certificates> SniCallbacks<C> {
    fn current(&self) -> Arc<CertificateSet> {
        self.certificates
            .for_listener(self.addr)
            .unwrap_or_else(|| Arc::clone(&self.started_with))
    }
}

#[async_trait]
impl<C: Certificates + 'static> TlsAccept for SniCallbacks<C> {
    async fn certificate_callback(&self, ssl: &mut SslRef) {
        let set = self.current();
        let sni = ssl.servername(NameType::HOST_NAME);
        let Some(cert) = set.select(sni) else {
            return;
        };
        // Without a certificate the handshake fails, which is all that
        // can be done for a connection here.
        if let Err(e) = cert.install(ssl) {
            log::error!("TLS: cannot use {}: {e}", cert.cert_path);
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &SslRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let sni = ssl.servername(NameType::HOST_NAME).map(|name| {
            let name = name.strip_suffix('.').unwrap_or(name);
            name.to_ascii_lowercase().into_boxed_str()
        });
        // The certificate served is the one the SNI selects now; a reload
        // between the two callbacks could only swap it for the new one.
        let set = self.current();
        let certificate = Arc::clone(set.select(sni.as_deref())?);
        Some(Arc::new(Served { sni, certificate }))
    }
}

/// The handshake's record of a TLS connection, if it is one.
pub fn served(digest: Option<&pingora::protocols::Digest>) -> Option<&Served> {
    digest?.ssl_digest.as_ref()?.extension.get::<Served>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Certificate {
        Certificate {
            chain: Vec::new(),
            key: PKey::generate_ed25519()
                .and_then(|k| PKey::private_key_from_der(&k.private_key_to_der().unwrap()))
                .unwrap(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            cert_path: names.join(","),
        }
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first() {
        let set = CertificateSet::new(vec![
            cert(&["api.example.com"]),
            cert(&["*.shop.example", "shop.example"]),
            cert(&["api.example.com", "other.example"]),
        ]);
        let pick = |sni: Option<&str>| set.select(sni).unwrap().cert_path.clone();
        assert_eq!(pick(Some("api.example.com")), "api.example.com");
        assert_eq!(pick(Some("API.Example.com.")), "api.example.com");
        assert_eq!(
            pick(Some("www.shop.example")),
            "*.shop.example,shop.example"
        );
        assert_eq!(pick(Some("shop.example")), "*.shop.example,shop.example");
        // A wildcard covers one label only.
        assert_eq!(pick(Some("a.b.shop.example")), "api.example.com");
        assert_eq!(pick(Some("other.example")), "api.example.com,other.example");
        assert_eq!(pick(Some("unknown.test")), "api.example.com");
        assert_eq!(pick(None), "api.example.com");
        assert!(CertificateSet::default().select(None).is_none());
    }

    #[test]
    fn coverage_follows_names_and_one_label_wildcards() {
        let c = cert(&["*.shop.example", "api.example.com"]);
        assert!(c.covers("www.shop.example"));
        assert!(c.covers("api.example.com"));
        assert!(!c.covers("shop.example"));
        assert!(!c.covers("a.b.shop.example"));
        assert!(!c.covers("example.com"));
    }
}
