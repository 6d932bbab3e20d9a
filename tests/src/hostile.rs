//! Hostile HTTP: the corpus format (`tests/hostile/corpus.json`), raw HTTP/1.1 exchanges over
//! TCP and TLS (no client library to tidy the bytes up), and the safety checks every response
//! must pass: no `Location` outside the policy's names, no smuggled or broken response header.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;

/// The corpus file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corpus {
    /// What the file is and how to read it.
    pub about: Vec<String>,
    /// Response header names no response may carry (the requests try to smuggle them in).
    pub forbidden_response_headers: Vec<String>,
    /// The requests.
    pub entries: Vec<Entry>,
}

impl Corpus {
    /// Reads `tests/hostile/corpus.json`.
    pub fn load() -> anyhow::Result<Corpus> {
        let path = hostile_dir().join("corpus.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// `tests/hostile/`.
pub fn hostile_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hostile")
}

/// Which listener a request goes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Listener {
    /// Plain HTTP.
    #[default]
    Plain,
    /// TLS.
    Tls,
}

/// One crafted request and what must hold for it (beyond the checks every response passes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Behaviour-stating name.
    pub name: String,
    /// The kind of trick, for the results table.
    pub category: String,
    /// The listener.
    #[serde(default)]
    pub listener: Listener,
    /// SNI for the TLS listener; `force.hostile.test` when absent.
    #[serde(default)]
    pub sni: Option<String>,
    /// The request exactly as sent (see [`expand`] for the `{{…}}` escapes). When absent, the
    /// request is built from `method`, `target`, `version` and `headers`.
    #[serde(default)]
    pub raw: Option<String>,
    /// Method (GET when absent).
    #[serde(default)]
    pub method: Option<String>,
    /// Request target.
    #[serde(default)]
    pub target: Option<String>,
    /// Protocol version (HTTP/1.1 when absent).
    #[serde(default)]
    pub version: Option<String>,
    /// Header lines in order, duplicates allowed; `Connection: close` is added unless a
    /// `Connection` header is listed.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// What must hold.
    #[serde(default)]
    pub expect: Expect,
}

/// What an entry must produce.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Allowed outcomes; any when empty.
    #[serde(default)]
    pub outcomes: Vec<Outcome>,
    /// The exact `Location` when the answer is a redirect.
    #[serde(default)]
    pub location: Option<String>,
    /// How many responses to wait for (pipelined requests).
    #[serde(default = "one")]
    pub responses: usize,
}

fn one() -> usize {
    1
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            outcomes: Vec::new(),
            location: None,
            responses: 1,
        }
    }
}

/// How one exchange ended, per response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// A 3xx whose `Location` passed the checks.
    Redirected,
    /// A 1xx/2xx: served without a redirect.
    Passed,
    /// A 4xx/5xx (Envoy refusing garbage, or the filter failing closed).
    Rejected,
    /// The connection closed without a (further) response.
    Closed,
    /// No (further) response before the deadline.
    NoResponse,
}

impl Outcome {
    /// Every outcome, in table order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Redirected,
        Outcome::Passed,
        Outcome::Rejected,
        Outcome::Closed,
        Outcome::NoResponse,
    ];

    /// The outcome of a response with this status.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            300..=399 => Outcome::Redirected,
            100..=299 => Outcome::Passed,
            _ => Outcome::Rejected,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Redirected => "redirected",
            Outcome::Passed => "passed",
            Outcome::Rejected => "rejected",
            Outcome::Closed => "closed",
            Outcome::NoResponse => "no-response",
        })
    }
}

impl Entry {
    /// The bytes to send.
    pub fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(raw) = &self.raw {
            return expand(raw);
        }
        let mut text = format!(
            "{} {} {}\r\n",
            self.method.as_deref().unwrap_or("GET"),
            self.target.as_deref().unwrap_or("/"),
            self.version.as_deref().unwrap_or("HTTP/1.1")
        );
        for (name, value) in &self.headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        if !self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("connection"))
        {
            text.push_str("Connection: close\r\n");
        }
        text.push_str("\r\n");
        expand(&text)
    }

    /// Whether the (first) request is a HEAD, whose response has no body.
    pub fn is_head(&self) -> bool {
        match (&self.raw, &self.method) {
            (Some(raw), _) => raw.starts_with("HEAD "),
            (None, Some(method)) => method == "HEAD",
            (None, None) => false,
        }
    }
}

