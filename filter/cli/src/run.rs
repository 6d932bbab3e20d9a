//! `test FILE CASES`: the cases run on the filter `.wasm` in the wasmtime proxy-wasm host, each
//! request presented as Envoy presents it, each failure shown as a diff.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, anyhow, bail};
use proxy_wasm_host::{FilterModule, Host, HostBuilder};
use sha2::{Digest as _, Sha256};

use crate::cases::{Case, CasesFile, ResolvedRequest};
use crate::input::PolicyFile;
use crate::junit::{CaseReport, write_junit};
use crate::{UsageError, Verdict};

/// The file name of the filter build.
const WASM_NAME: &str = "autohttps_filter.wasm";

/// Runs every case and prints `ok`/`FAIL` lines, a diff per failure and a summary.
pub(crate) fn run(
    file: &Path,
    cases_path: &Path,
    wasm: Option<&Path>,
    junit: Option<&Path>,
) -> Result<Verdict, UsageError> {
    let policy = PolicyFile::read(file)?;
    // The native engine validates first: its problems name JSON paths, the VM's log does not.
    policy.valid_policy(file)?;
    let cases = CasesFile::read(cases_path)?;
    let wasm = match wasm {
        Some(path) => path.to_owned(),
        None => default_wasm()?,
    };
    let build = Build::describe(&wasm)?;
    let module = FilterModule::load(&wasm)
        .with_context(|| format!("{} is not a filter this command can run", wasm.display()))?;
    let configuration = policy.plugin_configuration();
    // One VM for the whole table, as one Envoy worker serves many requests.
    let mut host = HostBuilder::new(&module)
        .plugin_configuration(configuration)
        .property(&["plugin_name"], "autohttps")
        .build()
        .with_context(|| format!("starting {}", wasm.display()))?;
    if !host.configuration_accepted() {
        let logs: Vec<String> = host.logs().iter().map(|l| l.message.clone()).collect();
        return Err(anyhow!(
            "the filter {} rejected the policy {}:\n  {}",
            wasm.display(),
            file.display(),
            logs.join("\n  ")
        )
        .into());
    }
    println!("running {} case(s) on {build}", cases.cases.len());

    let started = Instant::now();
    let mut reports = Vec::with_capacity(cases.cases.len());
    for case in &cases.cases {
        let case_started = Instant::now();
        let failure = match run_case(&mut host, case) {
            Ok(diff) if diff.is_empty() => None,
            Ok(diff) => Some(diff),
            Err(error) => Some(format!("  the host could not run it: {error:#}\n")),
        };
        match &failure {
            None => println!("ok   {}", case.name),
            Some(diff) => print!("FAIL {}\n{diff}", case.name),
        }
        reports.push(CaseReport {
            name: case.name.clone(),
            failure,
            time: case_started.elapsed(),
        });
        if let Some(trap) = host.failure() {
            return Err(UsageError(anyhow!(
                "the filter trapped and its VM is failed: {trap}"
            )));
        }
    }
    let elapsed = started.elapsed();
    let failed = reports.iter().filter(|r| r.failure.is_some()).count();
    println!(
        "{} passed, {failed} failed, in {:.0} ms ({build})",
        reports.len() - failed,
        elapsed.as_secs_f64() * 1e3
    );
    if let Some(junit) = junit {
        write_junit(junit, cases_path, &build.to_string(), &reports, elapsed)?;
    }
    Ok(if failed == 0 {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

/// Where the filter build is looked for when `--wasm` is not given: beside this binary (an
/// installed pair), in the cargo target directory this binary was built into, then under
/// `./target` (`make build` ships it in `dist/` there).
fn default_wasm() -> anyhow::Result<PathBuf> {
    let relative = Path::new("dist").join(WASM_NAME);
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(WASM_NAME));
        if let Some(target) = dir.parent() {
            candidates.push(target.join(&relative));
        }
    }
    candidates.push(Path::new("target").join(&relative));
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            anyhow!(
                "no filter build found (looked at {}); build it with `make build` or name one with --wasm PATH",
                tried.join(", ")
            )
        })
}

/// Which build ran: its path, size and SHA-256.
#[derive(Debug, Clone)]
struct Build {
    path: PathBuf,
    size: u64,
    sha256: String,
}

