//! The compact snapshot: a whole policy in a length-prefixed binary form that the filter reads
//! without a JSON parser and in slices (see [`SnapshotBuild`]), so a 100,000-site snapshot
//! neither costs a JSON parse per VM nor holds up a worker's traffic for its whole length.
//!
//! The feed sends it when the filter asks for [`CONTENT_TYPE`] in `Accept`. It carries exactly
//! what a [`super::PolicyDocument`] does, and every site goes through the same validation as
//! a JSON one: another control plane may produce it, so nothing it says is trusted.
//!
//! Layout (integers little-endian; `str8`/`str16` are a `u8`/`u16` byte length then UTF-8):
//!
//! ```text
//! "AHPS" 0x01                      magic and format
//! u32 schema, str8 version, u16 http_port, u16 https_port
//! u16 n, n × str8                  settings.trusted_proxies
//! u32 sites, u32 names             site count; hostnames in all sites (for the tables' size)
//! per site:
//!   str8 id
//!   u8 flags                       bits 0-1 https (0 auto, 1 force, 2 disable), bit 2
//!                                  temporary redirects, bits 3-4 mixed_content (0 off,
//!                                  1 upgrade, 2 report), bit 5 hsts.enabled, bit 6
//!                                  hsts.include_subdomains, bit 7 hsts.preload
//!   u64 hsts.max_age
//!   str8 canonical_host, str16 report_uri, str8 report_token   (empty = absent)
//!   u16 n, n × (u8 cert_ready 0|1, str8 hostname)
//! ```
//!
//! The body ends after the last site; the counts must match what follows.

use std::borrow::Cow;

use crate::Error;

use super::compile::{Compiler, Policy, Problem};
use super::schema::{
    HstsSpec, HttpsMode, MixedContent, RedirectKind, SCHEMA_VERSION, Settings, SiteEntry, SiteSpec,
    Text,
};

/// The media type of a compact snapshot (`Accept` and `Content-Type`).
pub const CONTENT_TYPE: &str = "application/vnd.autohttps.policy-snapshot";

const MAGIC: &[u8; 5] = b"AHPS\x01";

/// Fewest bytes a site takes, and a hostname: a count larger than the rest of the body can
/// hold is refused before anything is reserved for it.
const MIN_SITE_BYTES: usize = 16;
const MIN_NAME_BYTES: usize = 2;

/// Writes a compact snapshot one site at a time (so a feed never holds every site decoded).
/// Fails (naming the site and field) only on an entry the format cannot carry: a string too
/// long for its length prefix, a `cert_ready` name that is not one of the site's hostnames, or
/// an optional string present but empty; every entry that passes the filter's validation can
/// be carried.
#[derive(Debug)]
pub struct SnapshotEncoder {
    out: Vec<u8>,
    counts_at: usize,
    sites: u32,
    names: u32,
}

impl SnapshotEncoder {
    /// Starts a snapshot of `version` with `settings`; `capacity` is a guess of its size.
    pub fn new(version: &str, settings: &Settings, capacity: usize) -> Result<Self, String> {
        let mut out = Vec::with_capacity(capacity.max(64));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
        str8(&mut out, version, "version")?;
        out.extend_from_slice(&settings.http_port.to_le_bytes());
        out.extend_from_slice(&settings.https_port.to_le_bytes());
        let proxies = u16::try_from(settings.trusted_proxies.len())
            .map_err(|_| "settings.trusted_proxies lists more than 65535 entries".to_string())?;
        out.extend_from_slice(&proxies.to_le_bytes());
        for proxy in &settings.trusted_proxies {
            str8(&mut out, proxy, "settings.trusted_proxies")?;
        }
        let counts_at = out.len();
        out.extend_from_slice(&[0; 8]);
        Ok(SnapshotEncoder {
            out,
            counts_at,
            sites: 0,
            names: 0,
        })
    }

    /// Adds a site (nothing is written when it cannot be carried).
    pub fn push(&mut self, site: &SiteSpec) -> Result<(), String> {
        let sites = self.sites.checked_add(1).ok_or("more than 2^32 sites")?;
        let names = u32::try_from(site.hostnames.len())
            .ok()
            .and_then(|n| self.names.checked_add(n))
            .ok_or("more than 2^32 hostnames")?;
        let len = self.out.len();
        if let Err(e) = encode_site(&mut self.out, site) {
            self.out.truncate(len);
            return Err(format!("site {:?}: {e}", site.id));
        }
        (self.sites, self.names) = (sites, names);
        Ok(())
    }

