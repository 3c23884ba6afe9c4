//! Making certificates: a CA and the serving certificates it signs. The caller supplies the
//! time, so the logic stays testable without a clock.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Backdating absorbs clock skew between fixity and the API server.
const BACKDATE: Duration = Duration::from_secs(300);

/// A self-signed CA valid from `now` for `validity`.
pub fn new_ca(
    common_name: &str,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<Pem, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    let cert = params.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A serving certificate for `names` (DNS names or IP addresses), signed by `ca`.
pub fn serving(
    ca: &Pem,
    names: &[String],
    now: OffsetDateTime,
    validity: Duration,
) -> Result<Pem, rcgen::Error> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("fixity"),
    );
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The validity window of the first certificate in `pem`.
pub fn validity(pem: &str) -> Result<(OffsetDateTime, OffsetDateTime), rcgen::Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
    let v = cert.validity();
    Ok((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

/// Whether a certificate valid over `[not_before, not_after]` should be replaced at `now`:
/// once two thirds of its life since issue have passed, so a failed renewal has time to be
/// retried. The backdating is not part of that life.
pub fn due_for_renewal(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    let issued = (not_before + BACKDATE).min(not_after);
    let life = not_after - issued;
    now >= issued + life * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_certificates_chain_to_the_ca_and_renew_in_time() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca("test CA", now, Duration::from_secs(3600)).unwrap();
        let leaf = serving(
            &ca,
            &["fixity.fixity.svc".into(), "127.0.0.1".into()],
            now,
            Duration::from_secs(900),
        )
        .unwrap();
        let (nb, na) = validity(&leaf.cert).unwrap();
        assert!(
            (899..=900).contains(&(na - now).whole_seconds()),
            "second precision"
        );
        assert!(!due_for_renewal(nb, na, now));
        assert!(!due_for_renewal(nb, na, now + Duration::from_secs(590)));
        assert!(due_for_renewal(nb, na, now + Duration::from_secs(601)));
        // Short-lived certificates are not renewed at once because of the backdating.
        let short = serving(&ca, &["a".into()], now, Duration::from_secs(12)).unwrap();
        let (nb, na) = validity(&short.cert).unwrap();
        assert!(!due_for_renewal(nb, na, now + Duration::from_secs(7)));
        assert!(due_for_renewal(nb, na, now + Duration::from_secs(9)));
        assert!(validity("not a certificate").is_err());

        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let end_entity =
            rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap();
        let name = rustls::pki_types::ServerName::try_from("fixity.fixity.svc").unwrap();
        verifier
            .verify_server_cert(
                &end_entity,
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("the serving certificate verifies against the CA");
    }
}
