//! `autohttps-policy` through its real interface: the built binary spawned with files, its exit
//! code, stdout and stderr checked. The filter it runs is the release `.wasm` (`make build`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use autohttps_tests::conformance::ScenarioFile;
use autohttps_tests::envoy::{filter_wasm, repo_root};
use serde_json::{Value, json};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Runs the binary from the workspace root (where CI runs it).
fn policy_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autohttps-policy"))
        .current_dir(repo_root())
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn wasm() -> String {
    filter_wasm()
        .expect("the release filter is built (make build)")
        .display()
        .to_string()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn shipped_example_passes_and_names_the_build_it_ran() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junit = dir.path().join("junit.xml");
    let policy = examples().join("policy.json");
    let cases = examples().join("cases.yaml");
    let wasm = wasm();
    let out = policy_cli(&[
        "test",
        path_str(&policy),
        path_str(&cases),
        "--wasm",
        &wasm,
        "--junit",
        path_str(&junit),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("11 passed, 0 failed"), "{stdout}");
    let size = std::fs::metadata(&wasm).expect("wasm").len();
    assert!(
        stdout.contains(&format!("({size} bytes, sha256 ")),
        "the build is named with its size and digest: {stdout}"
    );
    let xml = std::fs::read_to_string(&junit).expect("junit written");
    assert!(xml.contains(r#"tests="11" failures="0""#), "{xml}");
    assert_eq!(xml.matches("<testcase ").count(), 11, "{xml}");
}

#[test]
fn default_wasm_is_the_one_built_beside_the_binary() {
    // The binary lives in target/debug; the release filter `make build` ships in target/dist.
    let policy = examples().join("policy.json");
    let cases = examples().join("cases.yaml");
    let out = policy_cli(&["test", path_str(&policy), path_str(&cases)]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("target/dist/autohttps_filter.wasm"),
        "{stdout}"
    );
}

#[test]
fn wrong_expectation_fails_with_a_diff_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = dir.path().join("cases.yaml");
    std::fs::write(
        &cases,
        r#"cases:
  - name: right
    request: { url: "http://blog.example/" }
    expect: { status: 200 }
  - name: deliberately_wrong
    request: { url: "http://shop.example/cart" }
    expect:
      status: 302
      location: "https://shop.example/cart"
      headers: { strict-transport-security: "max-age=1" }
"#,
    )
    .expect("write cases");
    let junit = dir.path().join("junit.xml");
    let policy = examples().join("policy.json");
    let wasm = wasm();
    let out = policy_cli(&[
        "test",
        path_str(&policy),
        path_str(&cases),
        "--wasm",
        &wasm,
        "--junit",
        path_str(&junit),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    for line in [
        "ok   right",
        "FAIL deliberately_wrong",
        "request: GET http://shop.example/cart from 192.0.2.10",
        "  - status: 302",
        "  + status: 301",
        "  - location: \"https://shop.example/cart\"",
        "  + location: \"https://www.shop.example/cart\"",
        "  - strict-transport-security: \"max-age=1\"",
        "  + strict-transport-security: (absent)",
        "1 passed, 1 failed",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    let xml = std::fs::read_to_string(&junit).expect("junit written");
    assert!(xml.contains(r#"tests="2" failures="1""#), "{xml}");
    assert!(xml.contains("<failure message="), "{xml}");
}

#[test]
fn broken_policy_fails_check_naming_each_json_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sites = json!([
        { "id": "a", "hostnames": ["a.test", "bad host"], "cert_ready": ["elsewhere.test"] },
        { "id": "a", "hostnames": ["a.test"] }
    ]);
    let document = json!({ "schema": 1, "version": "v", "sites": sites });
    let plain = dir.path().join("policy.json");
    std::fs::write(&plain, document.to_string()).expect("write");
    let plugin = dir.path().join("plugin.json");
    std::fs::write(&plugin, json!({ "policy": document }).to_string()).expect("write");
    for (file, prefix) in [(&plain, ""), (&plugin, "policy.")] {
        let out = policy_cli(&["check", path_str(file)]);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
        for path in [
            "sites[0].hostnames[1]: ",
            "sites[0].cert_ready[0]: ",
            "sites[1].id: ",
            "sites[1].hostnames[0]: ",
        ] {
            assert!(
                stdout.contains(&format!("  {prefix}{path}")),
                "missing {prefix}{path} in\n{stdout}"
            );
        }
        assert!(stdout.contains("INVALID"), "{stdout}");
    }
    let good = policy_cli(&["check", path_str(&examples().join("policy.json"))]);
    assert_eq!(good.status.code(), Some(0), "{}", text(&good.stdout));
    // A policy `test` cannot use is an input error, not a failing case.
    let cases = examples().join("cases.yaml");
    let out = policy_cli(&["test", path_str(&plain), path_str(&cases)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("sites[1].id"));
}

#[test]
fn corrupt_or_foreign_wasm_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corrupt = dir.path().join("corrupt.wasm");
    std::fs::write(&corrupt, b"\0asm\x01\0\0\0garbage that is no section").expect("write");
    let text_file = dir.path().join("notes.wasm");
    std::fs::write(&text_file, b"this is a text file").expect("write");
    // A valid module that is not a proxy-wasm filter: no imports, no exports (just the header).
    let foreign = dir.path().join("foreign.wasm");
    std::fs::write(&foreign, b"\0asm\x01\0\0\0").expect("write");
    let missing = dir.path().join("missing.wasm");
    let policy = examples().join("policy.json");
    let cases = examples().join("cases.yaml");
    for (wasm, phrase) in [
        (&corrupt, "cannot compile wasm module"),
        (&text_file, "cannot compile wasm module"),
        (&foreign, "does not export proxy_abi_version_0_2_1"),
        (&missing, "cannot read the filter build"),
    ] {
        let out = policy_cli(&[
            "test",
            path_str(&policy),
            path_str(&cases),
            "--wasm",
            path_str(wasm),
        ]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", wasm.display());
        assert!(stderr.contains(phrase), "{}: {stderr}", wasm.display());
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn explain_names_the_site_the_rule_and_the_redirect() {
    let policy = examples().join("policy.json");
    let out = policy_cli(&[
        "explain",
        path_str(&policy),
        "http://eu.shop.example/a?b=1",
        "--method",
        "POST",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for line in [
        "→ 308 redirect, Location: https://www.shop.example/a?b=1",
        "eu.shop.example matches *.shop.example of site \"shop\" (sites[0])",
        "the site's https mode is force",
        "canonical host is www.shop.example, with a served certificate",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    let https = policy_cli(&["explain", path_str(&policy), "www.shop.example/", "--https"]);
    let stdout = text(&https.stdout);
    assert!(
        stdout.contains("response gets strict-transport-security: max-age=31536000"),
        "{stdout}"
    );
    let bad = policy_cli(&["explain", path_str(&policy), "ftp://x/"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// The conformance table as cases files, one per policy it names, run through the command:
/// every scenario must get the verdict the conformance suite expects (which the wasmtime and
/// Envoy halves of that suite also check).
#[test]
fn conformance_table_as_cases_gives_the_suites_verdicts() {
    let file = ScenarioFile::load().expect("scenario file");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut by_policy: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for scenario in &file.scenarios {
        let request = &scenario.request;
        let mut expect = scenario.expect.clone();
        expect.normalise();
        let upstream: BTreeMap<&str, &str> = scenario.upstream.headers().into_iter().collect();
        by_policy
            .entry(scenario.policy.as_str())
            .or_default()
            .push(json!({
                "name": scenario.name,
                "request": {
                    "scheme": request.scheme, "host": request.host, "path": request.path,
                    "method": request.method, "headers": request.headers, "peer": request.peer,
                },
                "upstream": { "headers": upstream },
                "expect": {
                    "status": expect.status,
                    "headers": {
                        "location": expect.location.iter().collect::<Vec<_>>(),
                        "strict-transport-security": expect.hsts,
                        "content-security-policy": expect.csp,
                        "content-security-policy-report-only": expect.csp_report_only,
                    },
                },
            }));
    }
    let wasm = wasm();
    let mut total = 0;
    for (policy, cases) in &by_policy {
        let policy_path = dir.path().join(format!("{policy}.json"));
        std::fs::write(&policy_path, file.policy_json(policy).expect("policy")).expect("write");
        let cases_path = dir.path().join(format!("{policy}.cases.json"));
        std::fs::write(&cases_path, json!({ "cases": cases }).to_string()).expect("write");
        let out = policy_cli(&[
            "test",
            path_str(&policy_path),
            path_str(&cases_path),
            "--wasm",
            &wasm,
        ]);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "policy {policy}:\n{stdout}{}",
            text(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("{} passed, 0 failed", cases.len())),
            "{stdout}"
        );
        total += cases.len();
    }
    assert_eq!(total, file.scenarios.len());
    assert!(total >= 50, "only {total} scenarios");
}