impl Build {
    fn describe(path: &Path) -> anyhow::Result<Build> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the filter build {}", path.display()))?;
        let digest = Sha256::digest(&bytes);
        let mut sha256 = String::with_capacity(64);
        for byte in digest {
            let _ = write!(sha256, "{byte:02x}");
        }
        Ok(Build {
            path: path.canonicalize().unwrap_or_else(|_| path.to_owned()),
            size: bytes.len() as u64,
            sha256,
        })
    }
}

impl std::fmt::Display for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} bytes, sha256 {})",
            self.path.display(),
            self.size,
            self.sha256
        )
    }
}

/// What the client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: u16,
    headers: BTreeMap<String, Vec<String>>,
}

/// Runs one case; returns its diff (empty when it passed).
fn run_case(host: &mut Host, case: &Case) -> anyhow::Result<String> {
    let request = case.request.resolve()?;
    let seen = send(host, &request, case)?;
    let expected = case.expect.checked_headers()?;
    let mut diff = String::new();
    if seen.status != case.expect.status {
        let _ = writeln!(diff, "  - status: {}", case.expect.status);
        let _ = writeln!(diff, "  + status: {}", seen.status);
    }
    for (name, want) in &expected {
        let got = seen.headers.get(name).cloned().unwrap_or_default();
        if &got != want {
            let _ = writeln!(diff, "  - {name}: {}", shown(want));
            let _ = writeln!(diff, "  + {name}: {}", shown(&got));
        }
    }
    if !diff.is_empty() {
        diff.insert_str(
            0,
            &format!(
                "  request: {} {}://{}{} from {}{}\n  (- expected, + got)\n",
                request.method,
                if request.tls { "https" } else { "http" },
                request.authority,
                request.path,
                request.peer,
                if request.headers.is_empty() {
                    String::new()
                } else {
                    let list: Vec<String> = request
                        .headers
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect();
                    format!(" with {}", list.join(", "))
                }
            ),
        );
    }
    Ok(diff)
}

fn shown(values: &[String]) -> String {
    match values {
        [] => "(absent)".into(),
        [one] => format!("{one:?}"),
        many => format!("{many:?}"),
    }
}

/// Presents the request as Envoy does with the shipped configurations (the TCP peer in the
/// filter state `envoy/edge.yaml` records it in, and in `source.address`; a TLS version for
/// HTTPS), lets the upstream answer when the filter passes it, and reads the response the
/// client gets.
fn send(host: &mut Host, request: &ResolvedRequest, case: &Case) -> anyhow::Result<Seen> {
    let mut stream = host.http_stream()?;
    let peer = match request.peer.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:40000"),
        _ => format!("{}:40000", request.peer),
    };
    stream.set_property(
        &[
            "filter_state",
            autohttps_filter::policy::DIRECT_PEER_FILTER_STATE,
        ],
        request.peer.as_str(),
    );
    stream.set_property(&["source", "address"], peer);
    if request.tls {
        stream.set_property(&["connection", "tls_version"], "TLSv1.3");
    }
    let scheme = if request.tls { "https" } else { "http" };
    let mut headers: Vec<(&str, &str)> = vec![
        (":method", request.method.as_str()),
        (":scheme", scheme),
        (":authority", request.authority.as_str()),
        (":path", request.path.as_str()),
    ];
    headers.extend(
        request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    stream.request_headers(&headers, true)?;
    if stream.local_response().is_none() {
        let status = case.upstream.status.to_string();
        let mut response: Vec<(&str, &str)> = vec![(":status", status.as_str())];
        response.extend(
            case.upstream
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        stream.response_headers(&response, false)?;
    }
    let mut seen = Seen {
        status: 0,
        headers: BTreeMap::new(),
    };
    for (name, value) in stream.current_response_headers().pairs() {
        if name == ":status" {
            seen.status = value
                .parse()
                .with_context(|| format!("the response status {value:?} is not a number"))?;
        } else if !name.starts_with(':') {
            seen.headers
                .entry(name.to_owned())
                .or_default()
                .push(value.into_owned());
        }
    }
    for values in seen.headers.values_mut() {
        values.sort();
    }
    stream.complete()?;
    if seen.status == 0 {
        bail!("the response has no :status");
    }
    Ok(seen)
}
