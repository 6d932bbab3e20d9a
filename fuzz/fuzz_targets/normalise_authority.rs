//! Fuzz target: `normalise_authority` never panics, and what it returns is only lower-case
//! letters, digits and `.-_:`, never longer than what came in — except a bracketed IPv6
//! literal, whose canonical text may be (`[::ffff:7f00:1]` → `::ffff:127.0.0.1`, found by this
//! target; harmless, since no site name is an address) but never more than 45 bytes.
#![no_main]

use autohttps_filter::policy::normalise_authority;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|authority: &str| {
    let Some(host) = normalise_authority(authority) else {
        return;
    };
    assert!(!host.is_empty());
    assert!(
        host.bytes().all(|b| b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'.' | b'-' | b'_' | b':')),
        "{authority:?} → {host:?}"
    );
    if authority.starts_with('[') {
        assert!(host.len() <= 45, "{authority:?} → {host:?}");
    } else {
        assert!(host.len() <= authority.len(), "{authority:?} → {host:?}");
    }
});
