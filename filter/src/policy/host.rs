//! Hostnames: the one validity rule for a name, the one wildcard rule for what a certificate or
//! a policy wildcard covers, and the normalisation of request authorities. The filter applies
//! them at the edge; the sidecar's hostnames, SDS index and store call the same functions.

use std::net::Ipv6Addr;

/// Longest hostname, in bytes, without the trailing dot (RFC 1035 §2.3.4).
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Longest label, in bytes (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// A policy name: an exact hostname or a `*.parent` wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyName {
    /// An exact, normalised hostname.
    Exact(String),
    /// A wildcard; the string is the parent (`example.com` for `*.example.com`).
    Wildcard(String),
}

/// Validates and normalises a hostname listed in a policy (lower case, no trailing dot).
///
/// Returns the reason in words when the name is not acceptable.
pub fn parse_policy_name(raw: &str) -> Result<PolicyName, String> {
    let mut name = fold_hostname(raw);
    if check_lowered_policy_name(&name)? {
        name.drain(..2);
        return Ok(PolicyName::Wildcard(name));
    }
    Ok(PolicyName::Exact(name))
}

/// Checks a policy name that is already lower case without its trailing dot; returns whether it
/// is a `*.parent` wildcard (its table key is then the part after `*.`). The compiler writes
/// names straight into a site's packed name buffer and checks them there, with no allocation.
pub(crate) fn check_lowered_policy_name(name: &str) -> Result<bool, String> {
    if let Some(parent) = name.strip_prefix("*.") {
        if parent.contains('*') {
            return Err("a wildcard may only be the whole first label, as in *.example.com".into());
        }
        validate_hostname(parent)?;
        if !parent.contains('.') {
            return Err(format!(
                "wildcard *.{parent} would cover a whole top-level domain; use *.name.{parent}"
            ));
        }
        return Ok(true);
    }
    if name.contains('*') {
        return Err("a wildcard may only be the whole first label, as in *.example.com".into());
    }
    validate_hostname(name)?;
    Ok(false)
}

/// Checks a lower-case hostname against the DNS rules: ASCII letters, digits and hyphens,
/// labels of 1 to 63 bytes not starting or ending with a hyphen, 253 bytes in all, and not an
/// IP address.
pub fn validate_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the hostname is empty".into());
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(format!(
            "the hostname is {} bytes long; the limit is {MAX_HOSTNAME_LEN}",
            name.len()
        ));
    }
    if !name.is_ascii() {
        return Err(
            "the hostname has non-ASCII characters; write internationalised names as punycode A-labels (xn--…)"
                .into(),
        );
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(
                "the hostname has an empty label (two dots in a row, or a leading dot)".into(),
            );
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "the label {label:?} is {} bytes long; the limit is {MAX_LABEL_LEN}",
                label.len()
            ));
        }
        // ASCII only (checked above), so bytes are characters.
        if let Some(&bad) = label
            .as_bytes()
            .iter()
            .find(|b| !(b.is_ascii_alphanumeric() || **b == b'-'))
        {
            let bad = char::from(bad);
            return Err(format!(
                "the label {label:?} contains {bad:?}; only letters, digits and '-' are allowed"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("the label {label:?} starts or ends with '-'"));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("an IP address is not a hostname; certificates are issued for names".into());
    }
    Ok(())
}

/// Normalises a request's `:authority` (or `Host`) for lookup: strips the port, lower-cases and
/// drops one trailing dot. Bracketed IPv6 literals are returned without brackets.
///
/// Returns `None` when the authority is empty or has bytes no hostname can have, so hostile or
/// garbled values simply match no site.
pub fn normalise_authority(authority: &str) -> Option<String> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        let address: Ipv6Addr = inside.parse().ok()?;
        return Some(address.to_string());
    } else {
        match authority.rfind(':') {
            Some(colon) if is_port(&authority[colon + 1..]) => &authority[..colon],
            Some(_) => return None,
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty()
        || host.len() > MAX_HOSTNAME_LEN
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

fn is_port(digits: &str) -> bool {
    !digits.is_empty() && digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Folds a hostname into the form names are compared in: ASCII lower case, without one
/// trailing dot (`WWW.Example.COM.` → `www.example.com`). It validates nothing: callers that
/// take names from outside validate them ([`validate_hostname`]) or look them up and miss.
pub fn fold_hostname(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The parent a wildcard covering `host` names: `a.example.com` → `example.com`, so
/// `*.example.com` covers `a.example.com`. `host` is folded ([`fold_hostname`]).
///
/// This is the one wildcard rule (RFC 6125 §6.4.3): a wildcard stands for exactly one whole,
/// non-empty label, never for a label that is itself `*`, and never directly under a top-level
/// domain (no `*.com`; policies refuse such a wildcard too). So there is no parent for a host
/// whose first label is empty (`.example.com`) or `*`, nor for one with fewer than three
/// labels.
pub fn wildcard_parent(host: &str) -> Option<&str> {
    match host.split_once('.') {
        Some((label, parent))
            if !label.is_empty()
                && label != "*"
                && parent.contains('.')
                && !parent.starts_with('.') =>
        {
            Some(parent)
        }
        _ => None,
    }
}

/// The wildcard name that covers `host`, as a certificate SAN or an SDS secret names it:
/// `a.example.com` → `*.example.com` (see [`wildcard_parent`] for when there is none).
pub fn wildcard_name(host: &str) -> Option<String> {
    wildcard_parent(host).map(|parent| format!("*.{parent}"))
}

/// Whether the certificate name `san` (an exact name or a `*.parent` wildcard) covers `host`:
/// the same name, or a wildcard whose parent is [`wildcard_parent`] of `host`. Both are folded
/// ([`fold_hostname`]); what a certificate covers is decided here and nowhere else.
pub fn san_covers(san: &str, host: &str) -> bool {
    san == host
        || san
            .strip_prefix("*.")
            .is_some_and(|parent| wildcard_parent(host) == Some(parent))
}

/// Whether any of a certificate's names covers `host` ([`san_covers`]).
pub fn sans_cover<'a>(sans: impl IntoIterator<Item = &'a str>, host: &str) -> bool {
    sans.into_iter().any(|san| san_covers(san, host))
}
