//! The inputs every subcommand shares: a policy file (a document, or a plugin configuration
//! that carries one) and a request URL.

use std::path::Path;

use anyhow::{Context as _, bail};
use autohttps_filter::policy::{CompiledPluginConfig, Policy, Problem};

/// A policy file as read: its bytes, and whether it is a plugin configuration.
#[derive(Debug)]
pub(crate) struct PolicyFile {
    bytes: Vec<u8>,
    plugin_configuration: bool,
}

impl PolicyFile {
    /// Reads `path`. A JSON object with a `policy` or `feed` key and no `schema` key is a
    /// plugin configuration; anything else is taken as a policy document.
    pub(crate) fn read(path: &Path) -> anyhow::Result<PolicyFile> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the policy file {}", path.display()))?;
        let plugin_configuration = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|value| {
                let object = value.as_object()?;
                Some(
                    !object.contains_key("schema")
                        && (object.contains_key("policy") || object.contains_key("feed")),
                )
            })
            .unwrap_or(false);
        Ok(PolicyFile {
            bytes,
            plugin_configuration,
        })
    }

    /// The plugin configuration Envoy would hand the filter for this file.
    pub(crate) fn plugin_configuration(&self) -> Vec<u8> {
        if self.plugin_configuration {
            return self.bytes.clone();
        }
        let mut wrapped = Vec::with_capacity(self.bytes.len() + 12);
        wrapped.extend_from_slice(b"{\"policy\": ");
        wrapped.extend_from_slice(&self.bytes);
        wrapped.extend_from_slice(b"}");
        wrapped
    }

    /// Compiles the policy with the filter's own rules. `Ok(None)`: a plugin configuration with
    /// no inline policy (feed only). `Err`: every problem, each with its JSON path from the
    /// file's root.
    pub(crate) fn compile(&self) -> Result<Option<Policy>, Vec<Problem>> {
        if !self.plugin_configuration {
            return Policy::from_json(&self.bytes)
                .map(Some)
                .map_err(|e| e.problems().to_vec());
        }
        let config = CompiledPluginConfig::from_json(&self.bytes).map_err(|e| {
            vec![Problem {
                path: "$".into(),
                message: format!("not a valid plugin configuration: {e}"),
            }]
        })?;
        match config.policy {
            None => Ok(None),
            Some(Ok(policy)) => Ok(Some(policy)),
            Some(Err(error)) => Err(error
                .problems()
                .iter()
                .map(|problem| Problem {
                    path: if problem.path == "$" {
                        "policy".into()
                    } else {
                        format!("policy.{}", problem.path)
                    },
                    message: problem.message.clone(),
                })
                .collect()),
        }
    }

    /// The compiled policy, or an error listing every problem (for `test` and `explain`,
    /// which need a valid one).
    pub(crate) fn valid_policy(&self, path: &Path) -> anyhow::Result<Policy> {
        match self.compile() {
            Ok(Some(policy)) => Ok(policy),
            Ok(None) => bail!(
                "{} has no inline policy (a feed only): give it a policy document",
                path.display()
            ),
            Err(problems) => {
                let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
                bail!(
                    "{} is not a valid policy (run `autohttps-policy check` on it):\n{}",
                    path.display(),
                    list.join("\n")
                )
            }
        }
    }
}

/// Request URLs are read as the filter's own engine reads them.
pub(crate) use autohttps_filter::policy::RequestUrl;

/// Splits `NAME:VALUE` (the value trimmed of surrounding spaces).
pub(crate) fn parse_header(raw: &str) -> anyhow::Result<(String, String)> {
    let Some((name, value)) = raw.split_once(':') else {
        bail!("header {raw:?} is not NAME:VALUE");
    };
    let name = name.trim();
    if name.is_empty() {
        bail!("header {raw:?} has no name: write it as NAME:VALUE");
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_keeps_raw_path_and_query() {
        let url = RequestUrl::parse("HTTP://Shop.Test:8080/a%2Fb?x=%20").expect("url");
        assert_eq!(url.https, Some(false));
        assert_eq!(url.authority, "Shop.Test:8080");
        assert_eq!(url.path, "/a%2Fb?x=%20");
    }

    #[test]
    fn url_without_scheme_or_path() {
        let url = RequestUrl::parse("shop.test?q").expect("url");
        assert_eq!((url.https, url.path.as_str()), (None, "/?q"));
        assert!(RequestUrl::parse("ftp://shop.test/").is_err());
        assert!(RequestUrl::parse("https:///x").is_err());
    }

    #[test]
    fn header_needs_a_name_and_a_colon() {
        assert_eq!(
            parse_header("X-Forwarded-Proto: https").expect("header"),
            ("x-forwarded-proto".into(), "https".into())
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header(":v").is_err());
    }
}
