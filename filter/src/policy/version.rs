//! Feed versions: `"<epoch>-<n>"` (16 lowercase hex digits, then a decimal counter) are ordered
//! within one epoch; any other version is opaque, and only equality means anything. Versions
//! that name content are built from [`content_hash`].

/// A version of the `"<epoch>-<n>"` form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FeedVersion<'a> {
    epoch: &'a str,
    n: u64,
}

impl<'a> FeedVersion<'a> {
    fn parse(version: &'a str) -> Option<FeedVersion<'a>> {
        let (epoch, n) = version.split_once('-')?;
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if epoch.len() != 16 || !epoch.bytes().all(hex) {
            return None;
        }
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(FeedVersion {
            epoch,
            n: n.parse().ok()?,
        })
    }
}

/// Whether `candidate` is comparable with `current` (same epoch) and older: a policy of that
/// version must never replace the current one.
pub fn version_is_older(candidate: &str, current: &str) -> bool {
    match (FeedVersion::parse(candidate), FeedVersion::parse(current)) {
        (Some(a), Some(b)) => a.epoch == b.epoch && a.n < b.n,
        _ => false,
    }
}

/// FNV-1a, 64 bits: a stable hash of some content, for versions that name what they hold (a
/// policy document, a configured certificate). The same bytes give the same hash on every
/// machine and every build; it is not a security boundary.
pub fn content_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::{content_hash, version_is_older};

    /// The FNV-1a reference values (draft-eastlake-fnv, test vectors for FNV-1a 64).
    #[test]
    fn content_hash_is_fnv1a_64() {
        assert_eq!(content_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(content_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(content_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn only_versions_of_one_epoch_are_ordered() {
        let e = "0123456789abcdef";
        let older = |a: &str, b: &str| version_is_older(a, b);
        assert!(
            older(&format!("{e}-9"), &format!("{e}-10")),
            "numeric, not text, order"
        );
        assert!(!older(&format!("{e}-10"), &format!("{e}-9")));
        assert!(!older(&format!("{e}-10"), &format!("{e}-10")));
        assert!(
            !older(&format!("{e}-1"), "fedcba9876543210-5"),
            "another epoch"
        );
        assert!(!older("1", "2"), "opaque versions are not ordered");
        assert!(!older(&format!("{e}-1"), "v-test"));
        assert!(
            !older("0123456789ABCDEF-1", "0123456789ABCDEF-2"),
            "upper-case hex is opaque"
        );
        assert!(!older(&format!("{e}-"), &format!("{e}-2")));
        assert!(!older(&format!("{e}-1x"), &format!("{e}-2")));
    }
}
