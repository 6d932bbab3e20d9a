//! Configuration: a TOML file plus `AUTOHTTPS_*` environment overrides; every field has a default.
//!
//! The sections that face Envoy, with their defaults (environment overrides in
//! [`ENV_OVERRIDES`]):
//!
//! ```toml
//! [listen]
//! internal = "127.0.0.1:8082"   # Envoy's `sidecar_http` cluster: HTTP-01 + GET /v1/policy
//!
//! [sds]
//! # socket = "<data_dir>/sds.sock"   # Unix socket, 0600 (Envoy: cluster endpoint `pipe.path`)
//! # tcp = "127.0.0.1:18000"          # instead of the socket; keep it on loopback
//! # default_certificate = "/etc/autohttps/default.pem"  # for clients without SNI, with
//! # default_key = "/etc/autohttps/default.key"          # its key; else self-signed
//!
//! [edge]
//! http_port = 80        # the public ports, written into redirects when not 80/443
//! https_port = 443
//! trusted_proxies = []  # addresses/CIDRs whose X-Forwarded-Proto the filter believes
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Let's Encrypt's staging directory: the default, so a fresh install never burns production limits.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Everything `autohttps serve` needs. `Config::default()` is a working loopback setup.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the SQLite database and generated files live (created 0700).
    pub data_dir: PathBuf,
    /// Listener addresses.
    pub listen: ListenConfig,
    /// Admin API access.
    pub admin: AdminConfig,
    /// The ACME CA and how to talk to it.
    pub acme: AcmeConfig,
    /// What "points at the platform" means for the DNS pre-check.
    pub platform: PlatformConfig,
    /// Which DNS servers the pre-check asks.
    pub dns: DnsConfig,
    /// Where the SDS server listens and the certificate for clients without SNI.
    pub sds: SdsSettings,
    /// The edge's public ports and trusted proxies, as the filter sees them (policy feed).
    pub edge: EdgeConfig,
    /// What the metrics endpoint exposes.
    pub metrics: crate::metrics::MetricsConfig,
    /// Event hooks (webhooks, commands).
    pub hooks: crate::hooks::HooksConfig,
}

/// Listener addresses; both default to loopback.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// The admin API (JSON, bearer token).
    pub admin: SocketAddr,
    /// The internal listener Envoy routes to: HTTP-01 challenges and the policy feed
    /// (`GET /v1/policy`).
    pub internal: SocketAddr,
    /// The operations listener: Prometheus `/metrics`, `/readyz`, `/healthz`; no token, so
    /// keep it on loopback or a monitoring network. Default `127.0.0.1:9402` (cert-manager's
    /// metrics port; Prometheus itself takes 9090).
    pub metrics: SocketAddr,
}

/// Admin API access.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// The bearer token. When unset (and `AUTOHTTPS_ADMIN_TOKEN` is unset) one is generated on
    /// first start and kept in `<data_dir>/admin-token` (0600), where the CLI finds it.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The ACME CA and how to talk to it.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// The directory URL (RFC 8555 §7.1.1).
    pub directory_url: String,
    /// Contact URLs for the account (`mailto:ops@example.com`).
    pub contact: Vec<String>,
    /// External account binding key id (RFC 8555 §7.3.4), for CAs that require one.
    pub eab_kid: Option<String>,
    /// External account binding HMAC key, base64url as the CA hands it out.
    pub eab_hmac_key: Option<String>,
    /// An ACME profile to request (draft-aaron-acme-profiles), e.g. `shortlived`.
    pub profile: Option<String>,
    /// A PEM file with an extra root CA to trust for the CA's HTTPS endpoint (Pebble's).
    pub extra_root_ca: Option<PathBuf>,
    /// Names per certificate; default 100, or 25 when the profile name contains `short`.
    pub max_names_per_certificate: Option<usize>,
    /// At most this many orders run at once.
    pub orders_in_flight: usize,
    /// Changes to a site within this many milliseconds are coalesced into one order.
    pub debounce_ms: u64,
}

impl std::fmt::Debug for AcmeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeConfig")
            .field("directory_url", &self.directory_url)
            .field("contact", &self.contact)
            .field("eab_kid", &self.eab_kid)
            .field(
                "eab_hmac_key",
                &self.eab_hmac_key.as_ref().map(|_| "<redacted>"),
            )
            .field("profile", &self.profile)
            .field("extra_root_ca", &self.extra_root_ca)
            .field("max_names_per_certificate", &self.max_names_per_certificate)
            .field("orders_in_flight", &self.orders_in_flight)
            .field("debounce_ms", &self.debounce_ms)
            .finish()
    }
}

