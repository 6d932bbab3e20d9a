//! The `autohttps` command line: `serve`, and subcommands that talk to the admin API.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::config::Config;
use crate::error::{Error, Result};

/// Free, automatic HTTPS for every site: the autohttps sidecar and its admin CLI.
#[derive(Debug, Parser)]
#[command(name = "autohttps", version)]
pub struct Cli {
    /// The configuration file (TOML); also tells the CLI where the admin API and token are.
    #[arg(long, global = true, env = "AUTOHTTPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin API base URL (default: from the config, http://127.0.0.1:8081).
    #[arg(long, global = true, env = "AUTOHTTPS_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Admin bearer token (default: admin.token, or <data_dir>/admin-token).
    #[arg(
        long,
        global = true,
        env = "AUTOHTTPS_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar (admin API, HTTP-01 responder, issuance and renewal).
    Serve,
    /// Manage sites.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Add or remove a site's subdomains and aliases.
    #[command(subcommand)]
    Host(HostCommand),
    /// Certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Explain why a hostname has (or has no) working HTTPS, and how to fix it.
    Diagnose {
        /// The hostname.
        hostname: String,
    },
}

/// `site …`.
#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Create a site; its certificate is ordered automatically.
    Add {
        /// Site name (lower-case letters, digits, '-').
        name: String,
        /// Primary domain.
        primary: String,
        /// More hostnames (subdomains or aliases); repeatable.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// HTTPS mode.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        https: Mode,
        /// Waiting for the resulting issuance.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List sites.
    List,
    /// Show a site, its certificates and recent events.
    Show {
        /// Site name.
        name: String,
    },
    /// Remove a site and its certificates.
    Remove {
        /// Site name.
        name: String,
    },
    /// The `http://` resources browsers reported for a site's pages (mixed-content `report` mode).
    MixedContent {
        /// Site name.
        name: String,
    },
    /// Set a site's HTTPS mode.
    Https {
        /// Site name.
        name: String,
        /// auto, force or disable.
        #[arg(value_enum)]
        mode: Mode,
    },
}

/// `host …`.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Add a subdomain or alias; the certificate is re-issued to include it.
    Add {
        /// Site name.
        site: String,
        /// Hostname.
        hostname: String,
        /// Waiting for the resulting issuance.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a subdomain or alias.
    Remove {
        /// Site name.
        site: String,
        /// Hostname.
        hostname: String,
    },
}

/// `cert …`.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Order new certificates for a site now.
    Regenerate {
        /// Site name.
        site: String,
        /// Waiting for the resulting issuance.
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// Waiting for issuance.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until the resulting issuance attempt finishes, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
}

/// HTTPS modes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// HTTP and HTTPS both served.
    Auto,
    /// Redirect HTTP to HTTPS.
    Force,
    /// Redirect HTTPS to HTTP.
    Disable,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Force => "force",
            Self::Disable => "disable",
        }
    }
}

/// A client of the admin API.
#[derive(Debug)]
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// Resolves the URL and token from flags, then the config file, then defaults.
    pub fn from_cli(cli: &Cli) -> Result<Self> {
        let config = Config::load(cli.config.as_deref())?;
        let base = cli
            .admin_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.listen.admin));
        let token = match &cli.token {
            Some(token) => token.clone(),
            None => match &config.admin.token {
                Some(token) => token.clone(),
                None => std::fs::read_to_string(config.admin_token_path())
                    .map(|t| t.trim().to_owned())
                    .map_err(|_| {
                        Error::Config(format!(
                            "no admin token: pass --token, set AUTOHTTPS_ADMIN_TOKEN, or run where {} exists",
                            config.admin_token_path().display()
                        ))
                    })?,
            },
        };
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: reqwest::Client::new(),
        })
    }

    /// Sends a request; a non-2xx answer becomes an error carrying the API's message.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| {
            Error::Config(format!(
                "cannot reach the admin API at {}: {e}; is `autohttps serve` running?",
                self.base
            ))
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_owned);
        Err(match status.as_u16() {
            400 | 422 => Error::InvalidInput(message),
            404 => Error::NotFound(message),
            409 => Error::Conflict(message),
            _ => Error::Config(format!("admin API answered {status}: {message}")),
        })
    }
}

