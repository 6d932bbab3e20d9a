//! The hostnames a site is made of: a name must pass the policy engine's one hostname rule
//! ([`validate_hostname`], the rule the filter applies at the edge) and, on top of it, the
//! [`check_issuable`] rule: what an ACME CA issues an HTTP-01 certificate for. Input is
//! normalised first: lower case, no trailing dot, IDN as punycode A-labels.

use std::fmt;

use autohttps_filter::policy::{fold_hostname, validate_hostname};

use crate::error::{Error, Result};

/// A validated, normalised DNS hostname that a certificate can name (RFC 5280 §4.2.1.6 dNSName).
///
/// Always lower-case ASCII, without a trailing dot; internationalised names are stored as their
/// punycode A-labels (RFC 5891 §4.4), exactly as they appear in the certificate.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct Hostname(String);

impl TryFrom<String> for Hostname {
    type Error = crate::Error;

    /// Validates and normalises, as [`Hostname::parse`].
    fn try_from(input: String) -> Result<Self> {
        Hostname::parse(&input)
    }
}

impl From<Hostname> for String {
    fn from(name: Hostname) -> String {
        name.0
    }
}

impl Hostname {
    /// Validates and normalises `input`, saying precisely what is wrong when it is refused.
    pub fn parse(input: &str) -> Result<Self> {
        let refuse = |reason: &str| Error::InvalidHostname {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        if input.is_empty() {
            return Err(refuse("it is empty; give a name such as www.example.com"));
        }
        if input.chars().any(char::is_whitespace) {
            return Err(refuse("it contains whitespace; remove the spaces"));
        }
        if input.contains("://") || input.contains('/') {
            return Err(refuse(
                "it looks like a URL; give only the hostname, e.g. www.example.com",
            ));
        }
        if input.contains(':') {
            return Err(refuse(
                "it contains ':'; give the hostname without a port (and IP addresses are not accepted)",
            ));
        }
        if input.contains('*') {
            return Err(refuse(WILDCARD_REFUSAL));
        }
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() || trimmed.ends_with('.') {
            return Err(refuse("it ends with more than one dot"));
        }
        let ascii = if trimmed.is_ascii() {
            fold_hostname(trimmed)
        } else {
            idna::domain_to_ascii(trimmed).map_err(|_| {
                refuse("it is not a valid internationalised domain name (IDNA 2008 / UTS #46 rejected it)")
            })?
        };
        validate_hostname(&ascii).map_err(|reason| refuse(&reason))?;
        check_issuable(&ascii).map_err(|reason| refuse(&reason))?;
        if ascii.split('.').any(|label| label.starts_with("xn--")) {
            let (_, result) = idna::domain_to_unicode(&ascii);
            if result.is_err() {
                return Err(refuse("a label starting with xn-- is not valid punycode"));
            }
        }
        Ok(Self(ascii))
    }

    /// The normalised name (lower-case ASCII, A-labels, no trailing dot).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this name is `parent` itself or lies below it (`a.b.example.com` under `example.com`).
    pub fn is_at_or_below(&self, parent: &Hostname) -> bool {
        self.0 == parent.0
            || (self.0.len() > parent.0.len()
                && self.0.ends_with(parent.as_str())
                && self.0.as_bytes()[self.0.len() - parent.0.len() - 1] == b'.')
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a wildcard is refused: the certificate of a wildcard name needs the DNS-01 challenge.
const WILDCARD_REFUSAL: &str = "wildcards need the DNS-01 challenge, which this platform does not use; add each subdomain instead";

/// The issuable rule, on top of the engine's hostname rule: a name an ACME CA issues an HTTP-01
/// certificate for has at least two labels (no CA issues for `localhost` or a bare top-level
/// domain) and is not a wildcard. `name` is normalised and has passed [`validate_hostname`].
pub fn check_issuable(name: &str) -> std::result::Result<(), String> {
    if name.contains('*') {
        return Err(WILDCARD_REFUSAL.into());
    }
    if !name.contains('.') {
        return Err(
            "it has a single label, and a CA issues certificates only for full domain names; give one such as example.com"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(input: &str) -> String {
        match Hostname::parse(input) {
            Err(Error::InvalidHostname { reason, .. }) => reason,
            other => panic!("expected a refusal for {input:?}, got {other:?}"),
        }
    }

    #[test]
    fn lower_cases_and_drops_trailing_dot() {
        assert_eq!(
            Hostname::parse("WWW.Example.COM.").unwrap().as_str(),
            "www.example.com"
        );
    }

    #[test]
    fn idn_becomes_punycode_a_labels() {
        assert_eq!(
            Hostname::parse("Bücher.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            Hostname::parse("xn--bcher-kva.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        assert!(reason("").contains("empty"));
        assert!(reason("exa mple.com").contains("whitespace"));
        assert!(reason("https://example.com").contains("URL"));
        assert!(reason("example.com:443").contains("port"));
        assert!(reason("*.example.com").contains("wildcard"));
        assert!(reason("localhost").contains("single label"));
        assert!(reason("a..example.com").contains("empty label"));
        assert!(reason("-a.example.com").contains("'-'"));
        assert!(reason("a_b.example.com").contains("'_'"));
        assert!(reason("10.0.0.1").contains("IP address"));
        assert!(reason(&format!("{}.com", "a".repeat(64))).contains("the limit is 63"));
        let long = format!("{}.com", ["abcdefghi"; 26].join("."));
        assert!(reason(&long).contains("the limit is 253"));
    }

    /// The syntax rule is the engine's, which the filter applies too; a single-label name
    /// passes it (a policy may list `localhost`) and is refused only by the named issuable rule.
    #[test]
    fn single_labels_pass_the_engine_rule_but_are_not_issuable() {
        assert_eq!(validate_hostname("localhost"), Ok(()));
        let refusal = check_issuable("localhost").expect_err("not issuable");
        assert!(refusal.contains("single label"), "{refusal}");
        assert_eq!(reason("localhost"), refusal);
        assert_eq!(check_issuable("shop.example.com"), Ok(()));
        assert!(reason("*.example.com").contains("DNS-01"));
        // The engine's wording for what both sides refuse.
        assert_eq!(
            reason("a_b.example.com"),
            validate_hostname("a_b.example.com").expect_err("refused")
        );
    }

    #[test]
    fn subdomain_relation_needs_a_dot_boundary() {
        let parent = Hostname::parse("example.com").unwrap();
        assert!(
            Hostname::parse("a.example.com")
                .unwrap()
                .is_at_or_below(&parent)
        );
        assert!(
            Hostname::parse("example.com")
                .unwrap()
                .is_at_or_below(&parent)
        );
        assert!(
            !Hostname::parse("badexample.com")
                .unwrap()
                .is_at_or_below(&parent)
        );
    }
}
