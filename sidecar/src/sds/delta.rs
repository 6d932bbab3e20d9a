//! Incremental (delta) xDS for secrets: one `DeltaSecrets` stream's state, free of I/O.
//!
//! Envoy's on-demand certificate selector subscribes to one secret per SNI name as handshakes
//! arrive. The stream remembers, per subscribed name, what Envoy holds (a version, "absent",
//! or nothing yet) and answers only differences: a resource when a certificate exists or its
//! version changed, `removed_resources` when the name has no certificate (which fails the
//! waiting handshake at once). ACKs and NACKs never cause a resend; a NACKed version stays
//! rejected until the certificate changes. Nonces are only used for logging, so nonces and
//! `initial_resource_versions` from an earlier server instance are accepted as they come.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::nonce::Nonces;
use super::secret::{ResolveSecret, SECRET_TYPE_URL, tls_secret};
use crate::client_events::COUNTERS;

/// What Envoy holds for one subscribed name, as far as this stream told it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// Subscribed, not answered yet.
    Nothing,
    /// Envoy has (or was sent) this version.
    Version(String),
    /// Envoy was told the name does not exist.
    Absent,
}

/// How many recent responses are remembered to name the resources of an ACK or NACK.
const REMEMBERED_RESPONSES: usize = 16;

/// The state of one `DeltaSecrets` stream.
#[derive(Debug)]
pub(crate) struct DeltaStream {
    held: HashMap<String, Held>,
    nonces: Nonces,
    recent: VecDeque<(String, Vec<String>)>,
    initial_seen: bool,
}

impl DeltaStream {
    /// A new stream whose responses take nonces from `nonces`.
    pub(crate) fn new(nonces: Nonces) -> Self {
        Self {
            held: HashMap::new(),
            nonces,
            recent: VecDeque::new(),
            initial_seen: false,
        }
    }

    /// Applies one request from Envoy; returns the response to send, if any.
    pub(crate) fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        resolver: &impl ResolveSecret,
    ) -> Option<DeltaDiscoveryResponse> {
        if !request.type_url.is_empty() && request.type_url != SECRET_TYPE_URL {
            tracing::warn!(type_url = %request.type_url, "ignoring a delta request for a type other than secrets");
            return None;
        }
        self.note_acknowledgement(request);
        if !self.initial_seen {
            self.initial_seen = true;
            for (name, version) in &request.initial_resource_versions {
                self.held
                    .insert(name.clone(), Held::Version(version.clone()));
            }
        }
        for name in &request.resource_names_unsubscribe {
            self.held.remove(name);
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                tracing::warn!("ignoring a wildcard subscription: secrets are served by name only");
                continue;
            }
            // An explicit subscribe asks for an answer, even for a name answered before (Envoy
            // subscribes again after a removal when a new handshake needs that name), unless
            // Envoy just told us which version it holds.
            if !request.initial_resource_versions.contains_key(name) {
                self.held.insert(name.clone(), Held::Nothing);
            }
        }
        self.differences(resolver)
    }

    /// Re-resolves every subscribed name after the source changed; returns what to push.
    pub(crate) fn on_change(
        &mut self,
        resolver: &impl ResolveSecret,
    ) -> Option<DeltaDiscoveryResponse> {
        self.differences(resolver)
    }

    /// How many names Envoy is subscribed to on this stream.
    pub(crate) fn subscribed(&self) -> usize {
        self.held.len()
    }

    /// Whether Envoy is subscribed to `name` on this stream.
    pub(crate) fn holds(&self, name: &str) -> bool {
        self.held.contains_key(name)
    }

    fn note_acknowledgement(&mut self, request: &DeltaDiscoveryRequest) {
        let nonce = request.response_nonce.as_str();
        if nonce.is_empty() {
            return;
        }
        let names = self
            .recent
            .iter()
            .find(|(sent, _)| sent == nonce)
            .map(|(_, names)| names.join(","));
        match (&request.error_detail, names) {
            (Some(error), names) => tracing::warn!(
                nonce,
                names = names.as_deref().unwrap_or("<from an earlier stream>"),
                code = error.code,
                message = %error.message,
                "Envoy rejected secrets (NACK); it keeps its previous ones, a later change is sent again"
            ),
            (None, Some(names)) => tracing::debug!(nonce, %names, "Envoy accepted secrets (ACK)"),
            (None, None) => {
                tracing::debug!(nonce, "ACK for a response of an earlier stream or server")
            }
        }
    }

    fn differences(&mut self, resolver: &impl ResolveSecret) -> Option<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for (name, held) in &mut self.held {
            match resolver.resolve(name) {
                Some(certificate) => {
                    if *held != Held::Version(certificate.version().to_owned()) {
                        *held = Held::Version(certificate.version().to_owned());
                        resources.push(Resource {
                            name: name.clone(),
                            version: certificate.version().to_owned(),
                            resource: Some(tls_secret(name, &certificate)),
                            ..Resource::default()
                        });
                    }
                }
                None => {
                    if *held != Held::Absent {
                        *held = Held::Absent;
                        COUNTERS.sds_unknown_names.fetch_add(1, Ordering::Relaxed);
                        removed.push(name.clone());
                    }
                }
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        removed.sort();
        let nonce = self.nonces.next_nonce();
        let sent: Vec<String> = resources
            .iter()
            .map(|r| format!("{}@{}", r.name, r.version))
            .chain(removed.iter().map(|name| format!("{name}@removed")))
            .collect();
        tracing::debug!(nonce = %nonce, secrets = %sent.join(","), "sending delta secrets");
        if self.recent.len() == REMEMBERED_RESPONSES {
            self.recent.pop_front();
        }
        self.recent.push_back((nonce.clone(), sent));
        Some(DeltaDiscoveryResponse {
            system_version_info: self.nonces.server_instance().to_owned(),
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            removed_resources: removed,
            nonce,
            ..DeltaDiscoveryResponse::default()
        })
    }
}

#[cfg(test)]
mod tests;
