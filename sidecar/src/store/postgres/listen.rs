//! The change listener: `LISTEN autohttps_changes` on its own connection, bumping the store's
//! `sites_changed` and `certificates_changed` watches when any node commits a change (the
//! change-log triggers `NOTIFY`), with a slow reconciliation poll of the newest change sequence
//! as the safety net (a notification lost with a dropped connection is found there).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::connections::Shared;
use crate::error::Result;
use crate::store::{SITE_CHANGES_KEEP_ROWS, SITE_CHANGES_KEEP_SECS};

/// The notification channel the change-log triggers notify.
pub(super) const CHANNEL: &str = "autohttps_changes";

/// How often the listener looks up from waiting (to notice the store was dropped).
const WAKE_EVERY: Duration = Duration::from_millis(200);

/// How often each node's listener compacts the change log (also once per connection).
const COMPACT_EVERY: Duration = Duration::from_secs(600);

/// How long to wait before reconnecting after the database went away.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Starts the listener thread; it ends soon after the store is dropped.
pub(super) fn start(shared: Arc<Shared>, reconcile_every: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("autohttps-pg-listen".into())
        .spawn(move || {
            let mut seen = 0;
            while !shared.stopping.load(Ordering::SeqCst) {
                if let Err(error) = listen(&shared, reconcile_every, &mut seen) {
                    tracing::warn!(%error, "PostgreSQL change listener lost its connection; reconnecting");
                    let resume_at = Instant::now() + RECONNECT_AFTER;
                    while Instant::now() < resume_at && !shared.stopping.load(Ordering::SeqCst) {
                        std::thread::sleep(WAKE_EVERY);
                    }
                }
            }
        })
        .map(drop)
}

/// The newest change sequence number.
fn latest_seq(client: &mut Client) -> Result<u64> {
    let latest: i64 = client
        .query_one("SELECT COALESCE(MAX(seq), 0) FROM site_changes", &[])?
        .try_get(0)?;
    Ok(u64::try_from(latest).unwrap_or(0))
}

/// Compacts the change log to [`SITE_CHANGES_KEEP_ROWS`] rows or [`SITE_CHANGES_KEEP_SECS`];
/// a failure is logged and retried at the next turn.
fn compact(client: &mut Client) {
    match super::compact_site_changes(
        client,
        SITE_CHANGES_KEEP_ROWS,
        SITE_CHANGES_KEEP_SECS,
        time::OffsetDateTime::now_utc(),
    ) {
        Ok(0) => {}
        Ok(deleted) => tracing::debug!(deleted, "compacted the store's change log"),
        Err(error) => {
            tracing::warn!(%error, "compacting the store's change log failed; it is retried later");
        }
    }
}

/// One connection's life: listens until the connection fails or the store is dropped.
fn listen(shared: &Shared, reconcile_every: Duration, seen: &mut u64) -> Result<()> {
    let mut client = shared.connect()?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    // Changes committed while this node was not listening are caught here.
    let latest = latest_seq(&mut client)?;
    if latest != *seen {
        *seen = latest;
        shared.bump_sites();
        shared.bump_certificates();
    }
    compact(&mut client);
    let mut compacted_at = Instant::now();
    let mut reconciled_at = Instant::now();
    while !shared.stopping.load(Ordering::SeqCst) {
        {
            let mut notifications = client.notifications();
            let mut waiting = notifications.timeout_iter(WAKE_EVERY);
            while let Some(notification) = waiting.next()? {
                let seq = notification.payload().parse::<u64>().unwrap_or(0);
                *seen = (*seen).max(seq);
                shared.bump_sites();
                shared.bump_certificates();
                if shared.stopping.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
        }
        if compacted_at.elapsed() >= COMPACT_EVERY {
            compacted_at = Instant::now();
            compact(&mut client);
        }
        if reconciled_at.elapsed() >= reconcile_every {
            reconciled_at = Instant::now();
            let latest = latest_seq(&mut client)?;
            if latest > *seen {
                tracing::debug!(
                    latest,
                    seen = *seen,
                    "reconciliation found changes no notification announced"
                );
                *seen = latest;
                shared.bump_sites();
                shared.bump_certificates();
            }
        }
    }
    Ok(())
}
