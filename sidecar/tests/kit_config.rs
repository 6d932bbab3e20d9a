//! The test kit writes the sidecar's configuration file for every harness
//! (`autohttps_kit::sidecar::SidecarConfig`); the sidecar's own loader must read each setting
//! the kit writes as the kit meant it, so the two cannot drift apart.

use std::net::SocketAddr;
use std::path::PathBuf;

use autohttps_kit::sidecar::{EdgeSettings, SidecarConfig, StoreSettings};
use autohttps_sidecar::config::Config;

fn every_setting() -> SidecarConfig {
    SidecarConfig {
        data_dir: PathBuf::from("/tmp/kit \"quoted\" data"),
        admin: "127.0.0.1:21001".parse().expect("address"),
        internal: "127.0.0.1:21002".parse().expect("address"),
        metrics: "127.0.0.1:0".parse().expect("address"),
        admin_token: "kit-admin-token-0123456789".into(),
        directory_url: "https://127.0.0.1:21003/dir".into(),
        extra_root_ca: Some(PathBuf::from("/tmp/kit/listener-ca.pem")),
        debounce_ms: Some(100),
        platform_addresses: vec!["127.0.0.1".into(), "::1".into()],
        nameservers: vec!["127.0.0.1:21004".parse().expect("address")],
        sds_socket: Some(PathBuf::from("/tmp/kit/sds.sock")),
        edge: Some(EdgeSettings {
            http_port: 21005,
            https_port: 21006,
            trusted_proxies: vec!["10.0.0.0/8".into(), "::1".into()],
        }),
        orders_in_flight: Some(7),
        store: Some(StoreSettings {
            url: "postgres://autohttps@127.0.0.1:21007/fleet".into(),
            node_id: "edge-2".into(),
        }),
    }
}

#[test]
fn the_kits_configuration_reads_back_through_the_sidecars_loader() {
    let kit = every_setting();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("autohttps.toml");
    kit.write(&path).expect("written");
    // `load` is what `autohttps serve --config` runs (with no AUTOHTTPS_* variable set here).
    let config = Config::from_toml(&std::fs::read_to_string(&path).expect("read"))
        .and_then(|c| c.with_env(|_| None))
        .unwrap_or_else(|e| panic!("{e}\n{}", kit.to_toml()));
    assert_eq!(config.data_dir, kit.data_dir);
    assert_eq!(config.listen.admin, kit.admin);
    assert_eq!(config.listen.internal, kit.internal);
    assert_eq!(config.listen.metrics, kit.metrics);
    assert_eq!(
        config.admin.token.as_deref(),
        Some(kit.admin_token.as_str())
    );
    assert_eq!(config.acme.directory_url, kit.directory_url);
    assert_eq!(config.acme.extra_root_ca, kit.extra_root_ca);
    assert_eq!(Some(config.acme.debounce_ms), kit.debounce_ms);
    let addresses: Vec<String> = config
        .platform
        .addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(addresses, kit.platform_addresses);
    assert_eq!(config.dns.nameservers, kit.nameservers);
    assert_eq!(config.sds.socket, kit.sds_socket);
    let edge = kit.edge.expect("set");
    assert_eq!(config.edge.http_port, edge.http_port);
    assert_eq!(config.edge.https_port, edge.https_port);
    assert_eq!(config.edge.trusted_proxies, edge.trusted_proxies);
    assert_eq!(Some(config.acme.orders_in_flight), kit.orders_in_flight);
    let store = kit.store.expect("set");
    assert_eq!(config.store.url.as_deref(), Some(store.url.as_str()));
    assert_eq!(
        config.store.node_id.as_deref(),
        Some(store.node_id.as_str())
    );
}

#[test]
fn the_kits_minimal_configuration_keeps_the_sidecars_defaults() {
    let kit = SidecarConfig {
        extra_root_ca: None,
        debounce_ms: None,
        sds_socket: None,
        edge: None,
        orders_in_flight: None,
        store: None,
        ..every_setting()
    };
    let config = Config::from_toml(&kit.to_toml())
        .and_then(|c| c.with_env(|_| None))
        .expect("valid");
    let defaults = Config::default();
    assert_eq!(config.acme.debounce_ms, defaults.acme.debounce_ms);
    assert_eq!(config.acme.extra_root_ca, None);
    assert_eq!(config.edge, defaults.edge);
    assert_eq!(config.acme.orders_in_flight, defaults.acme.orders_in_flight);
    assert_eq!(config.store.url, defaults.store.url);
    let nameserver: SocketAddr = "127.0.0.1:21004".parse().expect("address");
    assert_eq!(config.dns.nameservers, vec![nameserver]);
}
