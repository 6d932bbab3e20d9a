//! The one `${NAME}` template renderer: the harnesses render `envoy/*.yaml`, the test fixtures
//! and nginx's configuration with it, and `make` and the docs with its command line,
//! `autohttps-render` ([`render_command_line`]).
//!
//! A placeholder is `${` + upper-case letters, digits and `_` + `}`; anything else (`${x}`, a
//! lone `${`) is left as written. A placeholder without a value is an error naming it.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};

/// Replaces every `${NAME}` in `template`; fails naming any placeholder left without a value.
/// Values no placeholder uses are allowed (one `.env` file serves several templates).
pub fn render(template: &str, values: &HashMap<&str, String>) -> anyhow::Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut missing = BTreeSet::new();
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = &after[..end];
        let is_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        match values.get(name) {
            Some(value) if is_name => out.push_str(value),
            _ if is_name => {
                missing.insert(name.to_string());
            }
            _ => out.push_str(&rest[start..start + 3 + end]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if !missing.is_empty() {
        bail!(
            "no value for {}",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(out)
}

/// [`render`], and also fails when a value has no placeholder: for a harness that renders
/// one fixture with exactly its values, so that a renamed placeholder cannot go unnoticed.
pub fn render_exact(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let unused: Vec<&str> = values
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !template.contains(&format!("${{{name}}}")))
        .collect();
    if !unused.is_empty() {
        bail!("no placeholder for {} in the template", unused.join(", "));
    }
    render(template, &values.iter().cloned().collect())
}

/// Renders `envoy/<name>` with these values.
pub fn render_file(name: &str, values: &HashMap<&str, String>) -> anyhow::Result<String> {
    let path = crate::repo_root().join("envoy").join(name);
    let template =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    render(&template, values).with_context(|| format!("rendering {}", path.display()))
}

/// `TRUSTED_PROXY_RANGES` for `envoy/edge.yaml` and `tests/conformance/envoy.yaml`: the
/// trusted-proxy list (the sidecar's `edge.trusted_proxies`, the policy's
/// `settings.trusted_proxies`: CIDRs or bare addresses) as Envoy `CidrRange`s, so Envoy's
/// filter-chain choice and the filter's trust come from one list. An empty list becomes
/// `0.0.0.0/32`, an address no TCP peer has: an empty `direct_source_prefix_ranges` would
/// match every peer.
pub fn trusted_proxy_ranges<S: AsRef<str>>(proxies: &[S]) -> anyhow::Result<String> {
    let mut ranges = Vec::with_capacity(proxies.len().max(1));
    for raw in proxies {
        let cidr = autohttps_filter::policy::Cidr::parse(raw.as_ref().trim())
            .map_err(|message| anyhow!("trusted proxy {message}"))?;
        ranges.push(format!(
            r#"{{address_prefix: "{}", prefix_len: {}}}"#,
            cidr.network(),
            cidr.prefix_len()
        ));
    }
    if ranges.is_empty() {
        ranges.push(r#"{address_prefix: "0.0.0.0", prefix_len: 32}"#.to_string());
    }
    Ok(format!("[{}]", ranges.join(", ")))
}

/// The trusted proxies a sidecar configuration file gives Envoy: its `edge.trusted_proxies`,
/// or `override_list` (the value of `AUTOHTTPS_EDGE_TRUSTED_PROXIES`, which wins in the sidecar
/// too: a TOML array, or a comma-separated list).
pub fn trusted_proxies_of(
    sidecar_config: &Path,
    override_list: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    if let Some(list) = override_list {
        if list.trim_start().starts_with('[') {
            let value: toml::Table = toml::from_str(&format!("value = {list}")).map_err(|_| {
                anyhow!(
                    "AUTOHTTPS_EDGE_TRUSTED_PROXIES={list:?} starts with '[' but is not a TOML \
                     array (expected e.g. [\"10.0.0.0/8\"] or 10.0.0.0/8, ::1)"
                )
            })?;
            return strings(&value["value"], "AUTOHTTPS_EDGE_TRUSTED_PROXIES");
        }
        return Ok(list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect());
    }
    let text = std::fs::read_to_string(sidecar_config)
        .with_context(|| format!("reading {}", sidecar_config.display()))?;
    let config: toml::Table = toml::from_str(&text)
        .with_context(|| format!("{} is not valid TOML", sidecar_config.display()))?;
    match config
        .get("edge")
        .and_then(|edge| edge.get("trusted_proxies"))
    {
        None => Ok(Vec::new()),
        Some(list) => strings(
            list,
            &format!("{}: edge.trusted_proxies", sidecar_config.display()),
        ),
    }
}

fn strings(value: &toml::Value, what: &str) -> anyhow::Result<Vec<String>> {
    let list = value
        .as_array()
        .ok_or_else(|| anyhow!("{what} is not a list (expected e.g. [\"10.0.0.0/8\"])"))?;
    list.iter()
        .map(|item| {
            item.as_str().map(str::to_string).ok_or_else(|| {
                anyhow!("{what}: {item} is not an IP address or CIDR (expected e.g. 10.0.0.0/8 or ::1/128)")
            })
        })
        .collect()
}

/// `autohttps-render TEMPLATE [VARS.env …] [autohttps.toml] [NAME=VALUE …]`: the rendered
/// template. Later values win. A sidecar configuration (`.toml`) sets `TRUSTED_PROXY_RANGES`
/// from its trusted proxies ([`trusted_proxies_of`], `trusted_proxies_env` being
/// `AUTOHTTPS_EDGE_TRUSTED_PROXIES`); giving `TRUSTED_PROXY_RANGES` as well is refused.
pub fn render_command_line(
    args: &[String],
    trusted_proxies_env: Option<&str>,
) -> anyhow::Result<String> {
    let Some((template_path, rest)) = args.split_first() else {
        bail!(
            "usage: autohttps-render TEMPLATE [VARS.env ...] [autohttps.toml] [NAME=VALUE ...] > rendered.yaml"
        );
    };
    let template = std::fs::read_to_string(template_path)
        .with_context(|| format!("reading {template_path}"))?;
    let mut values: HashMap<String, String> = HashMap::new();
    let mut sidecar_config = None;
    for arg in rest {
        if arg.ends_with(".toml") {
            sidecar_config = Some(arg);
        } else if let Some((name, value)) = arg.split_once('=').filter(|_| !arg.ends_with(".env")) {
            values.insert(name.to_string(), value.to_string());
        } else {
            let text = std::fs::read_to_string(arg).with_context(|| format!("reading {arg}"))?;
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (name, value) = line
                    .split_once('=')
                    .ok_or_else(|| anyhow!("{arg}:{}: {line:?} is not NAME=VALUE", number + 1))?;
                values.insert(name.to_string(), value.to_string());
            }
        }
    }
    if let Some(config) = sidecar_config {
        if values.contains_key("TRUSTED_PROXY_RANGES") {
            bail!(
                "TRUSTED_PROXY_RANGES is set and {config} is given: keep the trusted proxies in \
                 one place, the sidecar's edge.trusted_proxies"
            );
        }
        let proxies = trusted_proxies_of(Path::new(config), trusted_proxies_env)?;
        let ranges = trusted_proxy_ranges(&proxies).with_context(|| {
            format!("{config}: edge.trusted_proxies (expected e.g. 10.0.0.0/8 or ::1/128)")
        })?;
        values.insert("TRUSTED_PROXY_RANGES".into(), ranges);
    }
    let values = values
        .iter()
        .map(|(name, value)| (name.as_str(), value.clone()))
        .collect();
    render(&template, &values)
        .map_err(|error| anyhow!("{template_path}: {error}; pass NAME=VALUE or a .env file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        pairs.iter().map(|(n, v)| (*n, v.to_string())).collect()
    }

    #[test]
    fn placeholders_are_replaced_and_others_left() {
        let out = render(
            "a ${A} b ${lower} c ${A_2} ${ d",
            &values(&[("A", "1"), ("A_2", "2"), ("UNUSED", "x")]),
        )
        .expect("renders");
        assert_eq!(out, "a 1 b ${lower} c 2 ${ d");
    }

    #[test]
    fn every_missing_placeholder_is_named_once() {
        let error = render("${B} ${A} ${B}", &values(&[])).expect_err("missing");
        assert_eq!(error.to_string(), "no value for A, B");
    }

    #[test]
    fn exact_rendering_refuses_an_unused_value() {
        let error =
            render_exact("${A}", &[("A", "1".into()), ("GONE", "2".into())]).expect_err("unused");
        assert!(error.to_string().contains("GONE"), "{error}");
    }

    #[test]
    fn trusted_proxy_ranges_follow_the_policy_list() {
        assert_eq!(
            trusted_proxy_ranges(&["10.0.0.0/8", "127.0.0.5", "::1"]).expect("valid"),
            r#"[{address_prefix: "10.0.0.0", prefix_len: 8}, {address_prefix: "127.0.0.5", prefix_len: 32}, {address_prefix: "::1", prefix_len: 128}]"#
        );
    }

    #[test]
    fn no_trusted_proxy_matches_no_peer() {
        let none: [&str; 0] = [];
        assert_eq!(
            trusted_proxy_ranges(&none).expect("valid"),
            r#"[{address_prefix: "0.0.0.0", prefix_len: 32}]"#
        );
    }

    #[test]
    fn a_bad_trusted_proxy_is_named() {
        let error = trusted_proxy_ranges(&["proxy.local"]).expect_err("not an address");
        assert!(error.to_string().contains("proxy.local"), "{error}");
    }

    #[test]
    fn the_command_line_reads_env_files_toml_and_pairs() {
        let dir = tempfile::tempdir().expect("dir");
        let template = dir.path().join("t.yaml");
        std::fs::write(&template, "${A} ${B} ${TRUSTED_PROXY_RANGES}").expect("write");
        let env = dir.path().join("v.env");
        std::fs::write(&env, "# comment\nA=from-file\nB=file\n").expect("write");
        let toml = dir.path().join("autohttps.toml");
        std::fs::write(&toml, "[edge]\ntrusted_proxies = [\"10.0.0.0/8\"]\n").expect("write");
        let args: Vec<String> = [&template, &env, &toml]
            .iter()
            .map(|p| p.display().to_string())
            .chain(["B=pair".to_string()])
            .collect();
        assert_eq!(
            render_command_line(&args, None).expect("renders"),
            r#"from-file pair [{address_prefix: "10.0.0.0", prefix_len: 8}]"#
        );
        // The sidecar's environment override wins over the file, as in the sidecar.
        assert_eq!(
            render_command_line(&args, Some("127.0.0.1, ::1")).expect("renders"),
            r#"from-file pair [{address_prefix: "127.0.0.1", prefix_len: 32}, {address_prefix: "::1", prefix_len: 128}]"#
        );
        let mut twice = args.clone();
        twice.push("TRUSTED_PROXY_RANGES=[]".into());
        let error = render_command_line(&twice, None).expect_err("two sources");
        assert!(error.to_string().contains("one place"), "{error}");
        let error = render_command_line(&args[..1], None).expect_err("no values");
        assert!(
            error
                .to_string()
                .contains("no value for A, B, TRUSTED_PROXY_RANGES"),
            "{error}"
        );
    }
}
