//! Keys, CSRs and issued chains: P-256 keys and CSRs from rcgen, chains parsed with x509-parser.

use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::error::{Error, Result};
use crate::hostname::Hostname;
use crate::store::PrivateKeyPem;

/// A fresh ECDSA P-256 private key (PKCS#8 PEM).
pub fn generate_key() -> Result<PrivateKeyPem> {
    let key = KeyPair::generate()
        .map_err(|e| Error::Certificate(format!("generating a P-256 key failed: {e}")))?;
    Ok(PrivateKeyPem::new(key.serialize_pem()))
}

/// A CSR (DER) with an empty subject and every name as a dNSName SAN (RFC 8555 §7.4).
pub fn csr_der(names: &[Hostname], key: &PrivateKeyPem) -> Result<Vec<u8>> {
    let key = KeyPair::from_pem(key.expose())
        .map_err(|_| Error::Certificate("the stored order key cannot be read".into()))?;
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|n| n.as_str().to_owned())
            .collect::<Vec<_>>(),
    )
    .map_err(|e| Error::Certificate(format!("building the CSR failed: {e}")))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Error::Certificate(format!("signing the CSR failed: {e}")))?;
    Ok(csr.der().to_vec())
}

/// What the sidecar needs to know about an issued leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    /// dNSName SANs, normalised.
    pub names: Vec<Hostname>,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
    /// Serial, lower-case hex.
    pub serial: String,
    /// RFC 9773 §4.1 certificate identifier, when the leaf has an AKI.
    pub ari_id: Option<String>,
}

/// The DER certificates of a PEM chain, in order.
pub fn chain_der(chain_pem: &str) -> Result<Vec<Vec<u8>>> {
    let mut certificates = Vec::new();
    for pem in Pem::iter_from_buffer(chain_pem.as_bytes()) {
        let pem =
            pem.map_err(|e| Error::Certificate(format!("the chain is not valid PEM: {e}")))?;
        if pem.label == "CERTIFICATE" {
            certificates.push(pem.contents);
        }
    }
    if certificates.is_empty() {
        return Err(Error::Certificate(
            "the CA returned no certificate in the chain".into(),
        ));
    }
    Ok(certificates)
}

/// Parses the leaf (first certificate) of a PEM chain.
pub fn leaf_facts(chain_pem: &str) -> Result<LeafFacts> {
    let ders = chain_der(chain_pem)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&ders[0])
        .map_err(|e| Error::Certificate(format!("the leaf certificate cannot be parsed: {e}")))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(Hostname::parse(dns).map_err(|e| {
                    Error::Certificate(format!("the certificate names {dns:?}: {e}"))
                })?);
            }
        }
    }
    names.sort();
    let to_time = |t: x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp())
            .map_err(|e| Error::Certificate(format!("validity out of range: {e}")))
    };
    let ari_id =
        instant_acme::CertificateIdentifier::try_from(&CertificateDer::from(ders[0].clone()))
            .ok()
            .map(|id| id.to_string());
    Ok(LeafFacts {
        names,
        not_before: to_time(leaf.validity().not_before)?,
        not_after: to_time(leaf.validity().not_after)?,
        serial: leaf.raw_serial_as_string().replace(':', ""),
        ari_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_has_empty_subject_and_all_names_as_sans() {
        let names: Vec<_> = ["a.example.com", "b.example.com", "example.com"]
            .iter()
            .map(|n| Hostname::parse(n).unwrap())
            .collect();
        let key = generate_key().unwrap();
        assert!(format!("{key:?}").contains("redacted"));
        let der = csr_der(&names, &key).unwrap();
        use x509_parser::prelude::FromDer as _;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
        let mut sans = Vec::new();
        for extension in csr.requested_extensions().into_iter().flatten() {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = extension
            {
                for name in &san.general_names {
                    if let GeneralName::DNSName(dns) = name {
                        sans.push(dns.to_string());
                    }
                }
            }
        }
        sans.sort();
        assert_eq!(sans, ["a.example.com", "b.example.com", "example.com"]);
    }

    #[test]
    fn leaf_facts_read_names_validity_and_serial() {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["www.example.com".into(), "example.com".into()]).unwrap();
        params.not_before = time::macros::datetime!(2026-01-01 00:00 UTC);
        params.not_after = time::macros::datetime!(2026-04-01 00:00 UTC);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x0a, 0xbc]));
        let pem = params.self_signed(&key).unwrap().pem();
        let facts = leaf_facts(&pem).unwrap();
        assert_eq!(
            facts.names.iter().map(Hostname::as_str).collect::<Vec<_>>(),
            ["example.com", "www.example.com"]
        );
        assert_eq!(
            facts.not_after,
            time::macros::datetime!(2026-04-01 00:00 UTC)
        );
        assert_eq!(facts.serial, "0abc");
    }
}
