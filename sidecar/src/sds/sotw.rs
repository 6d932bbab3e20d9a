//! State-of-the-world xDS for secrets: one `StreamSecrets` stream's state, free of I/O.
//!
//! Classic `tls_certificate_sds_secret_configs` subscribe this way: every request carries the
//! full list of names Envoy wants, and every response carries every requested secret that
//! exists, under one version computed from the names and certificate versions. Names without a
//! certificate are left out (SotW cannot say "absent" for secrets; Envoy keeps waiting), and a
//! response with no secret at all is never sent, because Envoy rejects an empty secrets
//! response. Requests bearing a nonce other than the latest are stale and answered with nothing,
//! except on a fresh stream, where any nonce (for instance one from a previous server
//! instance) is accepted. A NACKed version is not sent again.

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::nonce::Nonces;
use super::secret::{ResolveSecret, SECRET_TYPE_URL, tls_secret};

/// The last response sent on a stream.
#[derive(Debug)]
struct Sent {
    nonce: String,
    version: String,
    names: BTreeSet<String>,
}

/// The state of one `StreamSecrets` stream.
#[derive(Debug)]
pub(crate) struct SotwStream {
    names: BTreeSet<String>,
    last_sent: Option<Sent>,
    rejected_version: Option<String>,
    nonces: Nonces,
}

impl SotwStream {
    /// A new stream whose responses take nonces from `nonces`.
    pub(crate) fn new(nonces: Nonces) -> Self {
        Self {
            names: BTreeSet::new(),
            last_sent: None,
            rejected_version: None,
            nonces,
        }
    }

    /// Applies one request from Envoy; returns the response to send, if any.
    pub(crate) fn on_request(
        &mut self,
        request: &DiscoveryRequest,
        resolver: &impl ResolveSecret,
    ) -> Option<DiscoveryResponse> {
        if !request.type_url.is_empty() && request.type_url != SECRET_TYPE_URL {
            tracing::warn!(type_url = %request.type_url, "ignoring a request for a type other than secrets");
            return None;
        }
        let nonce = request.response_nonce.as_str();
        if let Some(sent) = &self.last_sent {
            if !nonce.is_empty() && nonce != sent.nonce {
                tracing::debug!(nonce, latest = %sent.nonce, "ignoring a stale request");
                return None;
            }
            match &request.error_detail {
                Some(error) => {
                    tracing::warn!(
                        nonce,
                        version = %sent.version,
                        names = %join(&sent.names),
                        code = error.code,
                        message = %error.message,
                        "Envoy rejected secrets (NACK); it keeps its previous ones, a later change is sent again"
                    );
                    self.rejected_version = Some(sent.version.clone());
                }
                None if !nonce.is_empty() => {
                    tracing::debug!(nonce, version = %request.version_info, "Envoy accepted secrets (ACK)");
                }
                None => {}
            }
        } else if let Some(error) = &request.error_detail {
            tracing::warn!(
                nonce,
                code = error.code,
                message = %error.message,
                "Envoy reports rejecting secrets of an earlier stream"
            );
        }
        self.names = request.resource_names.iter().cloned().collect();
        self.respond(resolver)
    }

    /// Re-resolves the requested names after the source changed; returns what to push.
    pub(crate) fn on_change(&mut self, resolver: &impl ResolveSecret) -> Option<DiscoveryResponse> {
        self.respond(resolver)
    }

    /// How many names Envoy currently asks for on this stream.
    pub(crate) fn subscribed(&self) -> usize {
        self.names.len()
    }

    /// Whether Envoy currently asks for `name` on this stream.
    pub(crate) fn holds(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn respond(&mut self, resolver: &impl ResolveSecret) -> Option<DiscoveryResponse> {
        let found: Vec<_> = self
            .names
            .iter()
            .filter_map(|name| {
                resolver
                    .resolve(name)
                    .map(|certificate| (name, certificate))
            })
            .collect();
        let missing = self.names.len() - found.len();
        if missing > 0 {
            tracing::debug!(
                missing,
                "some requested secrets have no certificate; left out"
            );
        }
        if found.is_empty() {
            return None;
        }
        let mut hasher = DefaultHasher::new();
        for (name, certificate) in &found {
            (name.as_str(), certificate.version()).hash(&mut hasher);
        }
        let version = format!("{:016x}", hasher.finish());
        if let Some(sent) = &self.last_sent
            && sent.version == version
            && sent.names == self.names
        {
            return None;
        }
        if self.rejected_version.as_deref() == Some(version.as_str()) {
            return None;
        }
        let nonce = self.nonces.next_nonce();
        tracing::debug!(
            nonce = %nonce,
            version = %version,
            secrets = %found
                .iter()
                .map(|(name, certificate)| format!("{name}@{}", certificate.version()))
                .collect::<Vec<_>>()
                .join(","),
            "sending secrets"
        );
        let resources = found
            .iter()
            .map(|(name, certificate)| tls_secret(name, certificate))
            .collect();
        self.last_sent = Some(Sent {
            nonce: nonce.clone(),
            version: version.clone(),
            names: self.names.clone(),
        });
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
            ..DiscoveryResponse::default()
        })
    }
}

fn join(names: &BTreeSet<String>) -> String {
    names
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests;
