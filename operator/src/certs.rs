//! The fleet's own CA and the gRPC certificates it issues, as pure functions of the Secrets
//! found and the time: what to (re)write and when to look again.
//!
//! One CA per gateway (not per namespace): its lifetime follows the gateway through the owner
//! reference, and a certificate of one fleet cannot call another fleet's sessions.
//! Renewal rewrites a Secret in place when less than a third of its lifetime is left; the pods
//! reload the files, nothing rolls. A renewed CA keeps the previous CA in the trust bundle
//! until it expires, so peers holding certificates of either CA keep talking.

use std::collections::BTreeMap;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};
use x509_parser::pem::Pem;

/// The values of one Secret, by key.
pub type SecretValues = BTreeMap<String, Vec<u8>>;

/// The certificate (PEM) in a TLS Secret; for the CA Secret, the current CA.
pub const CERT_KEY: &str = "tls.crt";
/// Its private key (PEM, PKCS#8).
pub const KEY_KEY: &str = "tls.key";
/// The CAs peers' certificates must chain to (PEM bundle).
pub const CA_KEY: &str = "ca.crt";

/// The DNS name gateways' certificates carry: what sessions check by default.
pub const GATEWAY_NAME: &str = "mtproto-gateway";
/// The DNS name sessions' certificates carry: what gateways check by default.
pub const SESSION_NAME: &str = "mtproto-session";

/// Lifetime of the fleet CA.
pub const CA_LIFETIME: Duration = Duration::days(3 * 365);
/// Lifetime of a gateway or session certificate.
pub const LEAF_LIFETIME: Duration = Duration::days(90);
/// Certificates start this long before they are made, for clocks that lag.
const BACKDATE: Duration = Duration::minutes(5);

#[derive(Debug, Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate and its key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// `not_before` and `not_after` (Unix seconds) of the first certificate in `pem`.
pub fn validity(pem: &[u8]) -> Option<(i64, i64)> {
    let first = Pem::iter_from_buffer(pem).next()?.ok()?;
    let cert = first.parse_x509().ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// When a certificate valid from `not_before` to `not_after` is renewed: once less than a
/// third of its lifetime is left.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_after - (not_after - not_before) / 3
}

fn params(common_name: &str, now: OffsetDateTime, lifetime: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.not_before = now - BACKDATE;
    p.not_after = now + lifetime;
    p
}

