//! Configuration: a TOML file plus `AUTOHTTPS_*` environment overrides; every field has a default.
//!
//! Every key can be overridden by an environment variable named after its path: `AUTOHTTPS_`,
//! then the path in upper case with `_` for `.` (`acme.orders_in_flight` ↔
//! `AUTOHTTPS_ACME_ORDERS_IN_FLIGHT`); [`keys`] lists them, found from the defaults.
//!
//! The sections that face Envoy, with their defaults:
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

use autohttps_filter::policy::Settings as EdgeSettings;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Let's Encrypt's staging directory: the default, so a fresh install never burns production limits.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Everything `autohttps serve` needs. `Config::default()` is a working loopback setup.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the SQLite database and generated files live (created 0700).
    pub data_dir: PathBuf,
    /// Which store holds sites and certificates: the embedded SQLite file, or the PostgreSQL
    /// database a fleet of edge nodes shares.
    pub store: StoreConfig,
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
    /// The edge's public ports and trusted proxies: the filter's own [`EdgeSettings`], written
    /// into every policy the feed serves.
    pub edge: EdgeSettings,
    /// How `serve` writes its log.
    pub log: LogConfig,
    /// What the metrics endpoint exposes.
    pub metrics: MetricsConfig,
    /// Event hooks (webhooks, commands).
    pub hooks: crate::hooks::HooksConfig,
}

/// The store section.
///
/// ```toml
/// [store]
/// # url = "postgres://autohttps:PASSWORD@db.internal:5432/autohttps"  # fleet mode
/// # url = "sqlite:/var/lib/autohttps/autohttps.db"  # absent: <data_dir>/autohttps.db
/// # node_id = "edge-1"   # this node's name in issuance leases; default: the host name
/// connections = 4        # PostgreSQL connections of this node
/// ```
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://…` (or `postgresql://…`) for PostgreSQL, `sqlite:PATH` for a SQLite file;
    /// unset: SQLite at `<data_dir>/autohttps.db`.
    pub url: Option<String>,
    /// This node's name in issuance leases: unique in the fleet and stable across restarts (a
    /// restarted node takes back its own leases at once). Unset: the host name.
    pub node_id: Option<String>,
    /// How many PostgreSQL connections (and threads) this node uses for store calls.
    pub connections: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            node_id: None,
            connections: 4,
        }
    }
}

/// Which backend a configuration selects.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded SQLite store, at this file.
    Sqlite(PathBuf),
    /// PostgreSQL, at this connection URL (it may hold a password: never printed).
    Postgres(String),
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Self::Postgres(_) => f.write_str("Postgres(<url redacted>)"),
        }
    }
}

impl StoreLocation {
    /// Reads a store URL: `postgres://…`/`postgresql://…` or `sqlite:PATH`.
    pub fn parse(url: &str) -> Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(url.to_owned()))
        } else if let Some(path) = url.strip_prefix("sqlite:").filter(|p| !p.is_empty()) {
            Ok(Self::Sqlite(PathBuf::from(
                path.strip_prefix("//").unwrap_or(path),
            )))
        } else {
            Err(Error::Config(
                "store.url must be postgres://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:PATH \
                 (unset: SQLite in data_dir)"
                    .into(),
            ))
        }
    }
}

impl StoreConfig {
    /// This node's id: `node_id`, else the host name, else `node`.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "node".into())
        })
    }
}

/// How `serve` writes its log (the level comes from `RUST_LOG`, default `info`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable lines; colour only on a terminal) or `json` (one object a line).
    pub format: LogFormat,
}

/// The log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Listener addresses; both default to loopback.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
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
#[derive(Clone, Deserialize, Serialize, PartialEq)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PlatformConfig {
    /// The platform's public addresses: a name passes if it resolves to one of them.
    pub addresses: Vec<IpAddr>,
    /// The platform's CNAME target: a name passes if its CNAME chain reaches it.
    pub cname_target: Option<String>,
}