/// Runs a CLI subcommand (anything but `serve`), printing to stdout; progress goes to stderr.
pub async fn run(cli: &Cli) -> Result<()> {
    use reqwest::Method;
    let client = AdminClient::from_cli(cli)?;
    let out = |value: &Value, human: &dyn Fn(&Value) -> String| {
        if cli.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
        } else {
            println!("{}", human(value));
        }
    };
    match &cli.command {
        Command::Serve => Err(Error::InvalidInput(
            "`serve` is not an admin command".into(),
        )),
        Command::Site(SiteCommand::Add {
            name,
            primary,
            hosts,
            https,
            wait,
        }) => {
            // A new site has no earlier events: everything in its log follows this request.
            let since = 0;
            let site = client
                .call(
                    Method::POST,
                    "/v1/sites",
                    Some(json!({ "name": name, "primary": primary, "hostnames": hosts, "https": https.as_str() })),
                )
                .await?;
            out(&site, &|s| {
                format!("created site {}\n{}", name, describe_site(s))
            });
            wait_if_asked(&client, name, wait, since, cli.json).await
        }
        Command::Site(SiteCommand::List) => {
            let sites = client.call(Method::GET, "/v1/sites", None).await?;
            out(&sites, &|v| {
                let rows: Vec<String> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        format!(
                            "{:<20} {:<8} {}",
                            s["name"].as_str().unwrap_or(""),
                            s["policy"]["https"].as_str().unwrap_or(""),
                            hostnames(s).join(", ")
                        )
                    })
                    .collect();
                if rows.is_empty() {
                    "no sites; add one with `autohttps site add <name> <domain>`".into()
                } else {
                    rows.join("\n")
                }
            });
            Ok(())
        }
        Command::Site(SiteCommand::Show { name }) => {
            let site = client
                .call(Method::GET, &format!("/v1/sites/{name}"), None)
                .await?;
            let certificates = client
                .call(Method::GET, &format!("/v1/sites/{name}/certificates"), None)
                .await?;
            let events = client
                .call(
                    Method::GET,
                    &format!("/v1/sites/{name}/events?limit=10"),
                    None,
                )
                .await?;
            let all = json!({ "site": site, "certificates": certificates, "events": events });
            out(&all, &|v| {
                let mut text = describe_site(&v["site"]);
                text.push_str(&describe_certificates(&v["certificates"]));
                text.push_str("\nrecent events:\n");
                for event in v["events"].as_array().into_iter().flatten() {
                    text.push_str(&format!(
                        "  {} {:<20} {}\n",
                        event["at"].as_str().unwrap_or(""),
                        event["kind"].as_str().unwrap_or(""),
                        event["message"].as_str().unwrap_or("")
                    ));
                }
                text
            });
            Ok(())
        }
        Command::Site(SiteCommand::Remove { name }) => {
            client
                .call(Method::DELETE, &format!("/v1/sites/{name}"), None)
                .await?;
            out(&json!({ "removed": name }), &|_| {
                format!("removed site {name}")
            });
            Ok(())
        }
        Command::Site(SiteCommand::MixedContent { name }) => {
            let findings = client
                .call(
                    Method::GET,
                    &format!("/v1/sites/{name}/mixed-content"),
                    None,
                )
                .await?;
            out(&findings, &|v| {
                let list = v.as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    return format!(
                        "no mixed content reported for {name} (reports arrive while the site's mixed_content is \"report\" and browsers load its pages over HTTPS)"
                    );
                }
                let mut text = format!("pages of {name} that load insecure resources:\n");
                let mut page = "";
                for finding in &list {
                    let this_page = finding["page"].as_str().unwrap_or("");
                    if this_page != page {
                        text.push_str(&format!("  {this_page}\n"));
                        page = this_page;
                    }
                    text.push_str(&format!(
                        "    {} ({}, {} report(s), last {})\n",
                        finding["resource"].as_str().unwrap_or(""),
                        finding["directive"].as_str().unwrap_or(""),
                        finding["reports"],
                        finding["last_seen"].as_str().unwrap_or("")
                    ));
                }
                text.push_str("fix: load these over https:// (or switch the site to mixed_content \"upgrade\")");
                text
            });
            Ok(())
        }
        Command::Site(SiteCommand::Https { name, mode }) => {
            let site = client
                .call(
                    Method::PATCH,
                    &format!("/v1/sites/{name}"),
                    Some(json!({ "https": mode.as_str() })),
                )
                .await?;
            out(&site, &|_| format!("site {name}: https {}", mode.as_str()));
            Ok(())
        }
        Command::Host(HostCommand::Add {
            site,
            hostname,
            wait,
        }) => {
            let since = newest_event_if_waiting(&client, site, wait).await?;
            let updated = client
                .call(
                    Method::POST,
                    &format!("/v1/sites/{site}/hostnames"),
                    Some(json!({ "hostname": hostname })),
                )
                .await?;
            out(&updated, &|s| {
                format!("added {hostname} to {site}\n{}", describe_site(s))
            });
            wait_if_asked(&client, site, wait, since, cli.json).await
        }
        Command::Host(HostCommand::Remove { site, hostname }) => {
            let updated = client
                .call(
                    Method::DELETE,
                    &format!("/v1/sites/{site}/hostnames/{hostname}"),
                    None,
                )
                .await?;
            out(&updated, &|s| {
                format!("removed {hostname} from {site}\n{}", describe_site(s))
            });
            Ok(())
        }
        Command::Cert(CertCommand::Regenerate { site, wait }) => {
            let since = newest_event_if_waiting(&client, site, wait).await?;
            let answer = client
                .call(Method::POST, &format!("/v1/sites/{site}/regenerate"), None)
                .await?;
            out(&answer, &|_| format!("regeneration of {site} scheduled"));
            wait_if_asked(&client, site, wait, since, cli.json).await
        }
        Command::Diagnose { hostname } => {
            let diagnosis = client
                .call(Method::GET, &format!("/v1/diagnose/{hostname}"), None)
                .await?;
            out(&diagnosis, &describe_diagnosis);
            Ok(())
        }
    }
}

