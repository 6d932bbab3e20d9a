//! Process faults and secrets, on the whole stack (Pebble, the real `autohttps` binary, Envoy
//! with the release filter): the sidecar SIGKILLed at seeded random points while it issues and
//! regenerates (the binary has no clock knob, so "renewal" is an explicit regenerate, which
//! runs the same order path), then restarted; Envoy restarted; no private key in any log or
//! API answer; SNI names outside the registry never start an order.
//!
//! `FAULTS_SEED` replays a run; `FAULTS_KILLS` (default 20) sets the number of kills (`make
//! soak` raises it).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use autohttps_kit::admin::covered_names;
use autohttps_tests::envoy::curl;
use autohttps_tests::stack::{ADMIN_TOKEN, Stack, wait_until};
use serde_json::json;

fn stack(name: &str) -> (Stack, tempfile::TempDir) {
    Stack::start_in_temp_dir(&format!("faults-{name}"))
        .unwrap_or_else(|e| panic!("the stack starts: {e:#}"))
}

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Orders Pebble created (its "Added order" log lines): what the CA saw.
fn pebble_orders(stack: &Stack) -> usize {
    std::fs::read_to_string(stack.dir.join("pebble.log"))
        .unwrap_or_default()
        .matches("Added order")
        .count()
}

fn sqlite(database: &std::path::Path, sql: &str) -> String {
    let output = Command::new("sqlite3")
        .arg("-readonly")
        .arg(database)
        .arg(sql)
        .output()
        .expect("sqlite3 (apt-get install sqlite3)");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn site_names(i: usize) -> Vec<String> {
    vec![
        format!("s{i}.kill.test"),
        format!("www.s{i}.kill.test"),
        format!("alias{i}.other.test"),
    ]
}

/// Names of `site` its current certificates cover, per the admin API.
fn covered(stack: &Stack, site: &str) -> Vec<String> {
    let Ok((200, status)) = stack.admin("GET", &format!("/v1/sites/{site}/certificates"), None)
    else {
        return Vec::new();
    };
    covered_names(&status)
}

fn settled(stack: &Stack, site: &str, names: &[String]) -> bool {
    let Ok((200, status)) = stack.admin("GET", &format!("/v1/sites/{site}/certificates"), None)
    else {
        return false;
    };
    let covered = covered(stack, site);
    names.iter().all(|n| covered.contains(n))
        && status["orders_in_flight"]
            .as_array()
            .is_some_and(Vec::is_empty)
        && status["working"] == false
        && status["issuance"]["regenerate_requested"] == false
}

fn event_count(stack: &Stack, site: &str, kind: &str) -> usize {
    let (_, events) = stack
        .admin("GET", &format!("/v1/sites/{site}/events?limit=10000"), None)
        .expect("events");
    events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .count()
}

#[test]
fn sigkill_at_random_points_loses_no_certificate_and_orders_nothing_twice_then_envoy_restarts() {
    let seed = std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let kills: usize = std::env::var("FAULTS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    println!("SIGKILL seed {seed} (replay with FAULTS_SEED={seed}), {kills} kills");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut stack, _dir) = stack("kill");
    let sites = 4;
    for i in 0..sites {
        let names = site_names(i);
        let (code, body) = stack
            .admin(
                "POST",
                "/v1/sites",
                Some(&json!({ "name": format!("s{i}"), "primary": names[0], "hostnames": &names[1..] })),
            )
            .expect("admin");
        assert_eq!(code, 201, "{body}");
    }

    let mut regenerates = 0;
    let mut best: BTreeMap<String, usize> = BTreeMap::new();
    let mut delays = Vec::new();
    for kill in 0..kills {
        // Every other round asks for a regenerate (the renewal path), so orders are in flight.
        if rng.below(2) == 0 {
            let site = format!("s{}", rng.below(sites as u64));
            if let Ok((202, _)) = stack.admin("POST", &format!("/v1/sites/{site}/regenerate"), None)
            {
                regenerates += 1;
            }
        }
        let delay = Duration::from_millis(rng.below(1500));
        delays.push(delay.as_millis());
        std::thread::sleep(delay);
        stack.kill_sidecar();
        stack
            .start_sidecar()
            .unwrap_or_else(|e| panic!("restart after kill {kill}: {e:#}"));
        // Never worse: a name covered before a kill is still covered after it.
        for i in 0..sites {
            let site = format!("s{i}");
            let now = covered(&stack, &site).len();
            let before = best.entry(site.clone()).or_insert(0);
            assert!(now >= *before, "{site} lost a certificate at kill {kill}");
            *before = now;
        }
    }
    println!("kill delays (ms): {delays:?}; regenerates accepted: {regenerates}");

    for i in 0..sites {
        let names = site_names(i);
        wait_until(&format!("s{i} settled"), Duration::from_secs(60), || {
            settled(&stack, &format!("s{i}"), &names).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e:#}\nsidecar logs:\n{}", stack.sidecar_logs()));
    }
    assert_eq!(sqlite(&stack.database(), "PRAGMA integrity_check;"), "ok");
    assert_eq!(
        sqlite(&stack.database(), "PRAGMA foreign_key_check;"),
        "",
        "foreign keys"
    );
    let mut recorded = 0;
    for i in 0..sites {
        for name in site_names(i) {
            let response = stack.https(&name, "/").expect("curl");
            assert_eq!(
                response.status, 200,
                "{name}: a certificate valid for Pebble's root"
            );
        }
        recorded += event_count(&stack, &format!("s{i}"), "order-created");
    }
    let at_ca = pebble_orders(&stack);
    println!(
        "orders: {recorded} recorded by the sidecar, {at_ca} created at the CA; needed at most {} ({sites} sites + {regenerates} regenerates)",
        sites + regenerates
    );
    assert!(recorded <= sites + regenerates, "more orders than needed");
    assert_eq!(
        at_ca, recorded,
        "an order the sidecar did not record (a duplicate at the CA)"
    );

    // Envoy restarts: every certificate is served again from SDS, the same serial.
    let before: Vec<_> = (0..sites)
        .flat_map(site_names)
        .map(|n| {
            (
                n.clone(),
                stack.presented_certificate(Some(&n)).expect("handshake"),
            )
        })
        .collect();
    stack.restart_envoy().expect("Envoy restarts");
    for (name, presented) in &before {
        let response = stack.https(name, "/").expect("curl");
        assert_eq!(response.status, 200, "{name} after the Envoy restart");
        let again = stack.presented_certificate(Some(name)).expect("handshake");
        assert_eq!(&again, presented, "{name}: the same certificate");
    }
    println!(
        "{kills} SIGKILLs + 1 Envoy restart survived in {:?}: 0 certificates lost, 0 duplicate orders",
        started.elapsed()
    );
}

/// The sidecar's Prometheus text.
fn metrics(stack: &Stack) -> String {
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let url = format!("http://127.0.0.1:{}/metrics", stack.ports.sidecar_admin);
    let response = curl(&["-H", &auth, &url]).expect("curl /metrics");
    assert_eq!(response.status, 200);
    response.body
}

/// Base64 bodies of every private key in the store (certificate keys, keys of orders in
/// flight) and the ACME account key.
fn stored_key_material(database: &std::path::Path) -> Vec<String> {
    let pems = sqlite(
        database,
        "SELECT key_pem FROM certificates UNION ALL SELECT key_pem FROM orders;",
    );
    let mut keys: Vec<String> = pems
        .split("-----END")
        .filter_map(|pem| pem.split_once("KEY-----").map(|(_, body)| body))
        .map(|body| body.split_whitespace().collect::<String>())
        .filter(|body| body.len() > 40)
        .collect();
    let accounts = sqlite(database, "SELECT credentials FROM accounts;");
    for line in accounts.lines() {
        let credentials: serde_json::Value = serde_json::from_str(line).expect("account JSON");
        if let Some(key) = credentials["key_pkcs8"].as_str() {
            keys.push(key.to_owned());
        }
    }
    keys
}

#[test]
fn no_private_key_in_logs_or_answers_and_unknown_sni_never_orders() {
    let (stack, _dir) = stack("secrets");
    let mut answers = String::new();
    let mut call = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let (code, json) = stack.admin(method, path, body.as_ref()).expect("admin");
        answers.push_str(&json.to_string());
        (code, json)
    };
    let (code, _) = call(
        "POST",
        "/v1/sites",
        Some(
            json!({ "name": "vault", "primary": "vault.secret.test", "hostnames": ["www.vault.secret.test"] }),
        ),
    );
    assert_eq!(code, 201);
    wait_until("vault issued", Duration::from_secs(60), || {
        settled(
            &stack,
            "vault",
            &["vault.secret.test".into(), "www.vault.secret.test".into()],
        )
        .then_some(())
    })
    .expect("issued");
    let (code, _) = call("POST", "/v1/sites/vault/regenerate", None);
    assert_eq!(code, 202);
    wait_until("vault regenerated", Duration::from_secs(60), || {
        (event_count(&stack, "vault", "certificate-issued") >= 2
            && settled(&stack, "vault", &["vault.secret.test".into()]))
        .then_some(())
    })
    .expect("regenerated");
    assert_eq!(
        stack.https("vault.secret.test", "/").expect("curl").status,
        200
    );

    // SNI names the registry does not know: handshakes fall back, nothing is ordered.
    let orders_before = pebble_orders(&stack);
    let attempts = |stack: &Stack| {
        metrics(stack)
            .lines()
            .find_map(|l| l.strip_prefix("autohttps_issuance_attempts_total "))
            .map(str::to_owned)
            .expect("the attempts counter")
    };
    let attempts_before = attempts(&stack);
    let unknown: Vec<String> = (0..20)
        .map(|i| format!("unknown{i}.nobody.test"))
        .chain([
            "evil.vault.secret.test".into(),
            "vault.secret.test.evil.test".into(),
        ])
        .collect();
    for name in &unknown {
        let presented = stack.presented_certificate(Some(name));
        if let Ok(presented) = presented {
            assert!(
                !presented.names.contains(name),
                "{name} got a certificate naming it"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        pebble_orders(&stack),
        orders_before,
        "an unknown SNI started an order"
    );
    assert_eq!(
        attempts(&stack),
        attempts_before,
        "an unknown SNI started an attempt"
    );
    let (_, sites) = call("GET", "/v1/sites", None);
    assert_eq!(sites.as_array().map(Vec::len), Some(1), "no site appeared");

    for path in [
        "/v1/sites",
        "/v1/sites/vault",
        "/v1/sites/vault/certificates",
        "/v1/sites/vault/events?limit=1000",
        "/v1/diagnose/vault.secret.test",
        "/v1/diagnose/www.vault.secret.test",
    ] {
        call("GET", path, None);
    }
    answers.push_str(&metrics(&stack));
    let keys = stored_key_material(&stack.database());
    assert!(
        keys.len() >= 3,
        "expected certificate and account keys, found {}",
        keys.len()
    );
    let texts = [
        ("sidecar logs", stack.sidecar_logs()),
        ("Envoy log", stack.envoy().log()),
        ("admin API answers", answers),
    ];
    for (what, text) in &texts {
        assert!(!text.is_empty(), "{what} is empty");
        assert!(
            !text.contains("PRIVATE KEY"),
            "{what} contains a PEM private key marker"
        );
        let compact: String = text.split_whitespace().collect();
        for key in &keys {
            // The whole key, or any 48-character stretch of it (a line of a PEM body).
            let leaked = compact.contains(key.as_str())
                || key
                    .as_bytes()
                    .chunks(48)
                    .filter(|c| c.len() == 48)
                    .any(|c| compact.contains(std::str::from_utf8(c).unwrap_or("\u{0}")));
            assert!(!leaked, "{what} contains stored key material");
        }
    }
    println!(
        "no key material ({} keys) in {} bytes of sidecar logs, {} of Envoy log, {} of API answers; {} unknown SNI names, 0 orders",
        keys.len(),
        texts[0].1.len(),
        texts[1].1.len(),
        texts[2].1.len(),
        unknown.len()
    );
}
