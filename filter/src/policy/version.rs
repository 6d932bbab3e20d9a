//! Feed versions: `"<epoch>-<n>"` (16 lowercase hex digits, then a decimal counter) are ordered
//! within one epoch; any other version is opaque, and only equality means anything.

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

#[cfg(test)]
mod tests {
    use super::version_is_older;

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
