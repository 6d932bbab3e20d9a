//! The sidecar as a process: its configuration file, typed ([`SidecarConfig`]; the sidecar's
//! own tests parse what it writes with the sidecar's loader, so the two cannot drift), and
//! where its binary is.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::pebble::Pebble;

/// The edge section: the public ports and the TLS-terminating proxies in front of Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSettings {
    /// Envoy's plain-HTTP port.
    pub http_port: u16,
    /// Envoy's TLS port.
    pub https_port: u16,
    /// CIDRs or bare addresses (`edge.trusted_proxies`).
    pub trusted_proxies: Vec<String>,
}

/// A sidecar configuration file (`autohttps.toml`) for a harness: the settings harnesses
/// choose; everything else keeps the sidecar's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarConfig {
    /// `data_dir`.
    pub data_dir: PathBuf,
    /// `listen.admin`.
    pub admin: SocketAddr,
    /// `listen.internal` (challenges, policy feed, CSP reports).
    pub internal: SocketAddr,
    /// `listen.metrics`.
    pub metrics: SocketAddr,
    /// `admin.token`.
    pub admin_token: String,
    /// `acme.directory_url`.
    pub directory_url: String,
    /// `acme.extra_root_ca`: the CA of the ACME server's own HTTPS listener.
    pub extra_root_ca: Option<PathBuf>,
    /// `acme.debounce_ms` (default: the sidecar's).
    pub debounce_ms: Option<u64>,
    /// `platform.addresses`.
    pub platform_addresses: Vec<String>,
    /// `dns.nameservers`.
    pub nameservers: Vec<SocketAddr>,
    /// `sds.socket` (default: `<data_dir>/sds.sock`).
    pub sds_socket: Option<PathBuf>,
    /// `edge` (default: the sidecar's).
    pub edge: Option<EdgeSettings>,
    /// `acme.orders_in_flight` (default: the sidecar's).
    pub orders_in_flight: Option<usize>,
    /// `[store]`: the shared store of a fleet (default: SQLite in `data_dir`).
    pub store: Option<StoreSettings>,
}

/// The `[store]` section of a fleet node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `store.url`: `postgres://…`.
    pub url: String,
    /// `store.node_id`: this node's name in leases and events.
    pub node_id: String,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl SidecarConfig {
    /// A sidecar issuing from `pebble` (trusting its listener, asking its mock DNS), every
    /// name pointing at 127.0.0.1, its data in `data_dir`, its admin API on `admin_port` with
    /// `admin_token`, its internal listener on `internal_port` and metrics on any free port.
    pub fn for_pebble(
        pebble: &Pebble,
        data_dir: &Path,
        admin_port: u16,
        internal_port: u16,
        admin_token: &str,
    ) -> SidecarConfig {
        SidecarConfig {
            data_dir: data_dir.to_path_buf(),
            admin: loopback(admin_port),
            internal: loopback(internal_port),
            metrics: loopback(0),
            admin_token: admin_token.to_string(),
            directory_url: pebble.directory_url.clone(),
            extra_root_ca: Some(pebble.listener_ca.clone()),
            debounce_ms: Some(100),
            platform_addresses: vec!["127.0.0.1".to_string()],
            nameservers: vec![pebble.dns],
            sds_socket: None,
            edge: None,
            orders_in_flight: None,
            store: None,
        }
    }

    /// The TOML document.
    pub fn to_toml(&self) -> String {
        use toml::{Table, Value};
        fn table(entries: Vec<(&str, Value)>) -> Value {
            Value::Table(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            )
        }
        fn strings<T: ToString>(items: &[T]) -> Value {
            Value::Array(items.iter().map(|i| Value::String(i.to_string())).collect())
        }
        let text = |s: &dyn std::fmt::Display| Value::String(s.to_string());
        let mut doc = Table::new();
        doc.insert("data_dir".into(), text(&self.data_dir.display()));
        doc.insert(
            "listen".into(),
            table(vec![
                ("admin", text(&self.admin)),
                ("internal", text(&self.internal)),
                ("metrics", text(&self.metrics)),
            ]),
        );
        doc.insert(
            "admin".into(),
            table(vec![("token", text(&self.admin_token))]),
        );
        let mut acme = vec![("directory_url", text(&self.directory_url))];
        if let Some(ms) = self.debounce_ms {
            acme.push((
                "debounce_ms",
                Value::Integer(i64::try_from(ms).unwrap_or(i64::MAX)),
            ));
        }
        if let Some(ca) = &self.extra_root_ca {
            acme.push(("extra_root_ca", text(&ca.display())));
        }
        if let Some(orders) = self.orders_in_flight {
            acme.push((
                "orders_in_flight",
                Value::Integer(i64::try_from(orders).unwrap_or(i64::MAX)),
            ));
        }
        doc.insert("acme".into(), table(acme));
        doc.insert(
            "platform".into(),
            table(vec![("addresses", strings(&self.platform_addresses))]),
        );
        doc.insert(
            "dns".into(),
            table(vec![("nameservers", strings(&self.nameservers))]),
        );
        if let Some(socket) = &self.sds_socket {
            doc.insert(
                "sds".into(),
                table(vec![("socket", text(&socket.display()))]),
            );
        }
        if let Some(edge) = &self.edge {
            doc.insert(
                "edge".into(),
                table(vec![
                    ("http_port", Value::Integer(edge.http_port.into())),
                    ("https_port", Value::Integer(edge.https_port.into())),
                    ("trusted_proxies", strings(&edge.trusted_proxies)),
                ]),
            );
        }
        if let Some(store) = &self.store {
            doc.insert(
                "store".into(),
                table(vec![
                    ("url", text(&store.url)),
                    ("node_id", text(&store.node_id)),
                ]),
            );
        }
        format!(
            "# autohttps sidecar configuration written by the test kit (autohttps_kit::sidecar).\n{}",
            toml::to_string(&doc).unwrap_or_default()
        )
    }

    /// Writes the TOML document to `path`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.to_toml()).with_context(|| format!("writing {}", path.display()))
    }
}

/// The `autohttps` binary: `$AUTOHTTPS_BIN`, else the release build, else the debug build.
pub fn sidecar_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AUTOHTTPS_BIN") {
        return Ok(PathBuf::from(path));
    }
    let target = crate::target_dir();
    for candidate in ["release/autohttps", "debug/autohttps"] {
        let path = target.join(candidate);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("the sidecar is not built; run `make build` (or set AUTOHTTPS_BIN)")
}
