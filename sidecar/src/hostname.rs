//! Hostname validation and normalisation: lower case, no trailing dot, IDN as punycode A-labels.

use std::fmt;

use crate::error::{Error, Result};

/// The longest hostname DNS can carry in presentation form (RFC 1035 §2.3.4, minus the root dot).
const MAX_HOSTNAME_LEN: usize = 253;
/// The longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

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
        if input.starts_with("*.") || input.contains('*') {
            return Err(refuse(
                "wildcards need the DNS-01 challenge, which this platform does not use; add each subdomain instead",
            ));
        }
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() || trimmed.ends_with('.') {
            return Err(refuse("it ends with more than one dot"));
        }
        let ascii = if trimmed.is_ascii() {
            trimmed.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(trimmed).map_err(|_| {
                refuse("it is not a valid internationalised domain name (IDNA 2008 / UTS #46 rejected it)")
            })?
        };
        check_ascii_rules(&ascii).map_err(|reason| refuse(&reason))?;
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

fn check_ascii_rules(name: &str) -> std::result::Result<(), String> {
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(format!(
            "it is {} characters long; DNS allows at most {MAX_HOSTNAME_LEN}",
            name.len()
        ));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err(
            "it has a single label; certificates need a full domain name such as example.com"
                .into(),
        );
    }
    for label in &labels {
        if label.is_empty() {
            return Err("it has an empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "the label {label:?} is {} characters long; DNS allows at most {MAX_LABEL_LEN} per label",
                label.len()
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "the label {label:?} contains {bad:?}; only letters, digits and '-' are allowed"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "the label {label:?} starts or ends with '-', which DNS does not allow"
            ));
        }
    }
    let top = labels[labels.len() - 1];
    if top.chars().all(|c| c.is_ascii_digit()) {
        return Err(
            "it looks like an IP address; certificates here are issued for domain names only"
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
        assert!(reason(&format!("{}.com", "a".repeat(64))).contains("at most 63"));
        let long = format!("{}.com", ["abcdefghi"; 26].join("."));
        assert!(reason(&long).contains("at most 253"));
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