/// Expands the corpus escapes: `{{0xHH}}` is the byte 0xHH (for bytes JSON text cannot carry,
/// such as overlong UTF-8), `{{rep N TEXT}}` is TEXT repeated N times. Everything else is the
/// UTF-8 text as written.
pub fn expand(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.extend_from_slice(&rest.as_bytes()[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| anyhow!("unclosed {{{{ in {text:?}"))?;
        let escape = &after[..end];
        if let Some(hex) = escape.strip_prefix("0x") {
            out.push(u8::from_str_radix(hex, 16).with_context(|| format!("bad byte {escape}"))?);
        } else if let Some(spec) = escape.strip_prefix("rep ") {
            let (count, unit) = spec
                .split_once(' ')
                .ok_or_else(|| anyhow!("{{{{rep N TEXT}}}} needs a count and a text"))?;
            let count: usize = count
                .parse()
                .with_context(|| format!("bad count {count}"))?;
            out.extend(std::iter::repeat_n(unit.as_bytes(), count).flatten());
        } else {
            bail!("unknown escape {{{{{escape}}}}}");
        }
        rest = &after[end + 2..];
    }
    out.extend_from_slice(rest.as_bytes());
    Ok(out)
}

/// One HTTP/1.1 response as it arrived.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines after the status line, raw (split on CRLF only, so a stray CR or LF inside
    /// a line stays visible).
    pub lines: Vec<Vec<u8>>,
}

impl Response {
    /// The values of a header (name compared case-insensitively), lossily decoded.
    pub fn header(&self, name: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|line| {
                let colon = line.iter().position(|b| *b == b':')?;
                let (n, v) = line.split_at(colon);
                n.eq_ignore_ascii_case(name.as_bytes())
                    .then(|| String::from_utf8_lossy(&v[1..]).trim().to_string())
            })
            .collect()
    }
}

/// What came back over one connection.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Complete responses, in order.
    pub responses: Vec<Response>,
    /// Whether the peer closed the connection.
    pub closed: bool,
    /// Bytes after the last complete response (a response cut short).
    pub leftover: usize,
}

impl Exchange {
    /// One outcome per expected response.
    pub fn outcomes(&self, expected: usize) -> Vec<Outcome> {
        let mut outcomes: Vec<Outcome> = self
            .responses
            .iter()
            .map(|r| Outcome::of_status(r.status))
            .collect();
        while outcomes.len() < expected {
            outcomes.push(if self.closed {
                Outcome::Closed
            } else {
                Outcome::NoResponse
            });
        }
        outcomes
    }
}

/// Parses as many complete responses as `buf` holds: (responses, bytes consumed).
pub fn parse_responses(buf: &[u8], head_request: bool) -> (Vec<Response>, usize) {
    let mut responses = Vec::new();
    let mut at = 0;
    while let Some((parsed, used)) = parse_one(&buf[at..], head_request) {
        at += used;
        // An interim 1xx (100 Continue) precedes the real answer: not a response of its own.
        if parsed.status >= 200 {
            responses.push(parsed);
        }
    }
    (responses, at)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_one(buf: &[u8], head_request: bool) -> Option<(Response, usize)> {
    let head_end = find(buf, b"\r\n\r\n")?;
    let head = &buf[..head_end];
    let mut lines = split_crlf(head);
    let status_line = lines.remove(0);
    let status: u16 = std::str::from_utf8(&status_line)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()?;
    let response = Response { status, lines };
    let body_start = head_end + 4;
    let no_body = head_request || status < 200 || status == 204 || status == 304;
    if no_body {
        return Some((response, body_start));
    }
    if let Some(length) = response.header("content-length").first() {
        let length: usize = length.parse().ok()?;
        return (buf.len() >= body_start + length).then_some((response, body_start + length));
    }
    if response
        .header("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut at = body_start;
        loop {
            let line_end = at + find(&buf[at..], b"\r\n")?;
            let size_text = std::str::from_utf8(&buf[at..line_end]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                let end = at + find(&buf[at..], b"\r\n")? + 2;
                return Some((response, end));
            }
            at += size + 2;
            if at > buf.len() {
                return None;
            }
        }
    }
    // No length: the body runs to the end of the connection.
    None
}

fn split_crlf(head: &[u8]) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut rest = head;
    while let Some(i) = find(rest, b"\r\n") {
        lines.push(rest[..i].to_vec());
        rest = &rest[i + 2..];
    }
    lines.push(rest.to_vec());
    lines
}

