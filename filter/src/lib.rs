//! autohttps filter: the per-site HTTPS policy engine ([`policy`]) and its proxy-wasm glue.
//!
//! Built as a `cdylib` for `wasm32-wasip1` (the `.wasm` Envoy loads) and as an `rlib` for
//! native users of the policy types (the sidecar, the tests).
#![warn(missing_docs)]

pub mod policy;

#[cfg(feature = "plugin")]
mod plugin;

use std::fmt;

/// What can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A policy document (or plugin configuration) failed validation; every problem is listed
    /// with its JSON path.
    #[error("invalid policy: {}", ProblemList(.0))]
    InvalidPolicy(Vec<policy::Problem>),
    /// A policy delta starts from another version than the one held: nothing was applied; ask
    /// the feed for a snapshot (a request without `since`).
    #[error(
        "the policy delta applies to version {from:?} but this policy is at {current:?}; ask for a snapshot"
    )]
    DeltaBase {
        /// The version the delta starts from.
        from: String,
        /// The version held.
        current: String,
    },
}

impl Error {
    /// The individual problems, for logging one per line.
    pub fn problems(&self) -> &[policy::Problem] {
        match self {
            Error::InvalidPolicy(problems) => problems,
            Error::DeltaBase { .. } => &[],
        }
    }
}

struct ProblemList<'a>(&'a [policy::Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}
