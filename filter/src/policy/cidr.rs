//! Address ranges for the trusted-proxy list.

use std::net::IpAddr;

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a single host).
    pub fn parse(raw: &str) -> Result<Cidr, String> {
        let (address, prefix) = match raw.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (raw, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| {
            format!("{raw:?} is not an IP address or CIDR (expected e.g. 10.0.0.0/8 or ::1/128)")
        })?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{raw:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }

    /// The network address as written (host bits are not cleared).
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length: 32 or 128 for a bare address.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `address` is inside this network. IPv4-mapped IPv6 addresses match IPv4 ranges.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(address),
            v4 => v4,
        };
        match (self.network, address) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_match(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_match(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_match(network: &[u8], address: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    if network[..full] != address[..full] {
        return false;
    }
    let rest = prefix % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    network[full] & mask == address[full] & mask
}

/// The Envoy filter-state key under which the Envoy configuration stores the directly connected
/// peer's address (`%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%`, set by
/// `envoy.filters.network.set_filter_state` on each new connection). The filter reads the peer
/// from here, never from `source.address`, which Envoy derives from `X-Forwarded-For` once
/// `xff_num_trusted_hops` is set.
pub const DIRECT_PEER_FILTER_STATE: &str = "autohttps.direct_peer";

/// Parses a peer address as Envoy formats one: `1.2.3.4:5678`, `[::1]:5678`, or a bare address.
pub fn parse_peer(raw: &str) -> Option<IpAddr> {
    if let Ok(address) = raw.parse::<IpAddr>() {
        return Some(address);
    }
    if let Some(rest) = raw.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    raw.rsplit_once(':')?.0.parse().ok()
}
