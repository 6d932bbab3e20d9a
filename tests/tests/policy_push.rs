//! End to end: a policy change is pushed to every filter VM of an Envoy with two workers.
//!
//! A real sidecar, Pebble and an Envoy started with `--concurrency 2` (one filter VM per worker
//! plus the main thread's) whose filter polls only once a minute, so within the bound asserted
//! here a change can arrive only through the feed's long poll. Each change is a `PATCH` through
//! the admin API; what counts as arrived is what Envoy itself logs: the filter's
//! `policy "<version>" applied (delta …)` line, stamped by Envoy with the thread that wrote it,
//! from every root context on the main thread and on both workers.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use autohttps_kit::envoy::policy_applied_lines;
use autohttps_tests::stack::{Stack, wait_until};
use serde_json::json;

/// The filter's fallback poll in this test: a minute, far longer than [`PUSH_BOUND`] and than
/// [`FIRST_FETCH_BOUND`].
const FALLBACK_POLL_MS: u64 = 60_000;
/// How long a new VM may take to fetch its first policy: it asks at once (its first tick comes
/// 1 ms after it is configured), not one fallback poll later.
const FIRST_FETCH_BOUND: Duration = Duration::from_secs(15);
/// How long a change may take to reach every VM (from the API call to the last VM's log line
/// being read back): a twelfth of the fallback poll.
const PUSH_BOUND: Duration = Duration::from_secs(5);
/// Envoy's worker threads.
const WORKERS: u32 = 2;
/// Changes made, each timed.
const CHANGES: usize = 6;
const SITES: [(&str, &str); 2] = [("pa", "pa.push.test"), ("pb", "pb.push.test")];

/// How many "policy … applied" lines each Envoy thread logged for version `n` or newer.
fn applied_per_thread(log: &str, n: u64) -> BTreeMap<String, usize> {
    let mut per_thread: BTreeMap<String, usize> = BTreeMap::new();
    for line in policy_applied_lines(log)
        .iter()
        .filter(|l| l.n() >= Some(n))
    {
        *per_thread.entry(line.thread.clone()).or_default() += 1;
    }
    per_thread
}

/// The feed's current version's `n`, read from the sidecar's internal listener.
fn feed_version(stack: &Stack) -> u64 {
    let response = autohttps_kit::http::curl(&[&format!(
        "http://127.0.0.1:{}/v1/policy",
        stack.ports.sidecar_internal
    )])
    .expect("the feed answers");
    let etag = response.header("etag").expect("the feed sends an ETag");
    etag.trim_matches('"')
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("a version <epoch>-<n>, not {etag}"))
}

#[test]
fn a_change_is_pushed_to_every_worker_and_the_main_thread_not_polled() {
    let (mut stack, _dir) =
        Stack::start_in_temp_dir("push").unwrap_or_else(|e| panic!("the stack starts: {e:#}"));
    for (site, primary) in SITES {
        let (status, body) = stack
            .admin(
                "POST",
                "/v1/sites",
                Some(&json!({ "name": site, "primary": primary })),
            )
            .expect("create site");
        assert!(status == 201 || status == 200, "{status} {body}");
    }
    for (_, primary) in SITES {
        wait_until(
            &format!("HTTPS for {primary}"),
            Duration::from_secs(60),
            || stack.https(primary, "/").ok().filter(|r| r.status == 200),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.sidecar_logs()));
    }
    stack
        .restart_envoy_with(WORKERS, Some(FALLBACK_POLL_MS))
        .expect("Envoy restarts with two workers");

    // Every root context takes a snapshot of the current version at its first tick, right
    // after start; their number per thread (one per listener's filter) is settled a moment
    // after every thread has one.
    let settled = feed_version(&stack);
    let contexts: BTreeMap<String, usize> =
        wait_until("every VM's snapshot", FIRST_FETCH_BOUND, || {
            let per_thread = applied_per_thread(&stack.envoy().log(), settled);
            (per_thread.len() > WORKERS as usize).then_some(per_thread)
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.envoy().log_tail(30)));
    std::thread::sleep(Duration::from_secs(1));
    let contexts: BTreeMap<String, usize> = {
        let per_thread = applied_per_thread(&stack.envoy().log(), settled);
        assert!(per_thread.len() >= contexts.len());
        per_thread
    };
    assert_eq!(
        contexts.len(),
        WORKERS as usize + 1,
        "the main thread and each worker run a VM: {contexts:?}"
    );

    let mut took = Vec::new();
    for i in 0..CHANGES {
        let (site, _) = SITES[i % SITES.len()];
        let mode = if (i / SITES.len()).is_multiple_of(2) {
            "force"
        } else {
            "auto"
        };
        let offset = stack.envoy().log().len();
        let started = Instant::now();
        let (status, body) = stack
            .admin(
                "PATCH",
                &format!("/v1/sites/{site}"),
                Some(&json!({ "https": mode })),
            )
            .expect("patch site");
        assert_eq!(status, 200, "{body}");
        let version = feed_version(&stack);
        let arrived = wait_until(
            &format!("change {i} ({site} → {mode}, version n={version}) on every VM"),
            PUSH_BOUND,
            || {
                let log = stack.envoy().log();
                let lines = policy_applied_lines(log.get(offset..).unwrap_or_default());
                let mut per_thread: BTreeMap<&str, usize> = BTreeMap::new();
                for line in lines.iter().filter(|l| l.n() >= Some(version)) {
                    *per_thread.entry(line.thread.as_str()).or_default() += 1;
                }
                let everywhere = contexts
                    .iter()
                    .all(|(thread, n)| per_thread.get(thread.as_str()) >= Some(n));
                everywhere.then_some(lines)
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}: pushed changes must not wait for the {FALLBACK_POLL_MS} ms poll\n{}",
                stack.envoy().log_tail(30)
            )
        });
        took.push(started.elapsed());
        let snapshots: BTreeSet<&str> = arrived
            .iter()
            .filter(|line| !line.delta)
            .map(|line| line.thread.as_str())
            .collect();
        assert!(
            snapshots.is_empty(),
            "change {i} reached {snapshots:?} as a snapshot, not a delta"
        );
    }
    took.sort();
    println!(
        "{CHANGES} changes, API call -> every VM's log line read back: median {:?}, max {:?} (bound {PUSH_BOUND:?}, fallback poll {FALLBACK_POLL_MS} ms)",
        took[took.len() / 2],
        took[took.len() - 1]
    );

    // The last flips left every site in force: whichever worker takes a fresh connection
    // redirects.
    for (_, primary) in SITES {
        for _ in 0..6 {
            let response = stack.http(primary, "/").expect("HTTP answers");
            assert_eq!(
                response.status, 301,
                "{primary} is in force on every worker"
            );
        }
    }
}