/// Which DNS servers the pre-check asks.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// `ip:port` of recursive resolvers (UDP and TCP); empty means the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
}

/// The SDS server (Envoy fetches certificates here, by SNI hostname).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
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

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            store: StoreConfig::default(),
            listen: ListenConfig::default(),
            admin: AdminConfig::default(),
            acme: AcmeConfig::default(),
            platform: PlatformConfig::default(),
            dns: DnsConfig::default(),
            sds: SdsSettings::default(),
            edge: EdgeSettings::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
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

/// `[metrics]`: what the operations listener's `/metrics` exposes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Per-site series (expiration, renewal, ready status). Turn off for very large fleets
    /// where one series per site is too many; the aggregates stay.
    pub per_site: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { per_site: true }
    }
}

/// The file read when `--config` (and `AUTOHTTPS_CONFIG`) is not given, if it exists; else
/// [`LOCAL_CONFIG_PATH`] in the current directory; else no file (the defaults).
pub const SYSTEM_CONFIG_PATH: &str = "/etc/autohttps/autohttps.toml";

/// The configuration file looked for in the current directory when there is no system one.
pub const LOCAL_CONFIG_PATH: &str = "autohttps.toml";

/// The prefix of every environment variable that overrides a configuration key.
pub const ENV_PREFIX: &str = "AUTOHTTPS_";

/// Second names some keys answer to besides their generic `AUTOHTTPS_<PATH>` (the generic name
/// wins when both are set); [`keys`] gives each key its second name, so the overrides are the
/// one list [`keys`] returns.
const SECOND_ENV_NAMES: &[(&str, &str)] = &[
    ("AUTOHTTPS_ADMIN_LISTEN", "listen.admin"),
    ("AUTOHTTPS_INTERNAL_LISTEN", "listen.internal"),
    ("AUTOHTTPS_METRICS_LISTEN", "listen.metrics"),
    ("AUTOHTTPS_ACME_DIRECTORY", "acme.directory_url"),
    ("AUTOHTTPS_ACME_ROOT_CA", "acme.extra_root_ca"),
    ("AUTOHTTPS_PLATFORM_CNAME", "platform.cname_target"),
];

/// The kind of value a key holds, as its default shows it; it decides how an environment
/// variable's text becomes a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyShape {
    Text,
    Integer,
    Boolean,
    List,
    /// An optional key that is unset by default: its type is not visible, so the text is
    /// tried as a string, then as a TOML literal (a number, a boolean), then as a list.
    Unset,
}

/// One configuration key: its dotted path in the TOML file and the environment variable that
/// overrides it (`acme.contact` ↔ `AUTOHTTPS_ACME_CONTACT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigKey {
    /// The dotted path, e.g. `acme.orders_in_flight`.
    pub path: String,
    /// `AUTOHTTPS_` and the path in upper case with `.` as `_`, e.g. `AUTOHTTPS_ACME_ORDERS_IN_FLIGHT`.
    pub env: String,
    /// A second variable that sets the key when `env` is unset, e.g. `AUTOHTTPS_ACME_DIRECTORY`
    /// for `acme.directory_url`.
    pub second_env: Option<&'static str>,
    shape: KeyShape,
}

