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
    // One pass over the bytes accepts what the checks below accept; they run only to say
    // what is wrong with a name this pass refuses.
    let (wildcard, host) = match name.strip_prefix("*.") {
        Some(parent) => (true, parent),
        None => (false, name),
    };
    if let Some(dotted) = quick_hostname_check(host)
        && (dotted || !wildcard)
    {
        return Ok(wildcard);
    }
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

/// Whether `name` is a policy name already in its normal form (lower case, no trailing dot)
/// that [`check_lowered_policy_name`] accepts, and if so whether it is a `*.parent` wildcard;
/// `None` for any other name, which then needs the full checks (and their message). One pass
/// over the bytes: a compact snapshot's names are normally all like this.
pub(crate) fn normal_policy_name(name: &str) -> Option<bool> {
    let (wildcard, host) = match name.strip_prefix("*.") {
        Some(parent) => (true, parent),
        None => (false, name),
    };
    let dotted = scan_hostname(host, &LOWER_BYTE_CLASS)?;
    (dotted || !wildcard).then_some(wildcard)
}

/// Whether `name` passes [`validate_hostname`] (and whether it has a dot), in one pass over its
/// bytes; `None` when it does not.
fn quick_hostname_check(name: &str) -> Option<bool> {
    scan_hostname(name, &BYTE_CLASS)
}

/// [`quick_hostname_check`] with the byte classes given: [`LOWER_BYTE_CLASS`] also refuses
/// upper-case letters.
fn scan_hostname(name: &str, classes: &[u8; 256]) -> Option<bool> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_HOSTNAME_LEN {
        return None;
    }
    let (mut label, mut digits, mut dotted, mut last) = (0usize, true, false, DOT);
    for &b in bytes {
        let class = classes[usize::from(b)];
        match class {
            LETTER | DIGIT => {
                label += 1;
                digits &= class == DIGIT;
            }
            HYPHEN if label > 0 => {
                label += 1;
                digits = false;
            }
            DOT if label > 0 && last != HYPHEN => {
                (label, digits, dotted) = (0, true, true);
            }
            _ => return None,
        }
        if label > MAX_LABEL_LEN {
            return None;
        }
        last = class;
    }
    (label > 0 && last != HYPHEN && !digits).then_some(dotted)
}

/// What a byte is to a hostname: [`LETTER`], [`DIGIT`], [`HYPHEN`], [`DOT`], or 0 (not allowed).
const BYTE_CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = if c.is_ascii_alphabetic() {
            LETTER
        } else if c.is_ascii_digit() {
            DIGIT
        } else if c == b'-' {
            HYPHEN
        } else if c == b'.' {
            DOT
        } else {
            0
        };
        b += 1;
    }
    table
};
/// [`BYTE_CLASS`] without the upper-case letters.
const LOWER_BYTE_CLASS: [u8; 256] = {
    let mut table = BYTE_CLASS;
    let mut b = b'A';
    while b <= b'Z' {
        table[b as usize] = 0;
        b += 1;
    }
    table
};
const LETTER: u8 = 1;
const DIGIT: u8 = 2;
const HYPHEN: u8 = 3;
const DOT: u8 = 4;

/// Checks a lower-case hostname against the DNS rules: ASCII letters, digits and hyphens,
/// labels of 1 to 63 bytes not starting or ending with a hyphen, 253 bytes in all, and not an
/// IP address.
pub fn validate_hostname(name: &str) -> Result<(), String> {
    if quick_hostname_check(name).is_some() {
        return Ok(());
    }
    hostname_problem(name)
}

/// [`validate_hostname`] rule by rule, to say what is wrong.
fn hostname_problem(name: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass check accepts exactly what the rule-by-rule one does, over random names
    /// from the characters that matter (letters, digits, '-', '.', '*', upper case, non-ASCII)
    /// and around the length limits.
    #[test]
    fn quick_check_agrees_with_the_rules() {
        let alphabet: Vec<char> = "ab09-.-.*Zé".chars().collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut names: Vec<String> = vec![
            String::new(),
            "a".repeat(63),
            "a".repeat(64),
            format!("{}.{}", "a".repeat(63), "b".repeat(63)),
            vec!["a".repeat(63); 4].join("."),
            format!("{}.ab", vec!["a".repeat(62); 4].join(".")),
            "1.2.3.4".into(),
            "a.1".into(),
            "1.a".into(),
        ];
        for _ in 0..200_000 {
            let len = (next() % 12) as usize;
            names.push(
                (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect(),
            );
        }
        for name in &names {
            assert_eq!(
                quick_hostname_check(name).is_some(),
                hostname_problem(name).is_ok(),
                "{name:?}"
            );
            if let Some(dotted) = quick_hostname_check(name) {
                assert_eq!(dotted, name.contains('.'), "{name:?}");
            }
            // A normal name (as a compact snapshot carries it) is one the full check accepts
            // unchanged; anything else goes to the full check.
            for name in [name.clone(), format!("*.{name}")] {
                let normal = fold_hostname(&name) == name;
                let full = check_lowered_policy_name(&name).ok().filter(|_| normal);
                assert_eq!(normal_policy_name(&name), full, "{name:?}");
            }
        }
    }
}
