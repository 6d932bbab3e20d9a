//! Policy JSON compiled while it is parsed: each site is checked and added to the lookup
//! tables as soon as it is read, then dropped, so a 100,000-site policy never exists as a whole
//! [`super::PolicyDocument`] in the VM's memory (which never shrinks). Accepts exactly what the
//! derived `Deserialize` of `PolicyDocument` and `PluginConfig` accept, with the same error
//! texts (the array form included).

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::Error;

use super::compile::{Compiler, Policy};
#[cfg(test)]
use super::schema::PolicyDocument;
use super::schema::{FeedConfig, Settings, SiteEntry};

const POLICY_FIELDS: &[&str] = &["schema", "version", "settings", "sites"];
const PLUGIN_FIELDS: &[&str] = &["policy", "feed"];

/// A plugin configuration with its policy already compiled.
#[derive(Debug)]
pub struct CompiledPluginConfig {
    /// The inline policy, when there is one: compiled, or every problem found in it.
    pub policy: Option<Result<Policy, Error>>,
    /// Where to poll for newer policies.
    pub feed: Option<FeedConfig>,
}

impl CompiledPluginConfig {
    /// Parses a plugin configuration (`{"policy": …, "feed": …}`), compiling the policy as it
    /// is read. A JSON or shape error is the `Err`; validation problems of the policy are in
    /// [`CompiledPluginConfig::policy`].
    pub fn from_json(json: &[u8]) -> Result<CompiledPluginConfig, serde_json::Error> {
        serde_json::from_slice(json)
    }
}

/// Parses and compiles policy JSON (see [`Policy::from_json`]).
pub(crate) fn compile_json(json: &[u8]) -> Result<Result<Policy, Error>, serde_json::Error> {
    serde_json::from_slice::<Streamed>(json).map(|streamed| streamed.0)
}

/// A policy compiled while deserializing.
struct Streamed(Result<Policy, Error>);

impl<'de> Deserialize<'de> for Streamed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_struct("PolicyDocument", POLICY_FIELDS, PolicyVisitor)
            .map(Streamed)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum PolicyField {
    Schema,
    Version,
    Settings,
    Sites,
}

struct PolicyVisitor;

impl<'de> Visitor<'de> for PolicyVisitor {
    type Value = Result<Policy, Error>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct PolicyDocument")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut schema: Option<u32> = None;
        let mut version: Option<String> = None;
        let mut settings: Option<Settings> = None;
        let mut sites_seen = false;
        let mut compiler = Compiler::default();
        while let Some(field) = map.next_key::<PolicyField>()? {
            match field {
                PolicyField::Schema => {
                    if schema.is_some() {
                        return Err(de::Error::duplicate_field("schema"));
                    }
                    schema = Some(map.next_value()?);
                }
                PolicyField::Version => {
                    if version.is_some() {
                        return Err(de::Error::duplicate_field("version"));
                    }
                    version = Some(map.next_value()?);
                }
                PolicyField::Settings => {
                    if settings.is_some() {
                        return Err(de::Error::duplicate_field("settings"));
                    }
                    settings = Some(map.next_value()?);
                }
                PolicyField::Sites => {
                    if sites_seen {
                        return Err(de::Error::duplicate_field("sites"));
                    }
                    sites_seen = true;
                    map.next_value_seed(SitesSeed(&mut compiler))?;
                }
            }
        }
        let schema = schema.ok_or_else(|| de::Error::missing_field("schema"))?;
        let version = version.ok_or_else(|| de::Error::missing_field("version"))?;
        Ok(compiler.finish(schema, &version, &settings.unwrap_or_default()))
    }

    /// The array form serde also accepts for structs (`[schema, version, settings, sites]`,
    /// the last two optional), compiled as it is read like the object form.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        const EXPECTED: &str = "struct PolicyDocument with 4 elements";
        let schema: u32 = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &EXPECTED))?;
        let version: String = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &EXPECTED))?;
        let settings: Settings = seq.next_element()?.unwrap_or_default();
        let mut compiler = Compiler::default();
        seq.next_element_seed(SitesSeed(&mut compiler))?;
        Ok(compiler.finish(schema, &version, &settings))
    }
}

/// The `sites` array, each element compiled and dropped as soon as it is read.
struct SitesSeed<'c>(&'c mut Compiler);

impl<'de> DeserializeSeed<'de> for SitesSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for SitesSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(sites) = seq.size_hint() {
            self.0.reserve(sites);
        }
        while let Some(site) = seq.next_element::<SiteEntry<'de>>()? {
            self.0.add_site(&site);
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum PluginField {
    Policy,
    Feed,
}

