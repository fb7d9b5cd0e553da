//! Test certificates: a CA and leaf certificates it signs, written as
//! PEM files a gateway's TLS listener (or a test upstream) can load.

use super::scratch_dir;
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509Name, X509};
use std::path::PathBuf;

pub fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

pub fn name(cn: &str) -> X509Name {
    let mut n = X509Name::builder().unwrap();
    n.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    n.build()
}

/// A certificate for `names`, signed by `ca` (self-signed without one),
/// valid from `from` to `to` days from now.
pub fn certificate(
    names: &[&str],
    key: &PKey<Private>,
    ca: Option<(&X509, &PKey<Private>)>,
    (from, to): (i64, i64),
    serial: u32,
) -> X509 {
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&BigNum::from_u32(serial).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name(names[0])).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    b.set_not_before(&Asn1Time::from_unix(now + from * 86_400).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(now + to * 86_400).unwrap())
        .unwrap();
    b.set_pubkey(key).unwrap();
    match ca {
        Some((ca_cert, _)) => b.set_issuer_name(ca_cert.subject_name()).unwrap(),
        None => b.set_issuer_name(&name(names[0])).unwrap(),
    }
    if ca.is_some() {
        let mut san = SubjectAlternativeName::new();
        for n in names {
            san.dns(n);
        }
        let ext = san
            .build(&b.x509v3_context(ca.map(|c| &**c.0), None))
            .unwrap();
        b.append_extension(ext).unwrap();
    } else {
        let ext = openssl::x509::extension::BasicConstraints::new()
            .critical()
            .ca()
            .build()
            .unwrap();
        b.append_extension(ext).unwrap();
    }
    let signer = ca.map_or(key, |c| c.1);
    b.sign(signer, MessageDigest::sha256()).unwrap();
    b.build()
}

pub struct Pki {
    pub dir: PathBuf,
    pub ca: X509,
    pub ca_key: PKey<Private>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = scratch_dir("pki");
        let ca_key = key();
        let ca = certificate(&["tollgate test CA"], &ca_key, None, (-1, 365), 1);
        std::fs::write(dir.join("ca.pem"), ca.to_pem().unwrap()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// Writes `<file>.pem` and `<file>.key`; returns the cert path.
    pub fn issue(&self, file: &str, names: &[&str], days: (i64, i64), serial: u32) -> PathBuf {
        let k = key();
        let cert = certificate(names, &k, Some((&self.ca, &self.ca_key)), days, serial);
        let path = self.dir.join(format!("{file}.pem"));
        std::fs::write(&path, cert.to_pem().unwrap()).unwrap();
        std::fs::write(
            self.dir.join(format!("{file}.key")),
            k.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        path
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}
