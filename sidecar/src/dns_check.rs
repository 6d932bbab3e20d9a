//! DNS pre-check: does a name resolve to the platform (by address or by CNAME) before we order?

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveErrorKind, TokioResolver};
use serde::Serialize;

use crate::config::{DnsConfig, PlatformConfig};
use crate::error::{Error, Result};
use crate::hostname::Hostname;

/// What DNS said about one name, compared with the platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsAnswer {
    /// The name asked about.
    pub name: Hostname,
    /// A and AAAA answers, after following CNAMEs.
    pub addresses: Vec<IpAddr>,
    /// The CNAME chain, in order, without trailing dots.
    pub cnames: Vec<String>,
    /// Whether the name points at the platform.
    pub points_here: bool,
    /// Why not, in words, when it does not.
    pub problem: Option<String>,
}

/// Resolves names and compares them with the platform's addresses and CNAME target.
#[derive(Debug)]
pub struct DnsPrecheck {
    resolver: TokioResolver,
    platform: PlatformConfig,
}

impl DnsPrecheck {
    /// Builds a resolver for the configured nameservers (or the system's when none are given).
    pub fn new(dns: &DnsConfig, platform: &PlatformConfig) -> Result<Self> {
        let mut options = ResolverOpts::default();
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        options.preserve_intermediates = true;
        let builder = if dns.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| {
                Error::Dns(format!(
                    "cannot read the system resolver configuration ({e}); set dns.nameservers"
                ))
            })?
        } else {
            let servers: Vec<NameServerConfig> = dns
                .nameservers
                .iter()
                .flat_map(|addr| {
                    [
                        NameServerConfig::new(*addr, Protocol::Udp),
                        NameServerConfig::new(*addr, Protocol::Tcp),
                    ]
                })
                .collect();
            options.use_hosts_file = ResolveHosts::Never;
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioConnectionProvider::default(),
            )
        };
        Ok(Self {
            resolver: builder.with_options(options).build(),
            platform: platform.clone(),
        })
    }

    /// The platform this pre-check compares against.
    pub fn platform(&self) -> &PlatformConfig {
        &self.platform
    }

    /// Resolves `name` now (no cached answers) and says whether it points at the platform.
    ///
    /// With no platform addresses or CNAME target configured, every name passes.
    pub async fn check(&self, name: &Hostname) -> DnsAnswer {
        let mut answer = DnsAnswer {
            name: name.clone(),
            addresses: Vec::new(),
            cnames: Vec::new(),
            points_here: false,
            problem: None,
        };
        self.resolver.clear_cache();
        match self.resolver.lookup_ip(format!("{name}.")).await {
            Ok(lookup) => {
                for record in lookup.as_lookup().records() {
                    match record.data() {
                        RData::A(a) => answer.addresses.push(IpAddr::V4(a.0)),
                        RData::AAAA(aaaa) => answer.addresses.push(IpAddr::V6(aaaa.0)),
                        RData::CNAME(cname) => answer.cnames.push(
                            cname
                                .0
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                        ),
                        _ => {}
                    }
                }
            }
            Err(error) => {
                answer.problem = Some(match error.kind() {
                    ResolveErrorKind::Proto(proto) if proto.is_no_records_found() => {
                        format!("{name} has no A or AAAA records")
                    }
                    _ => format!("looking up {name} failed: {error}"),
                });
            }
        }
        answer.addresses.sort();
        answer.addresses.dedup();
        let (points_here, problem) = judge(&self.platform, &answer);
        answer.points_here = points_here;
        if answer.problem.is_none() || points_here {
            answer.problem = problem;
        }
        answer
    }
}

/// Whether an answer points at the platform; if not, why, in words.
pub fn judge(platform: &PlatformConfig, answer: &DnsAnswer) -> (bool, Option<String>) {
    if !platform.precheck_enabled() {
        return (true, None);
    }
    let by_address = answer
        .addresses
        .iter()
        .any(|addr| platform.addresses.contains(addr));
    let by_cname = platform.cname_target.as_ref().is_some_and(|target| {
        let target = target.trim_end_matches('.').to_ascii_lowercase();
        answer.cnames.contains(&target)
    });
    if by_address || by_cname {
        return (true, None);
    }
    let expected = platform_description(platform);
    let got = if answer.addresses.is_empty() && answer.cnames.is_empty() {
        "nothing".to_owned()
    } else {
        answer
            .cnames
            .iter()
            .map(|c| format!("CNAME {c}"))
            .chain(answer.addresses.iter().map(IpAddr::to_string))
            .collect::<Vec<_>>()
            .join(", ")
    };
    (
        false,
        Some(format!(
            "{} resolves to {got}, not to the platform ({expected})",
            answer.name
        )),
    )
}

/// "127.0.0.1 or CNAME edge.example.net", for messages.
pub fn platform_description(platform: &PlatformConfig) -> String {
    platform
        .addresses
        .iter()
        .map(IpAddr::to_string)
        .chain(platform.cname_target.iter().map(|t| format!("CNAME {t}")))
        .collect::<Vec<_>>()
        .join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(addresses: &[&str], cnames: &[&str]) -> DnsAnswer {
        DnsAnswer {
            name: Hostname::parse("www.example.com").unwrap(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            cnames: cnames.iter().map(|c| c.to_string()).collect(),
            points_here: false,
            problem: None,
        }
    }

    fn platform() -> PlatformConfig {
        PlatformConfig {
            addresses: vec!["127.0.0.1".parse().unwrap()],
            cname_target: Some("edge.platform.test.".into()),
        }
    }

    #[test]
    fn address_of_platform_passes() {
        assert!(judge(&platform(), &answer(&["127.0.0.1"], &[])).0);
    }

    #[test]
    fn cname_to_platform_target_passes_whatever_the_addresses() {
        assert!(
            judge(
                &platform(),
                &answer(&["127.0.0.9"], &["edge.platform.test"])
            )
            .0
        );
    }

    #[test]
    fn other_address_fails_with_both_sides_named() {
        let (ok, why) = judge(&platform(), &answer(&["127.0.0.2"], &[]));
        assert!(!ok);
        let why = why.unwrap();
        assert!(
            why.contains("127.0.0.2")
                && why.contains("127.0.0.1")
                && why.contains("edge.platform.test"),
            "{why}"
        );
    }

    #[test]
    fn no_platform_configured_means_no_precheck() {
        assert!(judge(&PlatformConfig::default(), &answer(&[], &[])).0);
    }
}