/// Collects chunks from a reader thread until `expected` responses are complete, the
/// connection closes, or the deadline passes.
fn collect(
    chunks: &mpsc::Receiver<Option<Vec<u8>>>,
    expected: usize,
    head_request: bool,
    deadline: Duration,
) -> Exchange {
    let end = Instant::now() + deadline;
    let mut buf = Vec::new();
    let mut closed = false;
    loop {
        let (responses, used) = parse_responses(&buf, head_request);
        let left = end.saturating_duration_since(Instant::now());
        if responses.len() >= expected || closed || left.is_zero() {
            return Exchange {
                responses,
                closed,
                leftover: buf.len() - used,
            };
        }
        match chunks.recv_timeout(left) {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

fn pump(mut source: impl Read + Send + 'static) -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match source.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    if tx.send(Some(chunk[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Sends `request` over plain TCP to `127.0.0.1:port` and reads what comes back.
pub fn exchange_tcp(
    port: u16,
    request: &[u8],
    expected: usize,
    head_request: bool,
    deadline: Duration,
) -> anyhow::Result<Exchange> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).context("connecting")?;
    let reader = stream.try_clone()?;
    let chunks = pump(reader);
    // A peer that rejects early may close before everything is written: that is an answer.
    let _ = stream.write_all(request);
    let exchange = collect(&chunks, expected, head_request, deadline);
    let _ = stream.shutdown(Shutdown::Both);
    Ok(exchange)
}

/// Sends `request` over TLS (through `openssl s_client`, which passes the bytes untouched) to
/// `127.0.0.1:port` with this SNI, and reads what comes back.
pub fn exchange_tls(
    port: u16,
    sni: &str,
    request: &[u8],
    expected: usize,
    head_request: bool,
    deadline: Duration,
) -> anyhow::Result<Exchange> {
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-no_ign_eof", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-servername", sni])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running openssl s_client")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no s_client stdout"))?;
    let chunks = pump(stdout);
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("no s_client stdin"))?;
    let _ = stdin.write_all(request);
    let _ = stdin.flush();
    let exchange = collect(&chunks, expected, head_request, deadline);
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    Ok(exchange)
}

/// The names a `Location` may point at: the policy's exact names, and one label under each of
/// its wildcards.
#[derive(Debug, Clone, Default)]
pub struct SiteNames {
    exact: BTreeSet<String>,
    wildcard_parents: BTreeSet<String>,
}

impl SiteNames {
    /// Collects the names of a policy document.
    pub fn from_policy(policy: &serde_json::Value) -> SiteNames {
        let mut names = SiteNames::default();
        let sites = policy["sites"].as_array().cloned().unwrap_or_default();
        for site in &sites {
            for name in site["hostnames"].as_array().cloned().unwrap_or_default() {
                let name = name.as_str().unwrap_or_default().to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(parent) => names.wildcard_parents.insert(parent.to_string()),
                    None => names.exact.insert(name),
                };
            }
        }
        names
    }

    /// Whether `host` is one of the names.
    pub fn allows(&self, host: &str) -> bool {
        if self.exact.contains(host) {
            return true;
        }
        host.split_once('.').is_some_and(|(label, parent)| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
                && self.wildcard_parents.contains(parent)
        })
    }

    /// Checks a `Location`: `http(s)://<one of the names>[:port]/…`, printable ASCII only.
    pub fn check_location(&self, location: &[u8]) -> Result<(), String> {
        if let Some(bad) = location.iter().find(|b| **b <= b' ' || **b >= 0x7f) {
            return Err(format!("Location has the byte 0x{bad:02x}"));
        }
        let text = String::from_utf8_lossy(location);
        let rest = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .ok_or_else(|| format!("Location {text:?} is not an absolute http(s) URL"))?;
        let authority_end = rest.find(['/', '\\', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if !path.starts_with('/') {
            return Err(format!("Location {text:?} has no path after the host"));
        }
        let host = match authority.split_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                host
            }
            Some(_) => return Err(format!("Location {text:?} has a bad authority")),
            None => authority,
        };
        if !self.allows(host) {
            return Err(format!(
                "Location {text:?} points at {host:?}, which is not a name of any site"
            ));
        }
        Ok(())
    }
}

/// Every problem with one response: broken or smuggled header lines, or a `Location` outside
/// the site names.
pub fn violations(response: &Response, names: &SiteNames, forbidden: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut locations = 0;
    for line in &response.lines {
        let shown = String::from_utf8_lossy(line);
        if let Some(bad) = line.iter().find(|b| matches!(**b, b'\r' | b'\n' | 0)) {
            problems.push(format!(
                "header line {shown:?} carries the byte 0x{bad:02x}"
            ));
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            problems.push(format!("header line {shown:?} has no name"));
            continue;
        };
        let (name, value) = line.split_at(colon);
        let token = !name.is_empty()
            && name
                .iter()
                .all(|b| b.is_ascii_graphic() && !b"\"(),/:;<=>?@[\\]{}".contains(b));
        if !token {
            problems.push(format!("header line {shown:?} has a malformed name"));
            continue;
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        if forbidden.iter().any(|f| f.eq_ignore_ascii_case(&name)) {
            problems.push(format!("smuggled response header {shown:?}"));
        }
        if name == "location" {
            locations += 1;
            let value = value[1..].trim_ascii();
            if let Err(problem) = names.check_location(value) {
                problems.push(problem);
            }
            if !(300..400).contains(&response.status) {
                problems.push(format!("Location on a {} response", response.status));
            }
        }
    }
    if locations > 1 {
        problems.push(format!("{locations} Location headers"));
    }
    problems
}