    /// The snapshot's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let at = self.counts_at;
        self.out[at..at + 4].copy_from_slice(&self.sites.to_le_bytes());
        self.out[at + 4..at + 8].copy_from_slice(&self.names.to_le_bytes());
        self.out
    }
}

/// Encodes a whole snapshot (see [`SnapshotEncoder`]).
pub fn encode_snapshot<'s>(
    version: &str,
    settings: &Settings,
    sites: impl IntoIterator<Item = &'s SiteSpec>,
) -> Result<Vec<u8>, String> {
    let mut encoder = SnapshotEncoder::new(version, settings, 1024)?;
    for site in sites {
        encoder.push(site)?;
    }
    Ok(encoder.finish())
}

fn encode_site(out: &mut Vec<u8>, site: &SiteSpec) -> Result<(), String> {
    str8(out, &site.id, "id")?;
    let mut flags = match site.https {
        HttpsMode::Auto => 0,
        HttpsMode::Force => 1,
        HttpsMode::Disable => 2,
    };
    if site.redirect == RedirectKind::Temporary {
        flags |= 1 << 2;
    }
    flags |= match site.mixed_content {
        MixedContent::Off => 0,
        MixedContent::Upgrade => 1 << 3,
        MixedContent::Report => 2 << 3,
    };
    for (set, bit) in [
        (site.hsts.enabled, 5),
        (site.hsts.include_subdomains, 6),
        (site.hsts.preload, 7),
    ] {
        if set {
            flags |= 1 << bit;
        }
    }
    out.push(flags);
    out.extend_from_slice(&site.hsts.max_age.to_le_bytes());
    optional(out, site.canonical_host.as_deref(), "canonical_host", false)?;
    optional(out, site.report_uri.as_deref(), "report_uri", true)?;
    optional(out, site.report_token.as_deref(), "report_token", false)?;
    let n =
        u16::try_from(site.hostnames.len()).map_err(|_| "more than 65535 hostnames".to_string())?;
    out.extend_from_slice(&n.to_le_bytes());
    for name in &site.cert_ready {
        if !site.hostnames.contains(name) {
            return Err(format!("cert_ready {name:?} is not one of its hostnames"));
        }
    }
    for name in &site.hostnames {
        out.push(u8::from(site.cert_ready.contains(name)));
        str8(out, name, "hostnames")?;
    }
    Ok(())
}

fn optional(out: &mut Vec<u8>, value: Option<&str>, what: &str, wide: bool) -> Result<(), String> {
    if value == Some("") {
        return Err(format!("{what} is empty (absent is written as empty)"));
    }
    let value = value.unwrap_or_default();
    if wide {
        let len = u16::try_from(value.len()).map_err(|_| format!("{what} is too long"))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(value.as_bytes());
        Ok(())
    } else {
        str8(out, value, what)
    }
}

fn str8(out: &mut Vec<u8>, value: &str, what: &str) -> Result<(), String> {
    let len = u8::try_from(value.len())
        .map_err(|_| format!("{what} {value:?} is longer than 255 bytes"))?;
    out.push(len);
    out.extend_from_slice(value.as_bytes());
    Ok(())
}

/// Reads a body, naming what it was reading when it went wrong.
struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

// The readers run for every field of every site: they are inlined, and read integers byte by
// byte (a slice copy is a call to the runtime's `memory.copy` in wasm).
impl<'a> Reader<'a> {
    #[inline(always)]
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], usize> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.body.len());
        match end {
            Some(end) => {
                let bytes = &self.body[self.at..end];
                self.at = end;
                Ok(bytes)
            }
            None => Err(self.at),
        }
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], usize> {
        let bytes = self.bytes(N)?;
        let mut out = [0; N];
        for (to, from) in out.iter_mut().zip(bytes) {
            *to = *from;
        }
        Ok(out)
    }

    #[inline(always)]
    fn u8(&mut self) -> Result<u8, usize> {
        Ok(self.array::<1>()?[0])
    }

    #[inline(always)]
    fn u16(&mut self) -> Result<u16, usize> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, usize> {
        self.array().map(u32::from_le_bytes)
    }

    #[inline(always)]
    fn text(&mut self, len: usize) -> Result<&'a str, usize> {
        let start = self.at;
        std::str::from_utf8(self.bytes(len)?).map_err(|_| start)
    }

    #[inline(always)]
    fn str8(&mut self) -> Result<&'a str, usize> {
        let len = self.u8()?;
        self.text(len.into())
    }

    fn str16(&mut self) -> Result<&'a str, usize> {
        let len = self.u16()?;
        self.text(len.into())
    }
}