impl ConfigKey {
    /// The TOML values to try for `raw`, most likely first.
    fn candidates(&self, raw: &str) -> Result<Vec<toml::Value>> {
        let text = || toml::Value::String(raw.to_owned());
        let items = || {
            toml::Value::Array(
                split_list(raw)
                    .map(|item| toml::Value::String(item.to_owned()))
                    .collect(),
            )
        };
        let literal_items = || {
            split_list(raw)
                .map(toml_literal)
                .collect::<Option<Vec<_>>>()
                .map(toml::Value::Array)
        };
        Ok(match self.shape {
            KeyShape::Text => vec![text()],
            KeyShape::Integer => vec![toml::Value::Integer(raw.trim().parse().map_err(|_| {
                Error::Config(format!(
                    "{}={raw:?} ({}) is not a whole number",
                    self.env, self.path
                ))
            })?)],
            KeyShape::Boolean => vec![toml::Value::Boolean(
                match raw.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => {
                        return Err(Error::Config(format!(
                            "{}={raw:?} ({}) is not a boolean: use true or false",
                            self.env, self.path
                        )));
                    }
                },
            )],
            KeyShape::List if raw.trim_start().starts_with('[') => {
                vec![toml_literal(raw).ok_or_else(|| {
                    Error::Config(format!(
                        "{}={raw:?} ({}) starts with '[' but is not a TOML array",
                        self.env, self.path
                    ))
                })?]
            }
            KeyShape::List => [Some(items()), literal_items()]
                .into_iter()
                .flatten()
                .collect(),
            KeyShape::Unset => [Some(text()), toml_literal(raw), Some(items())]
                .into_iter()
                .flatten()
                .collect(),
        })
    }
}

/// `raw` read as a TOML value (`25`, `true`, `["a", "b"]`, `[{ url = "…" }]`), if it is one.
fn toml_literal(raw: &str) -> Option<toml::Value> {
    toml::from_str::<toml::Table>(&format!("value = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
}

/// Every configuration key, found by walking the defaults (so a key added to any section is
/// here, with its environment variable, without being listed anywhere). A list (`[..]`) is a
/// single key; an optional key unset by default is a key too.
pub fn keys() -> Vec<ConfigKey> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<ConfigKey>) {
        let serde_json::Value::Object(fields) = value else {
            return;
        };
        for (name, value) in fields {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let shape = match value {
                serde_json::Value::Object(_) => {
                    walk(&path, value, out);
                    continue;
                }
                serde_json::Value::String(_) => KeyShape::Text,
                serde_json::Value::Number(_) => KeyShape::Integer,
                serde_json::Value::Bool(_) => KeyShape::Boolean,
                serde_json::Value::Array(_) => KeyShape::List,
                serde_json::Value::Null => KeyShape::Unset,
            };
            let env = format!(
                "{ENV_PREFIX}{}",
                path.replace('.', "_").to_ascii_uppercase()
            );
            let second_env = SECOND_ENV_NAMES
                .iter()
                .find(|(_, key)| *key == path)
                .map(|(name, _)| *name);
            out.push(ConfigKey {
                path,
                env,
                second_env,
                shape,
            });
        }
    }
    let mut out = Vec::new();
    // Serialising the defaults cannot fail: every field is a plain value.
    if let Ok(defaults) = serde_json::to_value(Config::default()) {
        walk("", &defaults, &mut out);
    }
    out
}

/// Sets `path` (dotted) in `table` to `value`, creating the sections on the way.
fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut sections: Vec<&str> = path.split('.').collect();
    let Some(leaf) = sections.pop() else { return };
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        current = next;
    }
    current.insert(leaf.to_owned(), value);
}

impl Config {
    /// The file the CLI and `serve` read when none is named: [`SYSTEM_CONFIG_PATH`] when it
    /// exists, else [`LOCAL_CONFIG_PATH`] when it exists in the current directory, else none.
    pub fn default_path() -> Option<PathBuf> {
        [SYSTEM_CONFIG_PATH, LOCAL_CONFIG_PATH]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
    }

