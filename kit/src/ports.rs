//! Loopback ports for test servers: below Linux's ephemeral range (32768–60999), which the
//! kernel also hands to every outgoing connection and every `bind(:0)`. A port found by binding
//! `:0` and releasing it could go to another socket before its server bound it ("Address
//! already in use" from Envoy, seen in CI).

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::bail;

/// The ports handed out.
pub const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port nothing listens on right now (TCP and UDP, so a mock DNS can use it too),
/// from [`TEST_PORTS`], never handed out twice by this process; where a process starts in the
/// range depends on its pid, so two test processes rarely walk the same ports.
pub fn free_port() -> anyhow::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = TEST_PORTS.start + u16::try_from(offset).unwrap_or(0);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!(
        "no free loopback port in {}..{}: is something holding them all?",
        TEST_PORTS.start,
        TEST_PORTS.end
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_in_range_free_and_never_repeated() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a port")).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!(TEST_PORTS.contains(&port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("still free");
        }
    }
}