/// The problem for a body that is cut short or malformed at byte `at` while reading `what`.
fn malformed(at: usize, what: &str) -> Error {
    Error::InvalidPolicy(vec![Problem {
        path: what.to_string(),
        message: format!(
            "the compact snapshot is truncated or malformed at byte {at}; the feed must send a whole snapshot (see README, \"The policy feed protocol\")"
        ),
    }])
}

/// A compact snapshot being turned into a [`Policy`] a slice at a time: the policy held keeps
/// serving until [`SnapshotBuild::finish`] hands out the new one.
#[derive(Debug)]
pub struct SnapshotBuild {
    body: Vec<u8>,
    at: usize,
    schema: u32,
    version: String,
    settings: Settings,
    sites: u32,
    names: u32,
    done: u32,
    names_seen: u64,
    compiler: Compiler,
    /// Whether the tables have room for every site and name yet (made by the first step).
    reserved: bool,
}

impl SnapshotBuild {
    /// Reads the header (version, settings, counts); the tables are made and the sites read
    /// by [`SnapshotBuild::step`].
    pub fn new(body: Vec<u8>) -> Result<SnapshotBuild, Error> {
        let mut r = Reader { body: &body, at: 0 };
        if r.bytes(MAGIC.len()).ok() != Some(&MAGIC[..]) {
            return Err(Error::InvalidPolicy(vec![Problem {
                path: "$".into(),
                message: "not a compact snapshot (it does not start with \"AHPS\" format 1); the feed must send what its Content-Type says".into(),
            }]));
        }
        let header = (|| {
            let schema = r.u32()?;
            let version = r.str8()?.to_string();
            let http_port = r.u16()?;
            let https_port = r.u16()?;
            let proxies = r.u16()?;
            let mut trusted_proxies = Vec::new();
            for _ in 0..proxies {
                trusted_proxies.push(r.str8()?.to_string());
            }
            let sites = r.u32()?;
            let names = r.u32()?;
            Ok::<_, usize>((
                schema,
                version,
                Settings {
                    trusted_proxies,
                    http_port,
                    https_port,
                },
                sites,
                names,
            ))
        })();
        let (schema, version, settings, sites, names) = header.map_err(|at| malformed(at, "$"))?;
        let at = r.at;
        Ok(SnapshotBuild {
            body,
            at,
            schema,
            version,
            settings,
            sites,
            names,
            done: 0,
            names_seen: 0,
            compiler: Compiler::default(),
            reserved: false,
        })
    }

    /// The snapshot's version, as its header says.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Sites in the snapshot.
    pub fn site_count(&self) -> u32 {
        self.sites
    }

    /// Sites read so far.
    pub fn sites_done(&self) -> u32 {
        self.done
    }

    /// Whether every site has been read.
    pub fn is_done(&self) -> bool {
        self.done >= self.sites
    }