fn hostnames(site: &Value) -> Vec<String> {
    site["hostnames"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            format!(
                "{} ({})",
                h["name"].as_str().unwrap_or(""),
                h["kind"].as_str().unwrap_or("")
            )
        })
        .collect()
}

fn describe_site(site: &Value) -> String {
    format!(
        "site {}  https={}  hostnames: {}\n",
        site["name"].as_str().unwrap_or(""),
        site["policy"]["https"].as_str().unwrap_or(""),
        hostnames(site).join(", ")
    )
}

fn describe_certificates(status: &Value) -> String {
    let mut text = String::new();
    for certificate in status["certificates"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "certificate {} valid until {} for {}\n",
            certificate["serial"].as_str().unwrap_or(""),
            certificate["not_after"].as_str().unwrap_or(""),
            certificate["names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let uncovered: Vec<_> = status["uncovered"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !uncovered.is_empty() {
        text.push_str(&format!("not covered yet: {}\n", uncovered.join(", ")));
    }
    if let Some(problem) = status["issuance"]["last_problem"].as_str() {
        text.push_str(&format!("last problem: {problem}\n"));
    }
    if let Some(next) = status["issuance"]["next_attempt_at"].as_str() {
        text.push_str(&format!("next attempt: {next}\n"));
    }
    text
}

fn describe_diagnosis(d: &Value) -> String {
    let addresses: Vec<_> = d["dns"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut text = format!(
        "{}: {}\n  site: {}\n  dns: {} (platform: {})\n",
        d["hostname"].as_str().unwrap_or(""),
        d["verdict"].as_str().unwrap_or(""),
        d["site"].as_str().unwrap_or(""),
        if addresses.is_empty() {
            "no addresses".to_owned()
        } else {
            addresses.join(", ")
        },
        d["platform"].as_str().unwrap_or("")
    );
    match d["certificate"].as_object() {
        Some(c) => text.push_str(&format!(
            "  certificate: {} expires {}\n",
            c["serial"].as_str().unwrap_or(""),
            c["not_after"].as_str().unwrap_or("")
        )),
        None => text.push_str("  certificate: none covers this name\n"),
    }
    if let Some(problem) = d["last_problem"].as_str() {
        text.push_str(&format!("  last problem: {problem}\n"));
    }
    text.push_str(&format!("  fix: {}", d["fix"].as_str().unwrap_or("")));
    text
}

/// With `--wait`, the id of the site's newest event before the change is requested (0 when
/// the site has none, or does not exist: the request itself will say so). Taken after the
/// request it would race the issuer, which may already have started, and even finished, the
/// attempt by the time the CLI looks (debounce is 100 ms in tests, a busy machine is slower).
async fn newest_event_if_waiting(client: &AdminClient, site: &str, wait: &WaitArgs) -> Result<i64> {
    if !wait.wait {
        return Ok(0);
    }
    match client
        .call(
            reqwest::Method::GET,
            &format!("/v1/sites/{site}/events?limit=1"),
            None,
        )
        .await
    {
        Ok(events) => Ok(events[0]["id"].as_i64().unwrap_or(0)),
        Err(Error::NotFound(_)) => Ok(0),
        Err(error) => Err(error),
    }
}

/// With `--wait`: polls until an attempt that started after event `since` (the newest event
/// before the change was requested, see [`newest_event_if_waiting`]) has finished, printing
/// every later event as progress.
async fn wait_if_asked(
    client: &AdminClient,
    site: &str,
    wait: &WaitArgs,
    since: i64,
    json: bool,
) -> Result<()> {
    use reqwest::Method;
    if !wait.wait {
        return Ok(());
    }
    let started = Instant::now();
    let mut seen = since;
    let mut attempt_started = false;
    let mut last_line = String::new();
    loop {
        if started.elapsed() > Duration::from_secs(wait.timeout) {
            return Err(Error::Config(format!(
                "gave up waiting after {} s; check `autohttps site show {site}`",
                wait.timeout
            )));
        }
        let events = client
            .call(
                Method::GET,
                &format!("/v1/sites/{site}/events?limit=50"),
                None,
            )
            .await?;
        let mut fresh: Vec<&Value> = events
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["id"].as_i64().unwrap_or(0) > seen)
            .collect();
        fresh.reverse();
        for event in &fresh {
            seen = seen.max(event["id"].as_i64().unwrap_or(0));
            let kind = event["kind"].as_str().unwrap_or("");
            attempt_started |= kind == "attempt-started";
            if !json {
                eprintln!(
                    "  [{:>5.1}s] {kind}: {}",
                    started.elapsed().as_secs_f64(),
                    event["message"].as_str().unwrap_or("")
                );
            }
        }
        let status = client
            .call(Method::GET, &format!("/v1/sites/{site}/certificates"), None)
            .await?;
        let busy = status["working"].as_bool().unwrap_or(false)
            || status["orders_in_flight"]
                .as_array()
                .is_some_and(|o| !o.is_empty());
        if attempt_started && !busy {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                print!("{}", describe_certificates(&status));
            }
            return match status["issuance"]["failures"].as_u64() {
                Some(n) if n > 0 => Err(Error::InvalidInput(format!(
                    "issuance for {site} is failing: {}",
                    status["issuance"]["last_problem"]
                        .as_str()
                        .unwrap_or("see `autohttps site show`")
                ))),
                _ => Ok(()),
            };
        }
        let line = if attempt_started {
            "ordering…"
        } else {
            "waiting for the attempt to start…"
        };
        if !json && line != last_line {
            eprintln!("  [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
            last_line = line.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
