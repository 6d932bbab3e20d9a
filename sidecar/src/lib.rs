//! autohttps sidecar: site registry, ACME issuance and renewal, SDS, admin API.
#![warn(missing_docs)]
