//! `explain FILE URL`: what the edge does with one request, and why, from the pure engine.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context as _, anyhow};
use autohttps_filter::policy::{Decision, RequestFacts, parse_peer};

use crate::input::{PolicyFile, RequestUrl, parse_header};
use crate::{UsageError, Verdict};

/// Prints the verdict (a redirect with its status and `Location`, or a pass with the headers
/// added) and the reasons, one per line.
pub(crate) fn run(
    file: &Path,
    url: &str,
    https: bool,
    method: &str,
    headers: &[String],
    peer: Option<&str>,
) -> Result<Verdict, UsageError> {
    let policy = PolicyFile::read(file)?.valid_policy(file)?;
    let url = RequestUrl::parse(url)?;
    let headers = headers
        .iter()
        .map(|raw| parse_header(raw))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let peer: Option<IpAddr> = match peer {
        None => None,
        Some(raw) => Some(
            parse_peer(raw)
                .with_context(|| format!("--peer {raw:?} is not an IP address (or IP:port)"))?,
        ),
    };
    if method.is_empty() {
        return Err(anyhow!("--method is empty: name a method, e.g. --method GET").into());
    }
    let tls = https || url.https == Some(true);
    // The Host header wins over the URL's authority only when given explicitly.
    let authority = headers
        .iter()
        .find(|(name, _)| name == "host" || name == ":authority")
        .map_or(url.authority.as_str(), |(_, value)| value.as_str());
    let forwarded_proto = headers
        .iter()
        .find(|(name, _)| name == "x-forwarded-proto")
        .map(|(_, value)| value.as_str());
    let explanation = policy.explain(&RequestFacts {
        tls,
        peer,
        authority,
        path: &url.path,
        forwarded_proto,
    });
    let scheme = if tls { "https" } else { "http" };
    println!("{method} {scheme}://{authority}{}", url.path);
    match &explanation.decision {
        Decision::Redirect { redirect, .. } => {
            println!(
                "→ {} redirect, Location: {}",
                redirect.status(method),
                redirect.location
            );
            for (name, value) in redirect.headers().into_iter().skip(1) {
                println!("  with {name}: {value}");
            }
        }
        Decision::Continue { .. } => {
            println!("→ passed to the upstream");
            for (name, value) in &explanation.added_headers {
                println!("  response gets {name}: {value}");
            }
        }
    }
    println!("why:");
    for reason in explanation.reasons() {
        println!("  - {reason}");
    }
    Ok(Verdict::Pass)
}