/// What "points at the platform" means. With neither field set the DNS pre-check is off.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PlatformConfig {
    /// The platform's public addresses: a name passes if it resolves to one of them.
    pub addresses: Vec<IpAddr>,
    /// The platform's CNAME target: a name passes if its CNAME chain reaches it.
    pub cname_target: Option<String>,
}

/// Which DNS servers the pre-check asks.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// `ip:port` of recursive resolvers (UDP and TCP); empty means the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
}

/// The SDS server (Envoy fetches certificates here, by SNI hostname).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SdsSettings {
    /// The Unix socket (created 0600; its directory 0700 when created). Default
    /// `<data_dir>/sds.sock`; see [`Config::sds_socket_path`].
    pub socket: Option<PathBuf>,
    /// Listen on this TCP address instead of the Unix socket (e.g. Envoy in another network
    /// namespace). Anyone who can connect gets private keys: keep it on loopback.
    pub tcp: Option<SocketAddr>,
    /// A PEM certificate chain served to clients that send no SNI (with `default_key`).
    /// Unset: a self-signed certificate for `autohttps-default.invalid`, generated at start.
    pub default_certificate: Option<PathBuf>,
    /// The PEM private key of `default_certificate`.
    pub default_key: Option<PathBuf>,
}

/// The edge as the filter sees it: public ports (written into redirects) and trusted proxies.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// The public plain-HTTP port; redirects to HTTP name it when it is not 80.
    pub http_port: u16,
    /// The public HTTPS port; redirects to HTTPS name it when it is not 443.
    pub https_port: u16,
    /// Peers (addresses or CIDRs) whose `X-Forwarded-Proto` the filter believes.
    pub trusted_proxies: Vec<String>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            http_port: 80,
            https_port: 443,
            trusted_proxies: Vec::new(),
        }
    }
}

impl EdgeConfig {
    /// The settings the policy feed writes into every policy.
    pub fn settings(&self) -> crate::policy_feed::EdgeSettings {
        crate::policy_feed::EdgeSettings {
            trusted_proxies: self.trusted_proxies.clone(),
            http_port: self.http_port,
            https_port: self.https_port,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            listen: ListenConfig::default(),
            admin: AdminConfig::default(),
            acme: AcmeConfig::default(),
            platform: PlatformConfig::default(),
            dns: DnsConfig::default(),
            sds: SdsSettings::default(),
            edge: EdgeConfig::default(),
            metrics: crate::metrics::MetricsConfig::default(),
            hooks: crate::hooks::HooksConfig::default(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            admin: SocketAddr::from(([127, 0, 0, 1], 8081)),
            internal: SocketAddr::from(([127, 0, 0, 1], 8082)),
            metrics: SocketAddr::from(([127, 0, 0, 1], 9402)),
        }
    }
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            directory_url: LETS_ENCRYPT_STAGING.into(),
            contact: Vec::new(),
            eab_kid: None,
            eab_hmac_key: None,
            profile: None,
            extra_root_ca: None,
            max_names_per_certificate: None,
            orders_in_flight: 4,
            debounce_ms: 2000,
        }
    }
}

impl AcmeConfig {
    /// The CA's names-per-certificate limit: 100 for Let's Encrypt classic, 25 for short-lived.
    pub fn names_per_certificate(&self) -> usize {
        match (self.max_names_per_certificate, &self.profile) {
            (Some(limit), _) => limit.max(1),
            (None, Some(profile)) if profile.contains("short") => 25,
            (None, _) => 100,
        }
    }

    /// The debounce window.
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms)
    }
}

impl PlatformConfig {
    /// Whether the DNS pre-check has anything to compare against.
    pub fn precheck_enabled(&self) -> bool {
        !self.addresses.is_empty() || self.cname_target.is_some()
    }
}

