//! Loopback ports for the sidecar's test servers (the same rule as the tests crate's
//! `autohttps_tests::envoy::free_port`): below Linux's ephemeral range (32768–60999), which the
//! kernel also hands to every outgoing connection and every `bind(:0)`. A port found by binding
//! `:0` and releasing it could go to another socket before its server bound it ("Address
//! already in use" from Envoy, seen in CI).

use std::sync::atomic::{AtomicU32, Ordering};

/// The ports handed out.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port nothing listens on right now (TCP and UDP, so the mock DNS can use it too),
/// never handed out twice by this process; where a process starts in the range depends on its
/// pid, so two test processes rarely walk the same ports.
pub fn free_port() -> u16 {
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
            return port;
        }
    }
    panic!(
        "no free loopback port in {}..{}: is something holding them all?",
        TEST_PORTS.start, TEST_PORTS.end
    )
}
