//! autohttps sidecar: site registry, ACME issuance and renewal, DNS pre-checks, admin API, CLI.
//!
//! Issuance ([`issuance`]) gets certificates and writes them to the [`store`]; serving (SDS,
//! the policy feed) reads them from the store. Time enters through [`clock::Clock`].
#![warn(missing_docs)]

pub mod acme;
pub mod admin_api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod diagnose;
pub mod dns_check;
pub mod error;
pub mod hostname;
pub mod http01;
pub mod issuance;
pub mod renewal;
pub mod service;
pub mod store;

pub use error::{Error, Result};
