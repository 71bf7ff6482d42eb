//! TLS served by `wss://` and `https://` listeners themselves (no terminating
//! load balancer). The certificate is read again when its files change, the
//! way the session gRPC's is ([`Reloading`]): cert-manager renews by
//! rewriting a mounted Secret, and new connections get the new certificate
//! without a restart while open ones keep theirs. A bad new pair is logged
//! and the previous certificate stays in use.

use std::path::Path;
use std::sync::Arc;

use mtproto_session::tls::Reloading;
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// A listener's TLS server.
#[derive(Clone)]
pub struct Tls(pub TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// Hands each handshake the certificate of the files as they are now.
#[derive(Debug)]
struct ReloadingCert(Reloading<Arc<CertifiedKey>, anyhow::Error>);

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

/// The certificate and key of listener `i`; errors name the field and file.
fn certified_key(
    i: usize,
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let field = |name: &str, path: &Path, e: &dyn std::fmt::Display| {
        anyhow::anyhow!("listeners[{i}].{name}: {}: {e}", path.display())
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| field("tls_cert", cert, &e))?;
    if chain.is_empty() {
        return Err(field("tls_cert", cert, &"no CERTIFICATE in the file"));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| field("tls_key", key, &e))?;
    let certified =
        CertifiedKey::from_der(chain, private, provider).map_err(|e| field("tls_key", key, &e))?;
    Ok(Arc::new(certified))
}

/// The TLS server of listener `i` from its PEM files, checked now and
/// reloaded when they change.
pub fn acceptor(i: usize, cert: &Path, key: &Path) -> anyhow::Result<Tls> {
    let provider = Arc::new(ring::default_provider());
    let (cert_file, key_file, keys) = (cert.to_path_buf(), key.to_path_buf(), provider.clone());
    let certificate = Reloading::load(
        format!("listeners[{i}].tls_cert/tls_key"),
        vec![cert_file.clone(), key_file.clone()],
        move || certified_key(i, &cert_file, &key_file, &keys),
    )?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("listeners[{i}].tls_cert: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ReloadingCert(certificate)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls(TlsAcceptor::from(Arc::new(config))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    use tokio_rustls::TlsConnector;

    /// A self-signed certificate for `localhost` and its key, as PEM (OpenSSL).
    fn self_signed() -> (Vec<u8>, Vec<u8>) {
        use openssl::{asn1, ec, hash, nid, pkey, x509};
        let group = ec::EcGroup::from_curve_name(nid::Nid::X9_62_PRIME256V1).unwrap();
        let pkey = pkey::PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "localhost").unwrap();
        let name = name.build();
        let mut b = x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&pkey).unwrap();
        b.set_not_before(&asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        let san = x509::extension::SubjectAlternativeName::new()
            .dns("localhost")
            .build(&b.x509v3_context(None, None))
            .unwrap();
        b.append_extension(san).unwrap();
        b.sign(&pkey, hash::MessageDigest::sha256()).unwrap();
        (
            b.build().to_pem().unwrap(),
            pkey.private_key_to_pem_pkcs8().unwrap(),
        )
    }

    fn der(pem: &[u8]) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem).unwrap()
    }

    /// The leaf certificate a client trusting `roots` is served by `tls`.
    async fn served(tls: &Tls, roots: &[&[u8]]) -> CertificateDer<'static> {
        let mut store = RootCertStore::empty();
        for pem in roots {
            store.add(der(pem)).unwrap();
        }
        let client = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn({
            let tls = tls.clone();
            async move { tls.0.accept(b).await.map(drop) }
        });
        let name = ServerName::try_from("localhost").unwrap();
        let stream = TlsConnector::from(Arc::new(client))
            .connect(name, a)
            .await
            .unwrap();
        server.await.unwrap().unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    /// Replaces `path` the way a Kubernetes Secret update does: a new file renamed over it.
    fn replace(path: &Path, contents: &[u8]) {
        let next = path.with_extension("next");
        std::fs::write(&next, contents).unwrap();
        std::fs::rename(next, path).unwrap();
    }

    #[test]
    fn errors_name_the_listener_field() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let err = acceptor(2, &cert, &key).unwrap_err().to_string();
        assert!(err.contains("listeners[2].tls_cert"), "{err}");
        let (cert_pem, key_pem) = self_signed();
        std::fs::write(&cert, &cert_pem).unwrap();
        let err = acceptor(2, &cert, &key).unwrap_err().to_string();
        assert!(err.contains("listeners[2].tls_key"), "{err}");
        std::fs::write(&key, self_signed().1).unwrap();
        let err = acceptor(2, &cert, &key).unwrap_err().to_string();
        assert!(err.contains("listeners[2].tls_key"), "another key: {err}");
        std::fs::write(&key, key_pem).unwrap();
        acceptor(2, &cert, &key).unwrap();
    }

    #[tokio::test]
    async fn renewed_files_serve_new_handshakes_and_a_bad_pair_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (a, b, c) = (self_signed(), self_signed(), self_signed());
        std::fs::write(&cert, &a.0).unwrap();
        std::fs::write(&key, &a.1).unwrap();
        let tls = acceptor(0, &cert, &key).unwrap();
        let roots: [&[u8]; 3] = [&a.0, &b.0, &c.0];
        assert_eq!(served(&tls, &roots).await, der(&a.0));

        replace(&cert, &b.0);
        replace(&key, &b.1);
        assert_eq!(served(&tls, &roots).await, der(&b.0));

        // Half-way through a renewal (C's certificate, B's key): B stays.
        replace(&cert, &c.0);
        assert_eq!(served(&tls, &roots).await, der(&b.0));
        replace(&key, b"not a key");
        assert_eq!(served(&tls, &roots).await, der(&b.0));
        replace(&key, &c.1);
        assert_eq!(served(&tls, &roots).await, der(&c.0));
    }
}
