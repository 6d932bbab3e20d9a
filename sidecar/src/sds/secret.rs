//! Turning certificates into Envoy `Secret` resources, and choosing which certificate a name gets.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, TlsCertificate, secret,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;

use super::source::{CertificateSource, ServedCertificate};
use crate::error::Error;

/// The type URL of SDS resources (`envoy.extensions.transport_sockets.tls.v3.Secret`).
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The Envoy `Secret` named `name` holding `certificate` (chain and key inline).
pub(crate) fn tls_secret(name: &str, certificate: &ServedCertificate) -> Any {
    let inline = |pem: &str| DataSource {
        specifier: Some(Specifier::InlineBytes(pem.as_bytes().to_vec())),
        ..DataSource::default()
    };
    pack_any(Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(certificate.certificate_chain_pem())),
            private_key: Some(inline(certificate.private_key_pem())),
            ..TlsCertificate::default()
        })),
    })
}

/// Answers "which certificate does secret `name` stand for?" for the protocol state machines.
pub(crate) trait ResolveSecret {
    /// The certificate for secret `name`, or `None` when the name is unknown.
    fn resolve(&self, name: &str) -> Option<Arc<ServedCertificate>>;
}

/// Resolves secret names against a [`CertificateSource`].
///
/// The default secret name (the SNI mapper's `default_value`, or a classic config's name)
/// stands for the source's default certificate, or a self-signed one when it has none;
/// every other name is a TLS server name looked up in the source.
pub(crate) struct SecretResolver {
    pub(crate) source: Arc<dyn CertificateSource>,
    pub(crate) default_secret_name: String,
    pub(crate) self_signed_default: Arc<ServedCertificate>,
}

impl ResolveSecret for SecretResolver {
    fn resolve(&self, name: &str) -> Option<Arc<ServedCertificate>> {
        if name == self.default_secret_name {
            return Some(
                self.source
                    .default_certificate()
                    .unwrap_or_else(|| Arc::clone(&self.self_signed_default)),
            );
        }
        self.source.lookup(name)
    }
}

/// A fresh self-signed certificate for clients without SNI when none is configured.
///
/// Its only name is `autohttps-default.invalid` (RFC 6761: never a real host), so no client
/// can mistake it for a site's certificate.
pub fn self_signed_default_certificate() -> Result<ServedCertificate, Error> {
    let generated =
        rcgen::generate_simple_self_signed(vec!["autohttps-default.invalid".to_owned()])?;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    Ok(ServedCertificate::new(
        format!("self-signed-{created:x}"),
        generated.cert.pem(),
        generated.signing_key.serialize_pem(),
    ))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::sds::source::MemoryCertificateSource;

    #[test]
    fn secret_carries_name_chain_and_key_inline() {
        let any = tls_secret(
            "a.example.test",
            &ServedCertificate::new("1", "CHAIN", "KEY"),
        );
        assert_eq!(any.type_url, SECRET_TYPE_URL);
        let decoded = Secret::decode(any.value.as_slice()).expect("a Secret");
        assert_eq!(decoded.name, "a.example.test");
        let Some(secret::Type::TlsCertificate(tls)) = decoded.r#type else {
            panic!("not a TLS certificate: {decoded:?}");
        };
        let bytes = |source: Option<DataSource>| match source.and_then(|s| s.specifier) {
            Some(Specifier::InlineBytes(bytes)) => bytes,
            other => panic!("not inline bytes: {other:?}"),
        };
        assert_eq!(bytes(tls.certificate_chain), b"CHAIN");
        assert_eq!(bytes(tls.private_key), b"KEY");
    }

    #[test]
    fn default_name_falls_back_to_self_signed_until_one_is_configured() {
        let source = Arc::new(MemoryCertificateSource::new());
        let resolver = SecretResolver {
            source: source.clone(),
            default_secret_name: "default".to_owned(),
            self_signed_default: Arc::new(self_signed_default_certificate().expect("generated")),
        };
        let first = resolver.resolve("default").expect("self-signed");
        assert!(first.version().starts_with("self-signed-"));
        assert!(first.certificate_chain_pem().contains("BEGIN CERTIFICATE"));
        source.set_default(Some(Arc::new(ServedCertificate::new(
            "configured",
            "C",
            "K",
        ))));
        assert_eq!(
            resolver
                .resolve("default")
                .map(|c| c.version().to_owned())
                .as_deref(),
            Some("configured")
        );
        assert!(resolver.resolve("unknown.example.test").is_none());
    }
}
