//! A real browser for the suites: headless Chromium (Debian `chromium`) driven over W3C
//! WebDriver through `chromedriver` (Debian `chromium-driver`), with a WebDriver client of a
//! few commands spoken over curl, as the other harnesses speak HTTP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::envoy::{Lifetime, curl, free_port};
use autohttps_kit::{Process, wait_until};

/// The key W3C WebDriver names an element reference by.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session; the browser and its driver are stopped when dropped.
#[derive(Debug)]
pub struct Browser {
    base: String,
    session: String,
    _driver: Process,
}

/// An element of the current page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium whose profile and driver log live in `dir`,
    /// with a window of 1400×1000 (the size of the screenshots).
    pub fn start(dir: &Path) -> anyhow::Result<Browser> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut driver = Process::spawn(
            "chromedriver",
            Path::new("chromedriver"),
            &[&format!("--port={port}"), "--allowed-ips=127.0.0.1"],
            &[],
            dir.join("chromedriver.log"),
            Lifetime::Limited(Duration::from_secs(30 * 60)),
        )
        .context("chromedriver starts (make tools installs chromium-driver)")?;
        let base = format!("http://127.0.0.1:{port}");
        let status_url = format!("{base}/status");
        wait_until("chromedriver", Duration::from_secs(20), || {
            if driver.exited() {
                return None;
            }
            curl(&[&status_url])
                .ok()
                .filter(|r| r.status == 200 && r.body.contains("\"ready\":true"))
        })
        .map_err(|e| anyhow!("{e:#}\nchromedriver's log:\n{}", driver.log_tail(20)))?;
        let profile = dir.join("chromium-profile");
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-dev-shm-usage",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let answer = send(&base, "POST", "/session", Some(&capabilities))
            .map_err(|e| anyhow!("{e:#}\nchromedriver's log:\n{}", driver.log_tail(30)))?;
        let session = answer["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {answer}"))?
            .to_owned();
        Ok(Browser {
            base,
            session,
            _driver: driver,
        })
    }

    fn command(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        send(
            &self.base,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    /// Loads a URL and waits for the page to load.
    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command("POST", "/url", Some(&json!({ "url": url })))
            .map(drop)
    }

    /// The current page's URL.
    pub fn url(&self) -> anyhow::Result<String> {
        Ok(self
            .command("GET", "/url", None)?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// The first element matching a CSS selector.
    pub fn find(&self, css: &str) -> anyhow::Result<Element> {
        let found = self
            .command(
                "POST",
                "/element",
                Some(&json!({ "using": "css selector", "value": css })),
            )
            .with_context(|| format!("finding {css}"))?;
        found[ELEMENT_KEY]
            .as_str()
            .map(|id| Element(id.to_owned()))
            .ok_or_else(|| anyhow!("no element reference for {css} in {found}"))
    }

    /// Waits until an element matching `css` has text for which `accept` holds; returns it.
    pub fn wait_for_text(
        &self,
        css: &str,
        within: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let mut last = String::new();
        wait_until(&format!("text of {css}"), within, || {
            let text = self.find(css).and_then(|e| self.text(&e)).ok()?;
            last.clone_from(&text);
            accept(&text).then_some(text)
        })
        .map_err(|e| anyhow!("{e:#}; its text was {last:?}"))
    }

    /// An element's rendered text.
    pub fn text(&self, element: &Element) -> anyhow::Result<String> {
        Ok(self
            .command("GET", &format!("/element/{}/text", element.0), None)?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// Clicks an element.
    pub fn click(&self, element: &Element) -> anyhow::Result<()> {
        self.command(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(&json!({})),
        )
        .map(drop)
    }

    /// Clears a text field, then types `text` into it (input events fire as for a person).
    pub fn type_into(&self, element: &Element, text: &str) -> anyhow::Result<()> {
        self.command(
            "POST",
            &format!("/element/{}/clear", element.0),
            Some(&json!({})),
        )?;
        self.command(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(&json!({ "text": text })),
        )
        .map(drop)
    }

    /// Resizes the window (what a screenshot shows).
    pub fn set_window_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.command(
            "POST",
            "/window/rect",
            Some(&json!({ "width": width, "height": height })),
        )
        .map(drop)
    }

    /// Picks the option with this value in a `<select>` (by clicking it, so `change` fires).
    pub fn select(&self, select_css: &str, value: &str) -> anyhow::Result<()> {
        let option = self.find(&format!("{select_css} option[value=\"{value}\"]"))?;
        self.click(&option)
    }

    /// Runs a script in the page (`arguments` are `args`) and returns its result.
    pub fn execute(&self, script: &str, args: &[Value]) -> anyhow::Result<Value> {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// Runs an asynchronous script: it ends by calling its last argument with the result.
    pub fn execute_async(&self, script: &str, args: &[Value]) -> anyhow::Result<Value> {
        self.command(
            "POST",
            "/execute/async",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The cookies the page's origin has (including HttpOnly ones: WebDriver sees them all).
    pub fn cookies(&self) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .command("GET", "/cookie", None)?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub fn screenshot(&self, path: &Path) -> anyhow::Result<PathBuf> {
        let encoded = self.command("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or(""))
            .context("the screenshot is not base64")?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, png)?;
        Ok(path.to_path_buf())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session, which closes Chromium; the driver is then stopped by its Process.
        let _ = send(
            &self.base,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

/// One WebDriver command: its `value`, or the driver's error.
fn send(base: &str, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let url = format!("{base}{path}");
    let body_text = body.map(Value::to_string);
    let mut args = vec![
        "--max-time",
        "60",
        "-X",
        method,
        "-H",
        "content-type: application/json",
    ];
    if let Some(text) = &body_text {
        args.extend(["--data-binary", text.as_str()]);
    }
    args.push(&url);
    let response = curl(&args)?;
    let answer: Value = serde_json::from_str(&response.body)
        .with_context(|| format!("WebDriver {method} {path} answered non-JSON"))?;
    if response.status != 200 {
        bail!(
            "WebDriver {method} {path} failed ({}): {} {}",
            response.status,
            answer["value"]["error"],
            answer["value"]["message"]
        );
    }
    Ok(answer["value"].clone())
}
