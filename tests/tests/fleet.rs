//! The fleet suite, on a real fleet: three edges (Envoy on 127.0.0.1, .2 and .3, all on the
//! same HTTP port, each with its own `autohttps` sidecar) sharing one throwaway PostgreSQL,
//! against Pebble and its mock DNS, which points each name at the edge a scenario chooses.
//! One fleet serves every scenario, in an order where they do not interfere:
//!
//! 1. one order per site for 30 sites created through the three nodes' APIs, every name
//!    verified (TLS with the issued certificate, by SNI) through every edge;
//! 2. a name whose DNS points at edge 2 is ordered by edge 1 and the challenge is answered by
//!    edge 2;
//! 3. `site https … force` on node 3 is enforced by all three Envoys;
//! 4. the node holding a site's lease is SIGKILLed mid-order: another node resumes that order;
//! 5. PostgreSQL stops for 20 s during traffic: no HTTPS request fails, the admin API answers
//!    503 naming the problem, and afterwards every change converges on every edge.
//!
//! `FLEET_SEED` replays scenario 4's kill point.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use autohttps_kit::admin::covered_names;
use autohttps_kit::fleet::{Fleet, FleetOptions};
use autohttps_tests::stack::wait_until;
use serde_json::json;

const EDGES: [usize; 3] = [1, 2, 3];

fn site_names(i: usize) -> Vec<String> {
    let mut names = vec![format!("s{i}.fleet.test")];
    if i.is_multiple_of(3) {
        names.push(format!("www.s{i}.fleet.test"));
    }
    names
}

/// The names `site`'s current certificates cover, per edge `edge`'s admin API.
fn covered(fleet: &Fleet, edge: usize, site: &str) -> Vec<String> {
    let Ok((200, status)) =
        fleet
            .edge(edge)
            .admin("GET", &format!("/v1/sites/{site}/certificates"), None)
    else {
        return Vec::new();
    };
    covered_names(&status)
}

fn events(fleet: &Fleet, site: &str) -> Vec<serde_json::Value> {
    let (_, events) = fleet
        .edge(1)
        .admin("GET", &format!("/v1/sites/{site}/events?limit=1000"), None)
        .expect("events");
    events.as_array().cloned().unwrap_or_default()
}

/// Which edges' sidecars logged storing a certificate for `site`.
fn stored_by(fleet: &Fleet, site: &str) -> Vec<usize> {
    let needle = format!("site={site} ");
    EDGES
        .into_iter()
        .filter(|&e| {
            fleet
                .edge(e)
                .sidecar_logs()
                .lines()
                .any(|l| l.contains("certificate stored") && l.contains(&needle))
        })
        .collect()
}

fn create_site(fleet: &Fleet, edge: usize, site: &str, names: &[String]) {
    let (code, body) = fleet
        .edge(edge)
        .admin(
            "POST",
            "/v1/sites",
            Some(&json!({ "name": site, "primary": names[0], "hostnames": &names[1..] })),
        )
        .expect("admin API");
    assert_eq!(code, 201, "creating {site} on edge {edge}: {body}");
}

