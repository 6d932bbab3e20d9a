//! The wrk driver: one load run against one setup, and what it measured.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Redirect,
    Csp,
    Ok,
}

pub(crate) struct Setup {
    pub(crate) key: String,
    pub(crate) label: String,
    pub(crate) url: String,
    pub(crate) host: String,
    pub(crate) expect: Expect,
}

impl Setup {
    /// One request with curl: the setup answers what the benchmark assumes it answers.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-k",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "--max-time",
                "10",
            ])
            .args(["--noproxy", "*", "-H"])
            .arg(format!("Host: {}", self.host))
            .arg(&self.url)
            .output()
            .context("running curl")?;
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let status_line = head.lines().next().unwrap_or("").to_string();
        let fine = match self.expect {
            Expect::Redirect => {
                status_line.contains(" 301")
                    && head.contains(&format!("location: https://{}/index.html", self.host))
            }
            Expect::Csp => {
                status_line.contains(" 200")
                    && head.contains("content-security-policy: upgrade-insecure-requests")
            }
            Expect::Ok => status_line.contains(" 200"),
        };
        if !fine {
            bail!(
                "{} ({}) did not answer as expected:\n{}",
                self.label,
                self.url,
                head.trim()
            );
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct WrkRun {
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) errors: u64,
}

pub(crate) fn duration_us(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => value,
        "ms" => value * 1e3,
        "s" => value * 1e6,
        "m" => value * 60e6,
        _ => return None,
    })
}

pub(crate) fn wrk(setup: &Setup, seconds: u64) -> anyhow::Result<WrkRun> {
    let out = Command::new("timeout")
        .arg((seconds + 30).to_string())
        .arg("wrk")
        .args(["-t1", "-c", WRK_CONNECTIONS, "--latency", "-d"])
        .arg(format!("{seconds}s"))
        .arg("-H")
        .arg(format!("Host: {}", setup.host))
        .arg(&setup.url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed on {}: {}{}",
            setup.label,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut run = WrkRun {
        rps: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        errors: 0,
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => run.rps = value.parse().unwrap_or(f64::NAN),
            ["50%", value] => run.p50_us = duration_us(value).unwrap_or(f64::NAN),
            ["99%", value] => run.p99_us = duration_us(value).unwrap_or(f64::NAN),
            ["Non-2xx", "or", "3xx", "responses:", value] => {
                run.errors += value.parse::<u64>().unwrap_or(0);
            }
            ["Socket", "errors:", rest @ ..] => {
                run.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if run.rps.is_nan() {
        bail!("could not read wrk's output for {}:\n{text}", setup.label);
    }
    Ok(run)
}