/// The environment variables that override the file, and the field each one sets.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("AUTOHTTPS_DATA_DIR", "data_dir"),
    ("AUTOHTTPS_ADMIN_LISTEN", "listen.admin"),
    ("AUTOHTTPS_INTERNAL_LISTEN", "listen.internal"),
    ("AUTOHTTPS_METRICS_LISTEN", "listen.metrics"),
    ("AUTOHTTPS_ADMIN_TOKEN", "admin.token"),
    ("AUTOHTTPS_ACME_DIRECTORY", "acme.directory_url"),
    ("AUTOHTTPS_ACME_PROFILE", "acme.profile"),
    ("AUTOHTTPS_ACME_ROOT_CA", "acme.extra_root_ca"),
    ("AUTOHTTPS_ACME_EAB_KID", "acme.eab_kid"),
    ("AUTOHTTPS_ACME_EAB_HMAC_KEY", "acme.eab_hmac_key"),
    (
        "AUTOHTTPS_PLATFORM_ADDRESSES",
        "platform.addresses (comma-separated)",
    ),
    ("AUTOHTTPS_PLATFORM_CNAME", "platform.cname_target"),
    (
        "AUTOHTTPS_DNS_NAMESERVERS",
        "dns.nameservers (comma-separated ip:port)",
    ),
    ("AUTOHTTPS_SDS_SOCKET", "sds.socket"),
    ("AUTOHTTPS_SDS_TCP", "sds.tcp"),
    (
        "AUTOHTTPS_SDS_DEFAULT_CERTIFICATE",
        "sds.default_certificate",
    ),
    ("AUTOHTTPS_SDS_DEFAULT_KEY", "sds.default_key"),
    ("AUTOHTTPS_EDGE_HTTP_PORT", "edge.http_port"),
    ("AUTOHTTPS_EDGE_HTTPS_PORT", "edge.https_port"),
    (
        "AUTOHTTPS_EDGE_TRUSTED_PROXIES",
        "edge.trusted_proxies (comma-separated)",
    ),
];