/// A new self-signed CA named after the gateway.
pub fn new_ca(common_name: &str, now: OffsetDateTime) -> Result<Issued, CertError> {
    let key = KeyPair::generate()?;
    let mut p = params(common_name, now, CA_LIFETIME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A certificate for the DNS name `name`, usable as TLS client and server (each side of the
/// gRPC both calls and serves), signed by `ca`.
pub fn issue(ca: &Issued, name: &str, now: OffsetDateTime) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = params(name, now, LEAF_LIFETIME);
    p.subject_alt_names = vec![rcgen::SanType::DnsName(name.try_into()?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The Secrets as found (`None`: absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct Found<'a> {
    pub ca: Option<&'a SecretValues>,
    pub gateway: Option<&'a SecretValues>,
    pub session: Option<&'a SecretValues>,
}

/// The identity names the certificates carry.
#[derive(Debug, Clone, Copy)]
pub struct Identities<'a> {
    /// The CA's common name.
    pub ca: &'a str,
    pub gateway: &'a str,
    pub session: &'a str,
}

/// What to write (`None`: keep as is) and when the next renewal is due (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ca: Option<SecretValues>,
    pub gateway: Option<SecretValues>,
    pub session: Option<SecretValues>,
    pub next_renewal: i64,
}

fn text(values: &SecretValues, key: &str) -> Option<String> {
    values
        .get(key)
        .and_then(|v| String::from_utf8(v.clone()).ok())
}

/// A certificate that parses and is not yet due for renewal, with its renewal time.
fn current(values: Option<&SecretValues>, now: i64) -> Option<(Issued, i64)> {
    let values = values?;
    let issued = Issued {
        cert_pem: text(values, CERT_KEY)?,
        key_pem: text(values, KEY_KEY)?,
    };
    KeyPair::from_pem(&issued.key_pem).ok()?;
    let (not_before, not_after) = validity(issued.cert_pem.as_bytes())?;
    let due = renew_at(not_before, not_after);
    (now < due).then_some((issued, due))
}

/// The certificates of `bundle` still valid at `now`, as PEM.
fn unexpired(bundle: &[u8], now: i64) -> Vec<String> {
    Pem::iter_from_buffer(bundle)
        .filter_map(Result::ok)
        .filter(|p| {
            p.parse_x509()
                .is_ok_and(|c| c.validity().not_after.timestamp() > now)
        })
        .map(|p| ::pem::encode(&::pem::Pem::new("CERTIFICATE", p.contents)))
        .collect()
}

fn tls_values(issued: &Issued, bundle: &str) -> SecretValues {
    BTreeMap::from([
        (CERT_KEY.to_owned(), issued.cert_pem.clone().into_bytes()),
        (KEY_KEY.to_owned(), issued.key_pem.clone().into_bytes()),
        (CA_KEY.to_owned(), bundle.as_bytes().to_vec()),
    ])
}

/// Decides which of the CA, gateway and session Secrets to (re)write at `now`.
pub fn plan(
    found: Found<'_>,
    names: Identities<'_>,
    now: OffsetDateTime,
) -> Result<Plan, CertError> {
    let t = now.unix_timestamp();
    let (ca, ca_due, bundle, ca_written) = match current(found.ca, t) {
        Some((ca, due)) => {
            let bundle = found
                .ca
                .and_then(|v| text(v, CA_KEY))
                .unwrap_or_else(|| ca.cert_pem.clone());
            (ca, due, bundle, None)
        }
        None => {
            let ca = new_ca(names.ca, now)?;
            let previous = found
                .ca
                .and_then(|v| v.get(CA_KEY))
                .map(|b| unexpired(b, t))
                .unwrap_or_default();
            let bundle = std::iter::once(ca.cert_pem.clone())
                .chain(previous.into_iter().filter(|p| *p != ca.cert_pem))
                .collect::<String>();
            let (nb, na) = validity(ca.cert_pem.as_bytes()).unwrap_or((t, t));
            let values = tls_values(&ca, &bundle);
            (ca, renew_at(nb, na), bundle, Some(values))
        }
    };
    let mut next_renewal = ca_due;
    let mut leaf = |existing: Option<&SecretValues>, name: &str| -> Result<_, CertError> {
        let same_trust = existing.and_then(|v| text(v, CA_KEY)).as_deref() == Some(&bundle);
        match current(existing, t).filter(|_| same_trust && ca_written.is_none()) {
            Some((_, due)) => {
                next_renewal = next_renewal.min(due);
                Ok(None)
            }
            None => {
                let issued = issue(&ca, name, now)?;
                if let Some((nb, na)) = validity(issued.cert_pem.as_bytes()) {
                    next_renewal = next_renewal.min(renew_at(nb, na));
                }
                Ok(Some(tls_values(&issued, &bundle)))
            }
        }
    };
    let gateway = leaf(found.gateway, names.gateway)?;
    let session = leaf(found.session, names.session)?;
    Ok(Plan {
        ca: ca_written,
        gateway,
        session,
        next_renewal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    const NAMES: Identities<'static> = Identities {
        ca: "edge.edge CA",
        gateway: GATEWAY_NAME,
        session: SESSION_NAME,
    };

    #[test]
    fn names_are_the_ones_gateways_and_sessions_check() {
        assert_eq!(GATEWAY_NAME, mtproto_session::tls::DEFAULT_GATEWAY_NAME);
        assert_eq!(SESSION_NAME, mtproto_session::tls::DEFAULT_SESSION_NAME);
    }

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).expect("time")
    }

    const T0: i64 = 1_800_000_000;

    fn sans(pem: &[u8]) -> Vec<String> {
        let p = Pem::iter_from_buffer(pem)
            .next()
            .expect("pem")
            .expect("pem");
        let c = p.parse_x509().expect("x509");
        let san = c
            .subject_alternative_name()
            .expect("ok")
            .expect("san present");
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn first_plan_issues_a_ca_and_both_certificates_for_the_peer_names() {
        let p = plan(Found::default(), NAMES, at(T0)).expect("plan");
        let ca = p.ca.as_ref().expect("CA written");
        let gw = p.gateway.as_ref().expect("gateway written");
        let session = p.session.as_ref().expect("session written");
        assert_eq!(sans(&gw[CERT_KEY]), ["mtproto-gateway"]);
        assert_eq!(sans(&session[CERT_KEY]), ["mtproto-session"]);
        assert_eq!(gw[CA_KEY], ca[CERT_KEY]);
        assert_eq!(session[CA_KEY], ca[CERT_KEY]);
        let (nb, na) = validity(&gw[CERT_KEY]).expect("valid");
        assert_eq!(na - nb, (LEAF_LIFETIME + BACKDATE).whole_seconds());
        // The leaves are due first: two thirds into their lifetime.
        assert_eq!(p.next_renewal, renew_at(nb, na));
    }

    #[test]
    fn issued_certificates_pass_rustls_verification_for_their_role() {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::client::danger::ServerCertVerifier;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let p = plan(Found::default(), NAMES, at(T0)).expect("plan");
        let gw = p.gateway.expect("gateway");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&gw[CA_KEY]) {
            roots.add(c.expect("ca pem")).expect("root");
        }
        let roots = std::sync::Arc::new(roots);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let leaf = CertificateDer::from_pem_slice(&gw[CERT_KEY]).expect("leaf");
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(T0 as u64 + 60));
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        server
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from("mtproto-gateway").expect("name"),
                &[],
                now,
            )
            .expect("valid as the gateway's server certificate");
        assert!(server
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from("mtproto-session").expect("name"),
                &[],
                now,
            )
            .is_err());
        let client = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .expect("verifier");
        client
            .verify_client_cert(&leaf, &[], now)
            .expect("valid as a client certificate");
    }

    fn found(p: &Plan) -> (SecretValues, SecretValues, SecretValues) {
        (
            p.ca.clone().expect("ca"),
            p.gateway.clone().expect("gateway"),
            p.session.clone().expect("session"),
        )
    }

    #[test]
    fn nothing_is_rewritten_before_two_thirds_of_the_lifetime() {
        let first = plan(Found::default(), NAMES, at(T0)).expect("plan");
        let (ca, gw, s) = found(&first);
        let f = Found {
            ca: Some(&ca),
            gateway: Some(&gw),
            session: Some(&s),
        };
        let again = plan(f, NAMES, at(first.next_renewal - 1)).expect("plan");
        assert_eq!(
            again,
            Plan {
                ca: None,
                gateway: None,
                session: None,
                next_renewal: first.next_renewal
            }
        );
        let due = plan(f, NAMES, at(first.next_renewal)).expect("plan");
        assert!(due.ca.is_none(), "the CA has years left");
        let renewed = due.gateway.expect("gateway renewed");
        assert_ne!(renewed[CERT_KEY], gw[CERT_KEY]);
        assert_eq!(renewed[CA_KEY], ca[CERT_KEY], "same CA");
        assert!(due.session.is_some());
        assert!(due.next_renewal > first.next_renewal);
    }

    #[test]
    fn a_missing_or_broken_leaf_is_reissued_alone() {
        let first = plan(Found::default(), NAMES, at(T0)).expect("plan");
        let (ca, mut gw, s) = found(&first);
        gw.insert(KEY_KEY.into(), b"not a key".to_vec());
        let p = plan(
            Found {
                ca: Some(&ca),
                gateway: Some(&gw),
                session: None,
            },
            NAMES,
            at(T0 + 10),
        )
        .expect("plan");
        assert!(p.ca.is_none());
        assert!(p.gateway.is_some());
        assert!(p.session.is_some());
        let p = plan(
            Found {
                ca: Some(&ca),
                gateway: Some(&first.gateway.clone().expect("gw")),
                session: Some(&s),
            },
            NAMES,
            at(T0 + 10),
        )
        .expect("plan");
        assert!(p.ca.is_none() && p.gateway.is_none() && p.session.is_none());
    }

    #[test]
    fn a_renewed_ca_keeps_the_previous_one_trusted_and_reissues_the_leaves() {
        let first = plan(Found::default(), NAMES, at(T0)).expect("plan");
        let (ca, gw, s) = found(&first);
        let (nb, na) = validity(&ca[CERT_KEY]).expect("ca validity");
        let later = renew_at(nb, na) + 1;
        let p = plan(
            Found {
                ca: Some(&ca),
                gateway: Some(&gw),
                session: Some(&s),
            },
            NAMES,
            at(later),
        )
        .expect("plan");
        let new_ca = p.ca.expect("CA renewed");
        assert_ne!(new_ca[CERT_KEY], ca[CERT_KEY]);
        let bundle = String::from_utf8(new_ca[CA_KEY].clone()).expect("utf8");
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(bundle.starts_with(std::str::from_utf8(&new_ca[CERT_KEY]).expect("utf8")));
        assert_eq!(p.gateway.expect("reissued")[CA_KEY], new_ca[CA_KEY]);
        assert!(p.session.is_some());

        // Once the old CA has expired it leaves the bundle at the next CA renewal.
        assert!(unexpired(bundle.as_bytes(), na + 1).len() == 1);
    }
}
