//! The bench's settings (environment knobs) and the machine it ran on.

use super::*;

/// A number from the environment variable `name`, or `default` when it is unset.
pub(crate) fn env_number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

pub(crate) struct Settings {
    pub(crate) rounds: usize,
    pub(crate) seconds: u64,
    pub(crate) sizes: Vec<usize>,
    pub(crate) out: PathBuf,
}

impl Settings {
    pub(crate) fn from_env() -> anyhow::Result<Settings> {
        let number = |name: &str, default: u64| env_number(name, default);
        let sizes = match std::env::var("BENCH_SIZES") {
            Ok(v) => v
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("BENCH_SIZES={v:?} is not a list of numbers"))?,
            Err(_) => vec![10, 1_000, 10_000, 100_000],
        };
        if sizes.is_empty() || sizes.contains(&0) {
            bail!("BENCH_SIZES needs at least one size, each more than 0");
        }
        let out = std::env::var_os("BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("tests/bench/RESULTS.md"));
        Ok(Settings {
            rounds: usize::try_from(number("BENCH_ROUNDS", 5)?)?.max(1),
            seconds: number("BENCH_SECONDS", 5)?.max(1),
            sizes,
            out,
        })
    }

    /// The size whose filter Envoy carries the headline comparison: 10,000 sites when measured.
    pub(crate) fn headline(&self) -> usize {
        if self.sizes.contains(&10_000) {
            10_000
        } else {
            self.sizes[self.sizes.len() / 2]
        }
    }
}

pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory: String,
    pub(crate) kernel: String,
    pub(crate) envoy: String,
    pub(crate) nginx: String,
    pub(crate) wrk: String,
    pub(crate) rustc: String,
    pub(crate) commit: String,
    pub(crate) date: String,
    pub(crate) load_start: String,
}

pub(crate) fn command_text(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_string()
        }
        Err(_) => format!("({program} not found)"),
    }
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

impl Machine {
    pub(crate) fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let kb: u64 = m
                    .lines()
                    .find(|l| l.starts_with("MemTotal:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some(format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
            })
            .unwrap_or_else(|| "?".into());
        let envoy = envoy_binary()
            .map(|p| command_text(&p.to_string_lossy(), &["--version"]))
            .unwrap_or_else(|e| e.to_string());
        // "envoy  version: <hash>/1.40.0/Clean/RELEASE/BoringSSL"
        let envoy = envoy
            .split_whitespace()
            .last()
            .and_then(|w| w.split('/').nth(1))
            .unwrap_or(&envoy)
            .to_string();
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory,
            kernel: command_text("uname", &["-srm"]),
            envoy,
            nginx: command_text("nginx", &["-v"]),
            wrk: command_text("wrk", &["-v"])
                .split(" [")
                .next()
                .unwrap_or("")
                .to_string(),
            rustc: command_text("rustc", &["-V"]),
            commit: command_text(
                "git",
                &[
                    "-C",
                    &repo_root().to_string_lossy(),
                    "describe",
                    "--always",
                    "--dirty",
                ],
            ),
            date: command_text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_start: load_average(),
        }
    }

    pub(crate) fn summary(&self) -> String {
        format!(
            "{} ({} cores), load average {}",
            self.cpu, self.cores, self.load_start
        )
    }
}