impl<'de> Deserialize<'de> for CompiledPluginConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_struct("PluginConfig", PLUGIN_FIELDS, PluginVisitor)
    }
}

struct PluginVisitor;

impl<'de> Visitor<'de> for PluginVisitor {
    type Value = CompiledPluginConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct PluginConfig")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut policy: Option<Option<Result<Policy, Error>>> = None;
        let mut feed: Option<Option<FeedConfig>> = None;
        while let Some(field) = map.next_key::<PluginField>()? {
            match field {
                PluginField::Policy => {
                    if policy.is_some() {
                        return Err(de::Error::duplicate_field("policy"));
                    }
                    policy = Some(map.next_value::<Option<Streamed>>()?.map(|s| s.0));
                }
                PluginField::Feed => {
                    if feed.is_some() {
                        return Err(de::Error::duplicate_field("feed"));
                    }
                    feed = Some(map.next_value()?);
                }
            }
        }
        Ok(CompiledPluginConfig {
            policy: policy.flatten(),
            feed: feed.flatten(),
        })
    }

    /// The array form: `[policy, feed]`, both optional.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let policy = seq.next_element::<Option<Streamed>>()?.flatten();
        let feed = seq.next_element::<Option<FeedConfig>>()?.flatten();
        Ok(CompiledPluginConfig {
            policy: policy.map(|s| s.0),
            feed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed path reports exactly what parsing the whole document and compiling it does.
    #[test]
    fn streamed_compile_matches_document_compile() {
        let cases = [
            r#"{"schema":1,"version":"v","sites":[{"id":"a","hostnames":["a.com","*.a.com"],"cert_ready":["a.com","*.a.com"]}]}"#,
            r#"{"sites":[{"id":"a","hostnames":["a.com"]}],"version":"","schema":2,"settings":{"http_port":0}}"#,
            r#"{"schema":1,"version":"v","sites":[{"id":"a","hostnames":["a.com","A.com.","bad host"],"cert_ready":["b.com","a.com","*.a.com","x y"]},{"id":"a","hostnames":["a.com","*.a.com"],"cert_ready":["*.a.com"],"canonical_host":"a.com"},{"id":"b","hostnames":[],"canonical_host":"*.b.com"}]}"#,
            r#"{"schema":1,"version":"v","sites":[{"id":"c","hostnames":["*.c.com","c.com"],"canonical_host":"www.c.com","hsts":{"enabled":true,"max_age":60,"preload":true}}]}"#,
        ];
        for json in cases {
            let document: PolicyDocument = serde_json::from_str(json).expect("a document");
            let whole = Policy::compile(&document).map_err(|e| e.problems().to_vec());
            let streamed = Policy::from_json(json.as_bytes()).map_err(|e| e.problems().to_vec());
            match (whole, streamed) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.version(), b.version());
                    assert_eq!(a.contents(), b.contents(), "{json}");
                }
                (Err(a), Err(b)) => assert_eq!(a, b, "{json}"),
                (a, b) => panic!("{json}: whole {a:?} but streamed {b:?}"),
            }
        }
    }

    /// Shape errors read the same as the derived `Deserialize` impls'.
    #[test]
    fn streamed_errors_match_derived_errors() {
        let policies = [
            r#"{"schema":1}"#,
            r#"{"version":"v"}"#,
            r#"{"schema":1,"version":"v","colour":1}"#,
            r#"{"schema":1,"schema":1,"version":"v"}"#,
            r#"{"schema":1,"version":"v","sites":{}}"#,
            r#"{"schema":1,"version":"v","sites":[{"id":"a"}]}"#,
            r#"[1,"v"]"#,
            r#"{"schema":1,"#,
        ];
        for json in policies {
            let derived = serde_json::from_str::<PolicyDocument>(json)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let streamed = compile_json(json.as_bytes())
                .map(|_| ())
                .map_err(|e| e.to_string());
            assert_eq!(derived, streamed, "{json}");
        }
        let configs = [
            r#"{"polcy":{}}"#,
            r#"{"policy":null,"feed":null}"#,
            r#"{"policy":{"schema":1,"version":"v"},"policy":{}}"#,
            r#"{"policy":{"schema":1,"version":"v"},"feed":{"cluster":1}}"#,
            r#"{"policy": "#,
        ];
        for json in configs {
            let derived = serde_json::from_str::<super::super::schema::PluginConfig>(json)
                .map(|c| (c.policy.is_some(), c.feed.is_some()))
                .map_err(|e| e.to_string());
            let streamed = CompiledPluginConfig::from_json(json.as_bytes())
                .map(|c| (c.policy.is_some(), c.feed.is_some()))
                .map_err(|e| e.to_string());
            assert_eq!(derived, streamed, "{json}");
        }
    }
}