impl Config {
    /// Reads `path` (if given) and applies the process environment's overrides.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| Error::io("read config file", path, source))?;
                Self::from_toml(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            None => Self::default(),
        };
        config.with_env(|name| std::env::var(name).ok())
    }

    /// Parses a TOML document; missing fields take their defaults.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Applies `AUTOHTTPS_*` overrides read through `var` (the environment, or a map in tests).
    pub fn with_env(mut self, var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let parse_addr = |name: &str, value: String| -> Result<SocketAddr> {
            value.parse().map_err(|_| {
                Error::Config(format!(
                    "{name}={value:?} is not an ip:port such as 127.0.0.1:8081"
                ))
            })
        };
        if let Some(v) = var("AUTOHTTPS_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = var("AUTOHTTPS_ADMIN_LISTEN") {
            self.listen.admin = parse_addr("AUTOHTTPS_ADMIN_LISTEN", v)?;
        }
        if let Some(v) = var("AUTOHTTPS_INTERNAL_LISTEN") {
            self.listen.internal = parse_addr("AUTOHTTPS_INTERNAL_LISTEN", v)?;
        }
        if let Some(v) = var("AUTOHTTPS_METRICS_LISTEN") {
            self.listen.metrics = parse_addr("AUTOHTTPS_METRICS_LISTEN", v)?;
        }
        if let Some(v) = var("AUTOHTTPS_ADMIN_TOKEN") {
            self.admin.token = Some(v);
        }
        if let Some(v) = var("AUTOHTTPS_ACME_DIRECTORY") {
            self.acme.directory_url = v;
        }
        if let Some(v) = var("AUTOHTTPS_ACME_PROFILE") {
            self.acme.profile = Some(v);
        }
        if let Some(v) = var("AUTOHTTPS_ACME_ROOT_CA") {
            self.acme.extra_root_ca = Some(v.into());
        }
        if let Some(v) = var("AUTOHTTPS_ACME_EAB_KID") {
            self.acme.eab_kid = Some(v);
        }
        if let Some(v) = var("AUTOHTTPS_ACME_EAB_HMAC_KEY") {
            self.acme.eab_hmac_key = Some(v);
        }
        if let Some(v) = var("AUTOHTTPS_PLATFORM_ADDRESSES") {
            self.platform.addresses = split_list(&v)
                .map(|item| {
                    item.parse().map_err(|_| {
                        Error::Config(format!(
                            "AUTOHTTPS_PLATFORM_ADDRESSES: {item:?} is not an IP address"
                        ))
                    })
                })
                .collect::<Result<_>>()?;
        }
        if let Some(v) = var("AUTOHTTPS_PLATFORM_CNAME") {
            self.platform.cname_target = Some(v);
        }
        if let Some(v) = var("AUTOHTTPS_DNS_NAMESERVERS") {
            self.dns.nameservers = split_list(&v)
                .map(|item| parse_addr("AUTOHTTPS_DNS_NAMESERVERS", item.to_owned()))
                .collect::<Result<_>>()?;
        }
        if let Some(v) = var("AUTOHTTPS_SDS_SOCKET") {
            self.sds.socket = Some(v.into());
        }
        if let Some(v) = var("AUTOHTTPS_SDS_TCP") {
            self.sds.tcp = Some(parse_addr("AUTOHTTPS_SDS_TCP", v)?);
        }
        if let Some(v) = var("AUTOHTTPS_SDS_DEFAULT_CERTIFICATE") {
            self.sds.default_certificate = Some(v.into());
        }
        if let Some(v) = var("AUTOHTTPS_SDS_DEFAULT_KEY") {
            self.sds.default_key = Some(v.into());
        }
        let parse_port = |name: &str, value: String| -> Result<u16> {
            value.parse().map_err(|_| {
                Error::Config(format!("{name}={value:?} is not a port number (1-65535)"))
            })
        };
        if let Some(v) = var("AUTOHTTPS_EDGE_HTTP_PORT") {
            self.edge.http_port = parse_port("AUTOHTTPS_EDGE_HTTP_PORT", v)?;
        }
        if let Some(v) = var("AUTOHTTPS_EDGE_HTTPS_PORT") {
            self.edge.https_port = parse_port("AUTOHTTPS_EDGE_HTTPS_PORT", v)?;
        }
        if let Some(v) = var("AUTOHTTPS_EDGE_TRUSTED_PROXIES") {
            self.edge.trusted_proxies = split_list(&v).map(str::to_owned).collect();
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the combinations a TOML schema cannot express.
    pub fn validate(&self) -> Result<()> {
        if self.acme.eab_kid.is_some() != self.acme.eab_hmac_key.is_some() {
            return Err(Error::Config(
                "acme.eab_kid and acme.eab_hmac_key must be set together (the CA gives both)"
                    .into(),
            ));
        }
        if self.acme.orders_in_flight == 0 {
            return Err(Error::Config(
                "acme.orders_in_flight must be at least 1".into(),
            ));
        }
        if !self.acme.directory_url.starts_with("https://") {
            return Err(Error::Config(format!(
                "acme.directory_url {:?} must be an https:// URL (RFC 8555 §6.1)",
                self.acme.directory_url
            )));
        }
        if matches!(&self.admin.token, Some(token) if token.len() < 16) {
            return Err(Error::Config(
                "admin.token must be at least 16 characters; generate one with `openssl rand -hex 32`"
                    .into(),
            ));
        }
        if self.sds.default_certificate.is_some() != self.sds.default_key.is_some() {
            return Err(Error::Config(
                "sds.default_certificate and sds.default_key must be set together (a PEM chain and its key)"
                    .into(),
            ));
        }
        if self.sds.socket.is_some() && self.sds.tcp.is_some() {
            return Err(Error::Config(
                "set sds.socket or sds.tcp, not both: the SDS server listens on one of them".into(),
            ));
        }
        if self.edge.http_port == 0 || self.edge.https_port == 0 {
            return Err(Error::Config(
                "edge.http_port and edge.https_port must be the public ports (1-65535) Envoy listens on"
                    .into(),
            ));
        }
        self.edge.settings().validate()?;
        self.hooks.validate()?;
        Ok(())
    }

    /// Where the SDS server listens: `sds.tcp` if set, else the Unix socket `sds.socket`,
    /// by default `<data_dir>/sds.sock`.
    pub fn sds_listen(&self) -> crate::sds::SdsListen {
        match self.sds.tcp {
            Some(address) => crate::sds::SdsListen::Tcp(address),
            None => crate::sds::SdsListen::Unix(self.sds_socket_path()),
        }
    }

    /// The SDS Unix socket path: `sds.socket`, by default `<data_dir>/sds.sock`.
    pub fn sds_socket_path(&self) -> PathBuf {
        self.sds
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("sds.sock"))
    }

    /// The SQLite database file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("autohttps.db")
    }

    /// Where a generated admin token is kept.
    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin-token")
    }
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn no_file_gives_loopback_staging_defaults() {
        let config = Config::default().with_env(|_| None).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.acme.directory_url, LETS_ENCRYPT_STAGING);
        assert!(config.listen.admin.ip().is_loopback());
        assert!(config.listen.internal.ip().is_loopback());
        assert_eq!(config.acme.names_per_certificate(), 100);
        assert_eq!(
            config.sds_listen(),
            crate::sds::SdsListen::Unix(PathBuf::from("./data/sds.sock"))
        );
        assert_eq!((config.edge.http_port, config.edge.https_port), (80, 443));
        assert!(config.edge.trusted_proxies.is_empty());
        assert_eq!(config.sds.default_certificate, None);
    }

    #[test]
    fn sds_and_edge_from_file_and_environment() {
        let config = Config::from_toml(
            r#"
            data_dir = "/var/lib/autohttps"
            [sds]
            default_certificate = "/etc/autohttps/default.pem"
            default_key = "/etc/autohttps/default.key"
            [edge]
            http_port = 8080
            https_port = 8443
            trusted_proxies = ["10.0.0.0/8"]
            "#,
        )
        .unwrap()
        .with_env(|_| None)
        .unwrap();
        assert_eq!(
            config.sds_socket_path(),
            PathBuf::from("/var/lib/autohttps/sds.sock")
        );
        assert_eq!(config.edge.settings().https_port, 8443);
        assert_eq!(config.edge.settings().trusted_proxies, vec!["10.0.0.0/8"]);
        let env: HashMap<&str, &str> = [
            ("AUTOHTTPS_SDS_TCP", "127.0.0.1:18000"),
            ("AUTOHTTPS_EDGE_HTTP_PORT", "80"),
            (
                "AUTOHTTPS_EDGE_TRUSTED_PROXIES",
                "192.0.2.1, 198.51.100.0/24",
            ),
        ]
        .into();
        let config = config
            .with_env(|name| env.get(name).map(|v| v.to_string()))
            .unwrap();
        assert_eq!(
            config.sds_listen(),
            crate::sds::SdsListen::Tcp(([127, 0, 0, 1], 18000).into())
        );
        assert_eq!(config.edge.http_port, 80);
        assert_eq!(config.edge.trusted_proxies.len(), 2);
        let config = Config::default()
            .with_env(|name| {
                (name == "AUTOHTTPS_SDS_SOCKET").then(|| "/run/autohttps/sds.sock".into())
            })
            .unwrap();
        assert_eq!(
            config.sds_socket_path(),
            PathBuf::from("/run/autohttps/sds.sock")
        );
    }

    #[test]
    fn inconsistent_sds_and_edge_settings_are_refused_with_reason() {
        let err = Config::from_toml("[sds]\ndefault_key = \"k.pem\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("together"), "{err}");
        let err = Config::from_toml("[sds]\nsocket = \"/s\"\ntcp = \"127.0.0.1:1\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = Config::default()
            .with_env(|name| (name == "AUTOHTTPS_EDGE_HTTPS_PORT").then(|| "70000".into()))
            .unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = Config::default()
            .with_env(|name| (name == "AUTOHTTPS_EDGE_TRUSTED_PROXIES").then(|| "not-an-ip".into()))
            .unwrap_err();
        assert!(err.to_string().contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn file_then_environment_override() {
        let config = Config::from_toml(
            r#"
            data_dir = "/var/lib/autohttps"
            [acme]
            directory_url = "https://127.0.0.1:14000/dir"
            profile = "shortlived"
            [platform]
            addresses = ["127.0.0.1"]
            "#,
        )
        .unwrap();
        assert_eq!(config.acme.names_per_certificate(), 25);
        let env: HashMap<&str, &str> = [
            ("AUTOHTTPS_DATA_DIR", "/tmp/x"),
            ("AUTOHTTPS_PLATFORM_ADDRESSES", "127.0.0.1, ::1"),
            ("AUTOHTTPS_DNS_NAMESERVERS", "127.0.0.1:8053"),
        ]
        .into();
        let config = config
            .with_env(|name| env.get(name).map(|v| v.to_string()))
            .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.platform.addresses.len(), 2);
        assert_eq!(config.dns.nameservers[0].port(), 8053);
    }

    #[test]
    fn unknown_field_and_bad_values_are_refused_with_reason() {
        let err = Config::from_toml("data_dri = \"x\"").unwrap_err();
        assert!(err.to_string().contains("data_dri"), "{err}");
        let err = Config::default()
            .with_env(|name| (name == "AUTOHTTPS_ADMIN_LISTEN").then(|| "nope".into()))
            .unwrap_err();
        assert!(err.to_string().contains("ip:port"), "{err}");
        let err = Config::default()
            .with_env(|name| (name == "AUTOHTTPS_ACME_EAB_KID").then(|| "kid".into()))
            .unwrap_err();
        assert!(err.to_string().contains("together"), "{err}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let mut config = Config::default();
        config.admin.token = Some("super-secret-token-value".into());
        config.acme.eab_hmac_key = Some("hmac-secret".into());
        let shown = format!("{config:?}");
        assert!(!shown.contains("super-secret") && !shown.contains("hmac-secret"));
    }
}
