//! JUnit XML for CI systems that show test reports: one `<testsuite>`, one `<testcase>` per
//! case, a `<failure>` carrying the diff.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

/// One case's result.
#[derive(Debug, Clone)]
pub(crate) struct CaseReport {
    pub(crate) name: String,
    /// The diff, when it failed.
    pub(crate) failure: Option<String>,
    pub(crate) time: Duration,
}

/// Writes the report for the cases of `cases_path` to `out`.
pub(crate) fn write_junit(
    out: &Path,
    cases_path: &Path,
    build: &str,
    reports: &[CaseReport],
    elapsed: Duration,
) -> anyhow::Result<()> {
    let suite = cases_path.display().to_string();
    let failures = reports.iter().filter(|r| r.failure.is_some()).count();
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuites name=\"autohttps-policy\" tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">",
        reports.len(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        xml,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{:.3}\">",
        escape(&suite),
        reports.len(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        xml,
        "    <properties><property name=\"wasm\" value=\"{}\"/></properties>",
        escape(build)
    );
    for report in reports {
        let _ = write!(
            xml,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            escape(&suite),
            escape(&report.name),
            report.time.as_secs_f64()
        );
        match &report.failure {
            None => xml.push_str("/>\n"),
            Some(diff) => {
                let _ = writeln!(
                    xml,
                    ">\n      <failure message=\"the response differs from the expectation\">{}</failure>\n    </testcase>",
                    escape(diff)
                );
            }
        }
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    std::fs::write(out, xml)
        .with_context(|| format!("cannot write the JUnit report {}", out.display()))
}

/// Escapes text for an XML attribute or element; control characters XML 1.0 cannot carry
/// become `?`.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            '\n' | '\t' | '\r' => escaped.push(c),
            c if (c as u32) < 0x20 => escaped.push('?'),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_control_bytes() {
        assert_eq!(escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot;?");
    }
}