    /// Reads and compiles up to `max_sites` more sites. A malformed body is an error at once;
    /// sites that fail validation are reported by [`SnapshotBuild::finish`], with every other
    /// problem of the snapshot.
    pub fn step(&mut self, max_sites: u32) -> Result<(), Error> {
        if !self.reserved {
            // Room for what the header announces, within what the rest of the body can hold.
            let rest = self.body.len() - self.at;
            self.compiler.reserve_exact(
                (self.sites as usize).min(rest / MIN_SITE_BYTES),
                (self.names as usize).min(rest / MIN_NAME_BYTES),
            );
            self.reserved = true;
        }
        let mut r = Reader {
            body: &self.body,
            at: self.at,
        };
        let mut entry = SiteEntry {
            id: Text(Cow::Borrowed("")),
            hostnames: Vec::new(),
            https: HttpsMode::Auto,
            redirect: RedirectKind::Permanent,
            canonical_host: None,
            hsts: HstsSpec::default(),
            mixed_content: MixedContent::Off,
            report_uri: None,
            report_token: None,
            cert_ready: Vec::new(),
        };
        let mut ready = Vec::new();
        let end = self.done.saturating_add(max_sites).min(self.sites);
        while self.done < end {
            let index = self.done;
            read_site(&mut r, &mut entry, &mut ready).map_err(|(at, what)| {
                malformed(at, &format!("sites[{index}]{}", what.unwrap_or_default()))
            })?;
            self.names_seen += entry.hostnames.len() as u64;
            self.compiler.add_compact_site(&mut entry, &ready);
            self.done += 1;
        }
        self.at = r.at;
        Ok(())
    }

    /// Checks that the body held exactly what its header announced and, when every site and
    /// the settings validate, hands out the policy.
    pub fn finish(mut self) -> Result<Policy, Error> {
        self.step(u32::MAX)?;
        if self.at != self.body.len() {
            return Err(malformed(self.at, "$ (bytes after the last site)"));
        }
        if self.names_seen != u64::from(self.names) {
            return Err(malformed(self.at, "$ (hostname count)"));
        }
        drop(self.body);
        self.compiler
            .finish(self.schema, &self.version, &self.settings)
    }
}

/// Reads one site into `entry` (reusing its vectors), with whether each hostname's certificate
/// is served in `ready` (`entry.cert_ready` is left to the compiler); on error, the byte offset
/// and the field.
fn read_site<'a>(
    r: &mut Reader<'a>,
    entry: &mut SiteEntry<'a>,
    ready: &mut Vec<bool>,
) -> Result<(), (usize, Option<&'static str>)> {
    let field = |what: &'static str| move |at: usize| (at, Some(what));
    entry.id = Text(Cow::Borrowed(r.str8().map_err(field(".id"))?));
    let flags_at = r.at;
    let flags = r.u8().map_err(field(".flags"))?;
    entry.https = match flags & 3 {
        0 => HttpsMode::Auto,
        1 => HttpsMode::Force,
        2 => HttpsMode::Disable,
        _ => return Err((flags_at, Some(".https"))),
    };
    entry.redirect = if flags & 1 << 2 == 0 {
        RedirectKind::Permanent
    } else {
        RedirectKind::Temporary
    };
    entry.mixed_content = match (flags >> 3) & 3 {
        0 => MixedContent::Off,
        1 => MixedContent::Upgrade,
        2 => MixedContent::Report,
        _ => return Err((flags_at, Some(".mixed_content"))),
    };
    entry.hsts = HstsSpec {
        enabled: flags & 1 << 5 != 0,
        include_subdomains: flags & 1 << 6 != 0,
        preload: flags & 1 << 7 != 0,
        max_age: u64::from_le_bytes(r.array().map_err(field(".hsts.max_age"))?),
    };
    let some = |text: &'a str| (!text.is_empty()).then_some(Text(Cow::Borrowed(text)));
    entry.canonical_host = some(r.str8().map_err(field(".canonical_host"))?);
    entry.report_uri = some(r.str16().map_err(field(".report_uri"))?);
    entry.report_token = some(r.str8().map_err(field(".report_token"))?);
    let names = r.u16().map_err(field(".hostnames"))?;
    entry.hostnames.clear();
    ready.clear();
    for _ in 0..names {
        let ready_at = r.at;
        let flag = r.u8().map_err(field(".hostnames"))?;
        let name = r.str8().map_err(field(".hostnames"))?;
        ready.push(match flag {
            0 => false,
            1 => true,
            _ => return Err((ready_at, Some(".cert_ready"))),
        });
        entry.hostnames.push(Text(Cow::Borrowed(name)));
    }
    Ok(())
}

impl Policy {
    /// Reads and validates a compact snapshot in one go (see [`SnapshotBuild`] for the sliced
    /// form).
    pub fn from_compact(body: Vec<u8>) -> Result<Policy, Error> {
        SnapshotBuild::new(body)?.finish()
    }
}
