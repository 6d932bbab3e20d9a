//! The host's controllable clock: proxy-wasm time and the guest's WASI clocks read the same value.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// Default start of the clock: 2025-01-01T00:00:00Z, so runs are reproducible.
pub(crate) const DEFAULT_START_UNIX_NANOS: u64 = 1_735_689_600_000_000_000;

/// Nanoseconds since the Unix epoch, shared by the host and the WASI clocks it hands the guest.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    now_unix_nanos: Arc<AtomicU64>,
    start_unix_nanos: u64,
}

impl Clock {
    pub(crate) fn starting_at(start: SystemTime) -> Self {
        let nanos = start
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self {
            now_unix_nanos: Arc::new(AtomicU64::new(nanos)),
            start_unix_nanos: nanos,
        }
    }

    pub(crate) fn now_unix_nanos(&self) -> u64 {
        self.now_unix_nanos.load(Ordering::SeqCst)
    }

    pub(crate) fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.now_unix_nanos())
    }

    pub(crate) fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update cannot fail with a closure that always returns Some.
        let _ = self
            .now_unix_nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(by))
            });
    }

    /// Nanoseconds since the host started: the guest's monotonic clock.
    fn monotonic_nanos(&self) -> u64 {
        self.now_unix_nanos().saturating_sub(self.start_unix_nanos)
    }
}

impl HostWallClock for Clock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_unix_nanos())
    }
}

impl HostMonotonicClock for Clock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.monotonic_nanos()
    }
}