    /// Reads `path` (if given; else [`Config::default_path`]) and applies the process
    /// environment's overrides.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let path = path.map(Path::to_path_buf).or_else(Self::default_path);
        let config = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| Error::io("read configuration file", path, source))?;
                toml::from_str(&text).map_err(|e| Error::ConfigFile {
                    path: path.clone(),
                    message: e.to_string().trim_end().to_owned(),
                })?
            }
            None => Self::default(),
        };
        config.with_env(|name| std::env::var(name).ok())
    }

    /// Parses a TOML document; missing fields take their defaults.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string().trim_end().to_owned()))
    }

    /// Applies the `AUTOHTTPS_*` overrides read through `var` (the environment, or a map in
    /// tests), then checks the result ([`Config::validate`]).
    pub fn with_env(self, var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let config = self.apply_env(var)?;
        config.validate()?;
        Ok(config)
    }

    /// Applies the overrides without checking combinations: each key of [`keys`] whose
    /// variable is set replaces the value here. A list is comma-separated (`a, b`) or a TOML
    /// array (`["a", "b"]`).
    pub fn apply_env(self, var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let keys = keys();
        let mut overrides: Vec<(&ConfigKey, String, String)> = Vec::new();
        for key in &keys {
            let set = var(&key.env).map(|raw| (key.env.clone(), raw)).or_else(|| {
                key.second_env
                    .and_then(|name| var(name).map(|raw| (name.to_owned(), raw)))
            });
            if let Some((name, raw)) = set {
                overrides.push((key, name, raw));
            }
        }
        if overrides.is_empty() {
            return Ok(self);
        }
        let toml::Value::Table(mut table) = toml::Value::try_from(&self)
            .map_err(|e| Error::Internal(format!("the configuration does not serialise: {e}")))?
        else {
            return Err(Error::Internal(
                "the configuration did not serialise to a table".into(),
            ));
        };
        for (key, name, raw) in overrides {
            let mut first_error = None;
            let mut accepted = false;
            for candidate in key.candidates(&raw)? {
                let mut trial = table.clone();
                set_path(&mut trial, &key.path, candidate);
                match Config::deserialize(toml::Value::Table(trial.clone())) {
                    Ok(_) => {
                        table = trial;
                        accepted = true;
                        break;
                    }
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
            if !accepted {
                let reason = first_error
                    .map_or_else(String::new, |e| format!(": {}", e.to_string().trim_end()));
                return Err(Error::Config(format!(
                    "environment variable {name}={raw:?} is not a valid {}{reason}",
                    key.path
                )));
            }
        }
        Config::deserialize(toml::Value::Table(table))
            .map_err(|e| Error::Config(format!("after environment overrides: {e}")))
    }

    /// Checks the combinations a TOML schema cannot express.
    pub fn validate(&self) -> Result<()> {
        self.store_location()?;
        if self.store.connections == 0 {
            return Err(Error::Config("store.connections must be at least 1".into()));
        }
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
        // The filter's own checks, so a mistake is refused at start, not at Envoy's first poll.
        if let Some(problem) = self.edge.problems().first() {
            let key = problem
                .path
                .strip_prefix("settings.")
                .unwrap_or(&problem.path);
            return Err(Error::Config(format!("edge.{key}: {}", problem.message)));
        }
        self.hooks.validate()?;
        Ok(())
    }

    /// The SDS Unix socket path: `sds.socket`, by default `<data_dir>/sds.sock`.
    pub fn sds_socket_path(&self) -> PathBuf {
        self.sds
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("sds.sock"))
    }

    /// The store `serve` opens: `store.url`, else the SQLite file in `data_dir`.
    pub fn store_location(&self) -> Result<StoreLocation> {
        match &self.store.url {
            Some(url) => StoreLocation::parse(url),
            None => Ok(StoreLocation::Sqlite(self.database_path())),
        }
    }

    /// The SQLite database file when `store.url` is unset.
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
        assert_eq!(config.sds.tcp, None);
        assert_eq!(config.sds_socket_path(), PathBuf::from("./data/sds.sock"));
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
        assert_eq!(config.edge.https_port, 8443);
        assert_eq!(config.edge.trusted_proxies, vec!["10.0.0.0/8"]);
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
        assert_eq!(config.sds.tcp, Some(([127, 0, 0, 1], 18000).into()));
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
        assert!(
            err.to_string().contains("edge.trusted_proxies[0]: "),
            "{err}"
        );
        // The filter's own settings rule, named by the configuration key.
        let err = Config::default()
            .with_env(|name| (name == "AUTOHTTPS_EDGE_HTTP_PORT").then(|| "0".into()))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("edge.http_port: the port must be 1 to 65535"),
            "{err}"
        );
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
        assert!(
            err.to_string().contains("AUTOHTTPS_ADMIN_LISTEN")
                && err.to_string().contains("listen.admin"),
            "{err}"
        );
        let err = Config::default()
            .with_env(|name| (name == "AUTOHTTPS_ACME_EAB_KID").then(|| "kid".into()))
            .unwrap_err();
        assert!(err.to_string().contains("together"), "{err}");
    }

    /// The value at a dotted path of the config, as JSON (`null` for an unset option).
    fn value_at(config: &Config, path: &str) -> serde_json::Value {
        let mut value = serde_json::to_value(config).unwrap();
        for part in path.split('.') {
            value = value[part].take();
        }
        value
    }

    #[test]
    fn every_key_is_settable_from_its_environment_variable() {
        let keys = keys();
        // Keys of every section and kind are among them, each with its generic name.
        for (path, env) in [
            ("acme.contact", "AUTOHTTPS_ACME_CONTACT"),
            ("acme.orders_in_flight", "AUTOHTTPS_ACME_ORDERS_IN_FLIGHT"),
            ("acme.debounce_ms", "AUTOHTTPS_ACME_DEBOUNCE_MS"),
            (
                "acme.max_names_per_certificate",
                "AUTOHTTPS_ACME_MAX_NAMES_PER_CERTIFICATE",
            ),
            ("log.format", "AUTOHTTPS_LOG_FORMAT"),
        ] {
            assert!(
                keys.iter().any(|k| k.path == path && k.env == env),
                "{path} ({env}) missing from {keys:?}"
            );
        }
        let mut names: Vec<&str> = keys.iter().map(|k| k.env.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), keys.len(), "two keys share a variable name");

        // Texts that some key of each kind accepts; every key must take one of them (a key of
        // a new kind with none fails here: add a sample for it).
        let samples = [
            "7",
            "true",
            "false",
            "json",
            "127.0.0.1:9",
            "127.0.0.2, ::1",
            "127.0.0.1:53, 127.0.0.2:53",
            "https://127.0.0.1:14000/dir",
            "mailto:ops@example.com, mailto:oncall@example.com",
            "/srv/autohttps-env-test",
            "[]",
            r#"[{ command = ["/bin/true"] }]"#,
            r#"[{ url = "http://127.0.0.1:9/hook", secret = "0123456789abcdef" }]"#,
        ];
        let defaults = Config::default();
        for key in &keys {
            let changed = samples.iter().find_map(|sample| {
                let config = Config::default()
                    .apply_env(|name| (name == key.env).then(|| sample.to_string()))
                    .ok()?;
                (value_at(&config, &key.path) != value_at(&defaults, &key.path))
                    .then_some((sample, config))
            });
            let Some((sample, config)) = changed else {
                panic!("no sample value set {} through {}", key.path, key.env);
            };
            for other in keys.iter().filter(|k| k.path != key.path) {
                assert_eq!(
                    value_at(&config, &other.path),
                    value_at(&defaults, &other.path),
                    "{}={sample:?} changed {} too",
                    key.env,
                    other.path
                );
            }
        }
    }

    #[test]
    fn every_second_name_belongs_to_one_key_and_names_no_other() {
        let keys = keys();
        for (name, path) in SECOND_ENV_NAMES {
            let owners: Vec<&ConfigKey> = keys
                .iter()
                .filter(|k| k.second_env == Some(*name))
                .collect();
            assert_eq!(owners.len(), 1, "{name} should set exactly {path}");
            assert_eq!(owners[0].path, *path);
            assert!(
                keys.iter().all(|k| k.env != *name),
                "{name} is also the generic name of a key"
            );
        }
    }

    #[test]
    fn environment_overrides_take_typed_values_and_refuse_bad_ones() {
        let env: HashMap<&str, &str> = [
            ("AUTOHTTPS_ACME_ORDERS_IN_FLIGHT", "9"),
            ("AUTOHTTPS_ACME_DEBOUNCE_MS", "250"),
            (
                "AUTOHTTPS_ACME_CONTACT",
                "mailto:a@example.com, mailto:b@example.com",
            ),
            ("AUTOHTTPS_ACME_MAX_NAMES_PER_CERTIFICATE", "25"),
            ("AUTOHTTPS_ACME_EAB_KID", "12345"),
            ("AUTOHTTPS_ACME_EAB_HMAC_KEY", "c2VjcmV0"),
            ("AUTOHTTPS_LOG_FORMAT", "json"),
            ("AUTOHTTPS_ACME_DIRECTORY", "https://127.0.0.1:14000/dir"),
        ]
        .into();
        let config = Config::default()
            .with_env(|name| env.get(name).map(|v| v.to_string()))
            .unwrap();
        assert_eq!(config.acme.orders_in_flight, 9);
        assert_eq!(config.acme.debounce(), Duration::from_millis(250));
        assert_eq!(config.acme.contact.len(), 2);
        assert_eq!(config.acme.names_per_certificate(), 25);
        assert_eq!(
            config.acme.eab_kid.as_deref(),
            Some("12345"),
            "digits stay text"
        );
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(
            config.acme.directory_url, "https://127.0.0.1:14000/dir",
            "the older variable names are still read"
        );
        let err = Config::default()
            .with_env(|name| (name == "AUTOHTTPS_ACME_ORDERS_IN_FLIGHT").then(|| "many".into()))
            .unwrap_err();
        assert!(
            err.to_string().contains("AUTOHTTPS_ACME_ORDERS_IN_FLIGHT")
                && err.to_string().contains("whole number"),
            "{err}"
        );
        let err = Config::default()
            .with_env(|name| (name == "AUTOHTTPS_LOG_FORMAT").then(|| "xml".into()))
            .unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
    }

    #[test]
    fn a_file_error_names_the_file_once_with_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("autohttps.toml");
        std::fs::write(&path, "[acme]\norders_in_flight = \"four\"\n").unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert_eq!(err.matches("autohttps.toml").count(), 1, "{err}");
        assert_eq!(err.matches("configuration").count(), 1, "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let mut config = Config::default();
        config.admin.token = Some("super-secret-token-value".into());
        config.acme.eab_hmac_key = Some("hmac-secret".into());
        let shown = format!("{config:?}");
        assert!(!shown.contains("super-secret") && !shown.contains("hmac-secret"));
    }

    #[test]
    fn the_store_url_picks_the_backend() {
        let config = Config::default();
        assert_eq!(
            config.store_location().unwrap(),
            StoreLocation::Sqlite(config.database_path())
        );
        let pick = |url: &str| {
            Config::default()
                .with_env(|name| (name == "AUTOHTTPS_STORE_URL").then(|| url.to_owned()))
                .and_then(|config| config.store_location())
        };
        assert_eq!(
            pick("postgres://autohttps:secret@127.0.0.1:5432/fleet").unwrap(),
            StoreLocation::Postgres("postgres://autohttps:secret@127.0.0.1:5432/fleet".into())
        );
        assert_eq!(
            pick("sqlite:/srv/a.db").unwrap(),
            StoreLocation::Sqlite(PathBuf::from("/srv/a.db"))
        );
        let refused = pick("mysql://db/autohttps").unwrap_err().to_string();
        assert!(
            refused.contains("store.url must be postgres://"),
            "{refused}"
        );
        assert!(!format!("{:?}", pick("postgres://u:secret@h/d").unwrap()).contains("secret"));
    }
}