fn logs(fleet: &Fleet) -> String {
    EDGES
        .into_iter()
        .map(|e| {
            let text = fleet.edge(e).sidecar_logs();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- edge {e} sidecar (last 40 lines)\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// xorshift64*: small, seeded, reproducible.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn three_edges_share_one_postgresql_one_order_per_site_challenges_anywhere_changes_everywhere() {
    let started = Instant::now();
    let (mut fleet, _dir) = Fleet::start_in_temp_dir("fleet", &FleetOptions::default())
        .unwrap_or_else(|e| panic!("the fleet starts: {e:#}"));
    println!("fleet of 3 edges up in {:?}", started.elapsed());

    // 1. 30 sites through three nodes' APIs, each name's DNS on yet another edge.
    let phase = Instant::now();
    let orders_before = fleet.pebble_orders();
    let sites = 30;
    for i in 0..sites {
        let names = site_names(i);
        for name in &names {
            fleet.point_dns(name, (i + 1) % 3 + 1).expect("mock DNS");
        }
        create_site(&fleet, i % 3 + 1, &format!("s{i}"), &names);
    }
    let mut pending: Vec<usize> = (0..sites).collect();
    wait_until("30 sites issued", Duration::from_secs(90), || {
        pending.retain(|&i| {
            let names = covered(&fleet, 1, &format!("s{i}"));
            !site_names(i).iter().all(|n| names.contains(n))
        });
        pending.is_empty().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: still pending {pending:?}\n{}", logs(&fleet)));
    let issued_in = phase.elapsed();
    let mut per_node: BTreeMap<usize, usize> = BTreeMap::new();
    for i in 0..sites {
        for edge in stored_by(&fleet, &format!("s{i}")) {
            *per_node.entry(edge).or_default() += 1;
        }
    }
    assert_eq!(
        fleet.pebble_orders() - orders_before,
        sites,
        "exactly one order per site at Pebble"
    );
    assert_eq!(
        per_node.values().sum::<usize>(),
        sites,
        "each site's certificate stored by exactly one node: {per_node:?}"
    );
    let mut handshakes = 0;
    for i in 0..sites {
        for name in site_names(i) {
            for edge in EDGES {
                let page = fleet.https(edge, &name, "/").expect("curl");
                assert_eq!(
                    page.status, 200,
                    "{name} through edge {edge}: the issued certificate verifies"
                );
                handshakes += 1;
            }
        }
    }
    let accounts = fleet.sql("SELECT count(*) FROM accounts").expect("SQL");
    assert_eq!(accounts, [["1"]], "one ACME account for the fleet");
    println!(
        "1. {sites} sites issued in {issued_in:?} with {sites} orders at Pebble (certificates stored per node: {per_node:?}); {handshakes} verified handshakes through the 3 edges"
    );

    // 2. DNS at edge 2, the order placed by edge 1. The site first exists with a name that
    // points nowhere on the platform (its attempt fails the DNS pre-check, wherever it ran);
    // then edge 1 is given its lease, the name is pointed at edge 2 and edge 1 asked to
    // regenerate: only edge 1 may attempt it, and only edge 2 can answer the challenge.
    let relay = vec!["relay.fleet.test".to_string()];
    fleet.set_dns(&relay[0], "127.0.0.9").expect("mock DNS");
    create_site(&fleet, 1, "relay", &relay);
    wait_until("relay's failed pre-check", Duration::from_secs(30), || {
        events(&fleet, "relay")
            .iter()
            .any(|e| e["kind"] == "attempt-failed")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fleet)));
    let leased = fleet
        .sql(
            "UPDATE sites SET leased_by = 'edge-1',
                 leased_until = extract(epoch FROM now())::bigint + 600
             WHERE name = 'relay' AND leased_by IS NULL RETURNING name",
        )
        .expect("SQL");
    assert_eq!(leased.len(), 1, "relay's lease was free to give to edge 1");
    fleet.point_dns(&relay[0], 2).expect("mock DNS");
    let (code, body) = fleet
        .edge(1)
        .admin("POST", "/v1/sites/relay/regenerate", None)
        .expect("admin API");
    assert_eq!(code, 202, "{body}");
    wait_until("relay issued", Duration::from_secs(30), || {
        covered(&fleet, 2, "relay")
            .contains(&relay[0])
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fleet)));
    assert_eq!(
        stored_by(&fleet, "relay"),
        [1],
        "edge 1 placed relay's order"
    );
    for edge in EDGES {
        assert_eq!(fleet.https(edge, &relay[0], "/").expect("curl").status, 200);
    }
    println!(
        "2. relay.fleet.test (DNS → 127.0.0.2): ordered by edge 1, validated through edge 2, served by all 3 edges"
    );

    // 3. A policy change on node 3 is enforced by every Envoy.
    let changed = Instant::now();
    fleet
        .edge(3)
        .cli_ok(&["site", "https", "s0", "force"])
        .expect("site https force");
    let mut enforced = BTreeMap::new();
    while enforced.len() < EDGES.len() {
        for edge in EDGES {
            if !enforced.contains_key(&edge)
                && fleet
                    .http(edge, "s0.fleet.test", "/")
                    .is_ok_and(|r| r.status == 301)
            {
                enforced.insert(edge, changed.elapsed());
            }
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "force on node 3 not enforced by every edge within 5 s: {enforced:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("3. `site https s0 force` on node 3 → enforced (301) by each edge after {enforced:?}");

    // 4. The node holding a lease is SIGKILLed mid-order. The challenges table is locked so
    // the order stops where it publishes its key authorisation, after the order exists at
    // the CA and in the store: the kill always lands mid-order, at a seeded extra delay.
    let seed = std::env::var("FLEET_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut rng = seed;
    println!("4. kill point seed {seed} (replay with FLEET_SEED={seed})");
    let orders_before = fleet.pebble_orders();
    let resume = vec!["resume.fleet.test".to_string()];
    fleet.point_dns(&resume[0], 3).expect("mock DNS");
    let mut lock = postgres::Client::connect(&fleet.database_url, postgres::NoTls)
        .expect("connect to the fleet's PostgreSQL");
    let mut lock_tx = lock.transaction().expect("BEGIN");
    lock_tx
        .batch_execute("LOCK TABLE acme_challenges IN EXCLUSIVE MODE")
        .expect("lock the challenges");
    create_site(&fleet, 2, "resume", &resume);
    let (holder, order_url) =
        wait_until("resume's order in flight", Duration::from_secs(30), || {
            let rows = fleet
                .sql(
                    "SELECT s.leased_by, o.order_url FROM orders o JOIN sites s ON s.name = o.site
                 WHERE o.site = 'resume'",
                )
                .ok()?;
            let row = rows.first()?;
            let holder: usize = row[0].strip_prefix("edge-")?.parse().ok()?;
            Some((holder, row[1].clone()))
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fleet)));
    std::thread::sleep(Duration::from_millis(next_random(&mut rng) % 500));
    fleet.kill_sidecar(holder);
    let killed = Instant::now();
    lock_tx.rollback().expect("release the challenges");
    drop(lock);
    wait_until(
        "resume issued by another node",
        Duration::from_secs(60),
        || {
            covered(&fleet, holder % 3 + 1, "resume")
                .contains(&resume[0])
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fleet)));
    let resumed_in = killed.elapsed();
    let resumed_by = stored_by(&fleet, "resume");
    assert_eq!(resumed_by.len(), 1, "one node stored resume's certificate");
    assert_ne!(resumed_by[0], holder, "another node than the killed one");
    let resumed: Vec<String> = events(&fleet, "resume")
        .iter()
        .filter(|e| e["kind"] == "order-resumed")
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect();
    assert!(
        resumed.iter().any(|m| m.contains(&order_url)),
        "the same order {order_url} was resumed: {resumed:?}"
    );
    assert_eq!(
        fleet.pebble_orders() - orders_before,
        1,
        "0 duplicate orders at Pebble"
    );
    fleet
        .start_sidecar(holder)
        .unwrap_or_else(|e| panic!("edge {holder} restarts: {e:#}"));
    for edge in EDGES {
        assert_eq!(
            fleet.https(edge, &resume[0], "/").expect("curl").status,
            200
        );
    }
    println!(
        "4. edge {holder} SIGKILLed holding {order_url}; edge {} resumed that order {resumed_in:?} after the kill; 1 order at Pebble",
        resumed_by[0]
    );

    // 5. PostgreSQL stops for 20 s during traffic.
    let traffic_names: Vec<String> = (3..9).map(|i| format!("s{i}.fleet.test")).collect();
    fleet
        .edge(2)
        .cli_ok(&["site", "https", "s1", "force"])
        .expect("a change just before the outage");
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut turn = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let edge = EDGES[turn % 3];
                let name = &traffic_names[turn / 3 % traffic_names.len()];
                turn += 1;
                sent.fetch_add(1, Ordering::Relaxed);
                match fleet.https(edge, name, "/") {
                    Ok(page) if page.status == 200 => {}
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut list) = failures.lock() {
                            list.push(format!("{name} via edge {edge}: {other:?}"));
                        }
                    }
                }
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fleet.stop_database().expect("pg_ctl stop");
            let down = Instant::now();
            for edge in EDGES {
                let (code, body) =
                    wait_until("503 from the admin API", Duration::from_secs(10), || {
                        fleet
                            .edge(edge)
                            .admin("GET", "/v1/sites", None)
                            .ok()
                            .filter(|(code, _)| *code == 503)
                    })
                    .unwrap_or_else(|e| panic!("edge {edge}: {e:#}"));
                let message = body.to_string();
                assert!(
                    message.contains("PostgreSQL database is unavailable")
                        && message.contains("start it or fix store.url"),
                    "edge {edge} answered {code}: {message}"
                );
            }
            let rest = Duration::from_secs(20).saturating_sub(down.elapsed());
            std::thread::sleep(rest);
            fleet.start_database().expect("pg_ctl start");
            down.elapsed()
        }));
        stop.store(true, Ordering::Relaxed);
        match result {
            Ok(down) => println!("5. PostgreSQL down for {down:?}"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "HTTPS requests failed during the outage: {:?}",
        failures.lock().map(|l| l.clone()).unwrap_or_default()
    );
    assert!(sent > 30, "traffic ran during the outage: {sent} requests");
    let after = ["after.fleet.test".to_string()];
    fleet.point_dns(&after[0], 1).expect("mock DNS");
    let back = Instant::now();
    let (code, body) = wait_until("the admin API back", Duration::from_secs(30), || {
        fleet
            .edge(3)
            .admin(
                "POST",
                "/v1/sites",
                Some(&json!({ "name": "after", "primary": after[0] })),
            )
            .ok()
            .filter(|(code, _)| *code != 503)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fleet)));
    assert_eq!(code, 201, "{body}");
    wait_until("every edge converged", Duration::from_secs(60), || {
        EDGES
            .into_iter()
            .all(|edge| {
                fleet
                    .http(edge, "s1.fleet.test", "/")
                    .is_ok_and(|r| r.status == 301)
                    && fleet
                        .https(edge, &after[0], "/")
                        .is_ok_and(|r| r.status == 200)
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fleet)));
    println!(
        "5. {sent} HTTPS requests across the 3 edges during the outage, 0 failed; every edge answered 503; after the restart the change made before it and a new site converged on every edge in {:?}",
        back.elapsed()
    );

    // Over the whole run: one order per site at the CA (30 + relay + resume + after).
    assert_eq!(fleet.pebble_orders(), sites + 3, "orders at Pebble");
    println!(
        "{} orders at Pebble for {} sites; suite took {:?}",
        fleet.pebble_orders(),
        sites + 3,
        started.elapsed()
    );
}
