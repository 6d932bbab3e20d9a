//! The SDS server: serves TLS certificates from a [`CertificateSource`] to Envoy.
//!
//! Envoy 1.40 uses two flavours, both served:
//! - **delta** (`DeltaSecrets`) for the on-demand certificate selector with the SNI mapper
//!   (`api_type: DELTA_GRPC` in `envoy/edge.yaml`): one secret per SNI hostname, subscribed when a
//!   handshake needs it; an unknown name is answered in `removed_resources`, which fails that
//!   handshake at once;
//! - **state of the world** (`StreamSecrets`, `api_type: GRPC`) for classic
//!   `tls_certificate_sds_secret_configs`; `FetchSecrets` answers one-shot requests.
//!
//! The secret named [`SdsConfig::default_secret_name`] is the certificate for clients without
//! SNI: the source's default certificate, or a self-signed one generated at start. Changes
//! announced by [`CertificateSource::changes`] are pushed to every stream that holds an
//! affected name. The server listens on an owner-only Unix socket by default, TCP on request.
//! Logs name secrets, versions and nonces, never key material.
//!
//! ```no_run
//! # async fn run() -> Result<(), autohttps_sidecar::Error> {
//! use std::sync::Arc;
//! use autohttps_sidecar::sds::{MemoryCertificateSource, SdsConfig, SdsServer};
//!
//! let source = Arc::new(MemoryCertificateSource::new());
//! let server = SdsServer::start(SdsConfig::unix("/tmp/autohttps/sds.sock"), source).await?;
//! // ... later
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

mod delta;
mod listen;
mod nonce;
mod secret;
mod service;
mod sotw;
mod source;
mod store_source;
#[cfg(test)]
mod test_resolver;

pub use listen::{SdsConfig, SdsListen, SdsServer};
pub use secret::{SECRET_TYPE_URL, self_signed_default_certificate};
pub use service::SecretDiscovery;
pub use source::{CertificateSource, MemoryCertificateSource, ServedCertificate};
pub use store_source::{
    StoreCertificateSource, check_key_matches_leaf, default_certificate_from_files,
};
