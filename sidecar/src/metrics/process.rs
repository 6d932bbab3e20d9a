//! The standard `process_*` metrics (the names every Prometheus client library uses), read
//! from Linux's `/proc/self`: CPU seconds, resident and virtual memory, open and maximum file
//! descriptors, start time. On other systems, or when `/proc` is unreadable, they are left out.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`): fixed at 100 by the kernel's
/// user-space ABI on the architectures this runs on.
const USER_HZ: f64 = 100.0;

/// What `/proc` says about this process now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessFacts {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub resident_memory_bytes: u64,
    /// Virtual memory, bytes.
    pub virtual_memory_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessFacts {
    /// Reads `/proc/self`; `None` when it is not there or not as expected.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Self::from_proc(&stat, &status, &boot, &limits, open_fds)
    }

    /// The facts from the text of `/proc/self/stat`, `/proc/self/status`, `/proc/stat` and
    /// `/proc/self/limits` (see proc(5)).
    pub fn from_proc(
        stat: &str,
        status: &str,
        boot: &str,
        limits: &str,
        open_fds: u64,
    ) -> Option<Self> {
        // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // fields[0] is field 3 (state): utime is field 14, stime 15, starttime 22, vsize 23.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks = field(14)? + field(15)?;
        let start_ticks = field(22)?;
        let virtual_memory_bytes = field(23)?;
        let resident_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let boot_time: u64 = boot
            .lines()
            .find_map(|line| line.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let max_fds = limits
            .lines()
            .find_map(|line| line.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|soft| soft.parse().ok());
        Some(Self {
            cpu_seconds: ticks as f64 / USER_HZ,
            resident_memory_bytes: resident_kib * 1024,
            virtual_memory_bytes,
            open_fds,
            max_fds,
            start_time_seconds: boot_time as f64 + start_ticks as f64 / USER_HZ,
        })
    }

    /// Registers the facts as `process_*` metrics (no prefix, as every client library does).
    pub fn register(&self, registry: &mut Registry) {
        let cpu = Counter::<f64, AtomicU64>::default();
        cpu.inc_by(self.cpu_seconds);
        registry.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            cpu,
        );
        let gauge = |value: u64| {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            gauge
        };
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            gauge(self.resident_memory_bytes),
        );
        registry.register(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            gauge(self.virtual_memory_bytes),
        );
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            gauge(self.open_fds),
        );
        if let Some(max) = self.max_fds {
            registry.register(
                "process_max_fds",
                "Maximum number of open file descriptors",
                gauge(max),
            );
        }
        let start = Gauge::<f64, AtomicU64>::default();
        start.set(self.start_time_seconds);
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            start,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// proc(5) layouts; the command name holds a space and a parenthesis on purpose.
    #[test]
    fn facts_are_read_from_proc_text() {
        let stat = "4242 (auto https) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 9 0 \
                    123456 987654321 2000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 17 1 0 0 0 0 0";
        let status = "Name:\tautohttps\nVmRSS:\t   20480 kB\nThreads:\t9\n";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 99\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        let facts = ProcessFacts::from_proc(stat, status, boot, limits, 17).expect("facts");
        assert_eq!(facts.cpu_seconds, 3.0);
        assert_eq!(facts.resident_memory_bytes, 20480 * 1024);
        assert_eq!(facts.virtual_memory_bytes, 987_654_321);
        assert_eq!(facts.open_fds, 17);
        assert_eq!(facts.max_fds, Some(1024));
        assert_eq!(facts.start_time_seconds, 1_700_000_000.0 + 1234.56);
        assert_eq!(
            ProcessFacts::from_proc("garbage", status, boot, limits, 1),
            None
        );
    }

    #[test]
    fn this_process_can_be_read() {
        let facts = ProcessFacts::read().expect("/proc/self on Linux");
        assert!(facts.resident_memory_bytes > 0);
        assert!(facts.open_fds > 0);
    }
}
