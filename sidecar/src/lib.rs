//! autohttps sidecar: site registry, ACME issuance and renewal, DNS pre-checks, admin API, CLI,
//! SDS server and policy feed.
//!
//! Issuance ([`issuance`]) gets certificates and writes them to the [`store`]; serving (SDS,
//! the policy feed) reads them from the store: [`sds`] serves certificates to Envoy through
//! [`sds::StoreCertificateSource`], [`policy_feed`] serves the filter its policy. Time enters through [`clock::Clock`].
#![warn(missing_docs)]

pub mod acme;
pub mod admin_api;
pub mod cli;
pub mod client_events;
pub mod clock;
pub mod config;
pub mod console;
pub mod csp_reports;
pub mod diagnose;
pub mod dns_check;
pub mod error;
pub mod hooks;
pub mod hostname;
pub mod http01;
pub mod issuance;
pub mod metrics;
#[cfg(test)]
mod name_coverage;
pub mod policy_feed;
pub mod renewal;
pub mod sds;
pub mod service;
pub mod store;

pub use error::{Error, Result};
