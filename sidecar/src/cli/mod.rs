//! The `autohttps` command line: `serve`, the subcommands that talk to the admin API, shell
//! completions and the man page (both generated from these clap definitions).

mod client;
mod failure;
mod render;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use autohttps_api as api;
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use serde::Serialize;

pub use client::{AdminClient, parse_admin_url};
pub use failure::{CliError, EXIT_CODES, chain_once, exit_codes_help};

use crate::config::LogFormat;
use crate::hostname::Hostname;
use crate::store::validate_site_name;

/// Free, automatic HTTPS for every site: the autohttps sidecar and its admin CLI.
#[derive(Debug, Parser)]
#[command(name = "autohttps", version)]
pub struct Cli {
    /// The configuration file (TOML); also tells the CLI where the admin API and token are.
    /// Default: /etc/autohttps/autohttps.toml if it exists, else ./autohttps.toml if it
    /// exists, else built-in defaults.
    #[arg(long, global = true, env = "AUTOHTTPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin API base URL, e.g. http://127.0.0.1:8081 (default: http://<listen.admin>).
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
    /// Print JSON on stdout instead of text; failures too, as {"error": {"code", "message", "exit_code"}}.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar (admin API, HTTP-01 responder, issuance and renewal, SDS, policy feed).
    Serve {
        /// Log line format (overrides log.format); colour only when writing to a terminal.
        #[arg(long, value_enum, ignore_case = true)]
        log_format: Option<LogFormat>,
    },
    /// Manage sites.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Add or remove a site's subdomains and aliases.
    #[command(subcommand)]
    Host(HostCommand),
    /// Certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The store itself, on this machine (not through the admin API).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Explain why a hostname has (or has no) working HTTPS, and how to fix it.
    Diagnose {
        /// The hostname.
        hostname: String,
    },
    /// Print a shell completion script, e.g. `autohttps completions bash > /etc/bash_completion.d/autohttps`.
    Completions {
        /// The shell.
        #[arg(value_enum, ignore_case = true)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `autohttps man > /usr/local/share/man/man1/autohttps.1`.
    Man,
    /// The admin API's contract.
    #[command(subcommand)]
    Api(ApiCommand),
}

/// `api …`.
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Print the admin API's OpenAPI 3.1 document (JSON), generated from the handlers; no server
    /// needed (the same document a running sidecar serves at /v1/openapi.json).
    Openapi,
}

/// `store …`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a single node's SQLite store (sites, names, policies, certificates and keys, orders,
    /// the ACME account, events) into an empty PostgreSQL database, to run as a fleet.
    Copy {
        /// The SQLite store, e.g. `sqlite:/var/lib/autohttps/autohttps.db`.
        #[arg(long)]
        from: String,
        /// The PostgreSQL store, e.g. `postgres://autohttps:PASSWORD@db:5432/autohttps`.
        #[arg(long)]
        to: String,
        /// Replace everything the PostgreSQL database holds (it is refused when not empty).
        #[arg(long)]
        force: bool,
    },
}

/// `site …`.
#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Create a site; its certificate is ordered automatically.
    Add {
        /// Site id (lower-case letters, digits, '-').
        name: String,
        /// Primary domain.
        primary: String,
        /// More hostnames (subdomains or aliases); repeatable.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// The site's HTTPS policy (unset flags take the defaults: auto, permanent, no HSTS, mixed content off).
        #[command(flatten)]
        policy: PolicyArgs,
        /// Waiting for the resulting issuance.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change a site's HTTPS policy; only the flags given change.
    Set {
        /// Site id.
        name: String,
        /// The changes.
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// List sites with their certificate state and soonest expiry.
    List,
    /// Show a site: policy, certificates and recent events.
    Show {
        /// Site id.
        name: String,
    },
    /// Remove a site and its certificates.
    Remove {
        /// Site id.
        name: String,
    },
    /// The `http://` resources browsers reported for a site's pages (mixed-content `report` mode).
    MixedContent {
        /// Site id.
        name: String,
    },
    /// Set a site's HTTPS mode (the same as `site set NAME --https MODE`).
    Https {
        /// Site id.
        name: String,
        /// auto, force or disable.
        #[arg(value_enum, ignore_case = true)]
        mode: Mode,
    },
}

/// `host …`.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Add a subdomain or alias; the certificate is re-issued to include it.
    Add {
        /// Site id.
        site: String,
        /// Hostname.
        hostname: String,
        /// Waiting for the resulting issuance.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a subdomain or alias.
    Remove {
        /// Site id.
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
        /// Site id.
        site: String,
        /// Waiting for the resulting issuance.
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// A site's HTTPS policy as flags; each one left out keeps its current (or default) value.
#[derive(Debug, Clone, Default, Args)]
pub struct PolicyArgs {
    /// HTTPS mode: auto (both served), force (HTTP → HTTPS), disable (HTTPS → HTTP).
    #[arg(long, value_enum, ignore_case = true)]
    pub https: Option<Mode>,
    /// Redirect kind: permanent (301/308) or temporary (302/307).
    #[arg(long, value_enum, ignore_case = true)]
    pub redirect: Option<Redirect>,
    /// Strict-Transport-Security over HTTPS: on or off.
    #[arg(long, value_enum, ignore_case = true)]
    pub hsts: Option<Switch>,
    /// HSTS max-age in seconds (at most 63072000, two years).
    #[arg(long, value_name = "SECONDS")]
    pub hsts_max_age: Option<u64>,
    /// HSTS includeSubDomains: on or off.
    #[arg(long, value_enum, ignore_case = true)]
    pub hsts_include_subdomains: Option<Switch>,
    /// HSTS preload: on or off.
    #[arg(long, value_enum, ignore_case = true)]
    pub hsts_preload: Option<Switch>,
    /// Mixed-content protection: off, upgrade (CSP upgrade-insecure-requests) or report.
    #[arg(long, value_enum, ignore_case = true)]
    pub mixed_content: Option<MixedContentMode>,
    /// The name redirects go to (one of the site's hostnames), or `none`.
    #[arg(long, value_name = "HOSTNAME|none")]
    pub canonical_host: Option<String>,
}

impl PolicyArgs {
    fn is_empty(&self) -> bool {
        self.https.is_none()
            && self.redirect.is_none()
            && self.hsts.is_none()
            && self.hsts_max_age.is_none()
            && self.hsts_include_subdomains.is_none()
            && self.hsts_preload.is_none()
            && self.mixed_content.is_none()
            && self.canonical_host.is_none()
    }

    fn touches_hsts(&self) -> bool {
        self.hsts.is_some()
            || self.hsts_max_age.is_some()
            || self.hsts_include_subdomains.is_some()
            || self.hsts_preload.is_some()
    }

    /// The HSTS these flags ask for, merged over `current` (the API replaces it whole); `None`
    /// when no HSTS flag is given.
    fn hsts(&self, current: Option<api::HstsPolicy>) -> Option<api::HstsPolicy> {
        if !self.touches_hsts() {
            return None;
        }
        // Giving any HSTS detail without --hsts turns it on only if it was on.
        let mut hsts = current.unwrap_or_default();
        if let Some(switch) = self.hsts {
            hsts.enabled = switch.on();
        }
        if let Some(max_age) = self.hsts_max_age {
            hsts.max_age = max_age;
        }
        if let Some(switch) = self.hsts_include_subdomains {
            hsts.include_subdomains = switch.on();
        }
        if let Some(switch) = self.hsts_preload {
            hsts.preload = switch.on();
        }
        Some(hsts)
    }

    /// The `--canonical-host` flag: absent, `none` (`Some(None)`) or a name.
    fn canonical_host(&self) -> Option<Option<String>> {
        self.canonical_host
            .as_ref()
            .map(|host| (!host.eq_ignore_ascii_case("none")).then(|| host.clone()))
    }

    /// The change these flags make, the HSTS merged over `current_hsts`.
    fn to_update(&self, current_hsts: Option<api::HstsPolicy>) -> api::UpdateSite {
        api::UpdateSite {
            https: self.https.map(Mode::to_api),
            redirect: self.redirect.map(Redirect::to_api),
            hsts: self.hsts(current_hsts),
            mixed_content: self.mixed_content.map(MixedContentMode::to_api),
            canonical_host: self.canonical_host(),
        }
    }

    /// A new site with these flags' policy (flags left out take the API's defaults).
    fn to_new_site(&self, name: &str, primary: &str, hostnames: &[String]) -> api::CreateSite {
        api::CreateSite {
            name: name.to_owned(),
            primary: primary.to_owned(),
            hostnames: hostnames.to_vec(),
            https: self.https.map(Mode::to_api).unwrap_or_default(),
            redirect: self.redirect.map(Redirect::to_api).unwrap_or_default(),
            hsts: self.hsts(None),
            mixed_content: self
                .mixed_content
                .map(MixedContentMode::to_api)
                .unwrap_or_default(),
            canonical_host: self.canonical_host().flatten(),
        }
    }
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
    fn to_api(self) -> api::HttpsMode {
        match self {
            Self::Auto => api::HttpsMode::Auto,
            Self::Force => api::HttpsMode::Force,
            Self::Disable => api::HttpsMode::Disable,
        }
    }
}

/// Redirect kinds.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Redirect {
    /// 301 for GET/HEAD, 308 otherwise.
    Permanent,
    /// 302 for GET/HEAD, 307 otherwise.
    Temporary,
}

impl Redirect {
    fn to_api(self) -> api::RedirectKind {
        match self {
            Self::Permanent => api::RedirectKind::Permanent,
            Self::Temporary => api::RedirectKind::Temporary,
        }
    }
}

/// Mixed-content modes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MixedContentMode {
    /// No header.
    Off,
    /// `Content-Security-Policy: upgrade-insecure-requests`.
    Upgrade,
    /// A report-only policy; browsers' reports are collected per page.
    Report,
}

impl MixedContentMode {
    fn to_api(self) -> api::MixedContent {
        match self {
            Self::Off => api::MixedContent::Off,
            Self::Upgrade => api::MixedContent::Upgrade,
            Self::Report => api::MixedContent::Report,
        }
    }
}

/// On or off.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl Switch {
    fn on(self) -> bool {
        matches!(self, Self::On)
    }
}

/// The clap command with the exit-code table in its long help (and so in the man page).
pub fn command() -> clap::Command {
    Cli::command().after_long_help(exit_codes_help())
}

/// Prints a completion script for `shell` to stdout.
pub fn print_completions(shell: clap_complete::Shell) {
    let mut command = command();
    clap_complete::generate(shell, &mut command, "autohttps", &mut std::io::stdout());
}

/// Prints the man page (roff) to stdout.
pub fn print_man_page() -> std::io::Result<()> {
    clap_mangen::Man::new(command()).render(&mut std::io::stdout())
}

fn site_id(name: &str) -> Result<(), CliError> {
    validate_site_name(name).map_err(CliError::from)
}

fn hostname(name: &str) -> Result<(), CliError> {
    Hostname::parse(name).map(|_| ()).map_err(CliError::from)
}

/// Runs an admin subcommand (anything but `serve`, `completions`, `man`), printing to stdout;
/// progress goes to stderr.
pub async fn run(cli: &Cli) -> Result<(), CliError> {
    // Identifiers are checked before anything is sent (the server checks them again).
    match &cli.command {
        Command::Site(
            SiteCommand::Set { name, .. }
            | SiteCommand::Show { name }
            | SiteCommand::Remove { name }
            | SiteCommand::MixedContent { name }
            | SiteCommand::Https { name, .. },
        )
        | Command::Cert(CertCommand::Regenerate { site: name, .. }) => site_id(name)?,
        Command::Site(SiteCommand::Add {
            name,
            primary,
            hosts,
            ..
        }) => {
            site_id(name)?;
            hostname(primary)?;
            for host in hosts {
                hostname(host)?;
            }
        }
        Command::Host(
            HostCommand::Add {
                site, hostname: h, ..
            }
            | HostCommand::Remove { site, hostname: h },
        ) => {
            site_id(site)?;
            hostname(h)?;
        }
        Command::Diagnose { hostname: h } => hostname(h)?,
        Command::Site(SiteCommand::List)
        | Command::Serve { .. }
        | Command::Store(_)
        | Command::Completions { .. }
        | Command::Man
        | Command::Api(_) => {}
    }
    if let Command::Site(SiteCommand::Add { policy, .. } | SiteCommand::Set { policy, .. }) =
        &cli.command
        && let Some(host) = &policy.canonical_host
        && !host.eq_ignore_ascii_case("none")
    {
        hostname(host)?;
    }
    if let Command::Site(SiteCommand::Set { policy, .. }) = &cli.command
        && policy.is_empty()
    {
        return Err(CliError::Usage(
            "site set changes nothing without a flag: give at least one of --https, --redirect, --hsts, --hsts-max-age, --hsts-include-subdomains, --hsts-preload, --mixed-content, --canonical-host".into(),
        ));
    }
    let client = AdminClient::from_cli(cli)?;
    match &cli.command {
        Command::Serve { .. }
        | Command::Store(_)
        | Command::Completions { .. }
        | Command::Man
        | Command::Api(_) => Err(CliError::Usage(
            "`serve`, `store`, `completions`, `man` and `api` are not admin commands".into(),
        )),
        Command::Site(SiteCommand::Add {
            name,
            primary,
            hosts,
            policy,
            wait,
        }) => {
            // A new site has no earlier events: everything in its log follows this request.
            let since = 0;
            let site = client
                .create_site(&policy.to_new_site(name, primary, hosts))
                .await?;
            print_answer(cli, &site, || {
                format!("created site {name}\n{}", render::site(&site))
            });
            wait_if_asked(&client, name, wait, since, cli.json).await
        }
        Command::Site(SiteCommand::Set { name, policy }) => {
            let current = if policy.touches_hsts() {
                Some(client.site(name).await?.site.policy.hsts)
            } else {
                None
            };
            let site = client.update_site(name, &policy.to_update(current)).await?;
            print_answer(cli, &site, || {
                format!("updated site {name}\n{}", render::site(&site))
            });
            Ok(())
        }
        Command::Site(SiteCommand::List) => {
            let mut listed = Vec::new();
            for site in client.sites().await? {
                let status = client.certificates(&site.name).await?;
                listed.push(render::SiteListing {
                    site,
                    certificate: status.overview(),
                });
            }
            print_answer(cli, &listed, || render::site_list(&listed));
            Ok(())
        }
        Command::Site(SiteCommand::Show { name }) => {
            let all = render::SiteDetails {
                site: client.site(name).await?,
                certificates: client.certificates(name).await?,
                events: client.events(name, 10).await?,
            };
            print_answer(cli, &all, || render::site_details(&all));
            Ok(())
        }
        Command::Site(SiteCommand::Remove { name }) => {
            client.remove_site(name).await?;
            print_answer(cli, &Removed { removed: name }, || {
                format!("removed site {name}")
            });
            Ok(())
        }
        Command::Site(SiteCommand::MixedContent { name }) => {
            let findings = client.mixed_content(name).await?;
            print_answer(cli, &findings, || render::mixed_content(name, &findings));
            Ok(())
        }
        Command::Site(SiteCommand::Https { name, mode }) => {
            let change = api::UpdateSite {
                https: Some(mode.to_api()),
                ..api::UpdateSite::default()
            };
            let site = client.update_site(name, &change).await?;
            print_answer(cli, &site, || {
                format!("site {name}: https {}", site.policy.https.as_str())
            });
            Ok(())
        }
        Command::Host(HostCommand::Add {
            site,
            hostname,
            wait,
        }) => {
            let since = newest_event_if_waiting(&client, site, wait).await?;
            let updated = client.add_hostname(site, hostname).await?;
            print_answer(cli, &updated, || {
                format!("added {hostname} to {site}\n{}", render::site(&updated))
            });
            wait_if_asked(&client, site, wait, since, cli.json).await
        }
        Command::Host(HostCommand::Remove { site, hostname }) => {
            let updated = client.remove_hostname(site, hostname).await?;
            print_answer(cli, &updated, || {
                format!("removed {hostname} from {site}\n{}", render::site(&updated))
            });
            Ok(())
        }
        Command::Cert(CertCommand::Regenerate { site, wait }) => {
            let since = newest_event_if_waiting(&client, site, wait).await?;
            let answer = client.regenerate(site).await?;
            print_answer(cli, &answer, || format!("regeneration of {site} scheduled"));
            wait_if_asked(&client, site, wait, since, cli.json).await
        }
        Command::Diagnose { hostname } => {
            let diagnosis = client.diagnose(hostname).await?;
            print_answer(cli, &diagnosis, || render::diagnosis(&diagnosis));
            Ok(())
        }
    }
}

/// `site remove --json`.
#[derive(Debug, Serialize)]
struct Removed<'a> {
    removed: &'a str,
}

/// Prints an answer: as JSON with `--json`, else in words.
fn print_answer(cli: &Cli, value: &impl Serialize, human: impl FnOnce() -> String) {
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        println!("{}", human());
    }
}

/// With `--wait`, the id of the site's newest event before the change is requested (0 when
/// the site has none, or does not exist: the request itself will say so). Taken after the
/// request it would race the issuer, which may already have started, and even finished, the
/// attempt by the time the CLI looks (debounce is 100 ms in tests, a busy machine is slower).
async fn newest_event_if_waiting(
    client: &AdminClient,
    site: &str,
    wait: &WaitArgs,
) -> Result<i64, CliError> {
    if !wait.wait {
        return Ok(0);
    }
    match client.events(site, 1).await {
        Ok(events) => Ok(events.first().map_or(0, |event| event.id)),
        Err(CliError::NotFound(_)) => Ok(0),
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
) -> Result<(), CliError> {
    if !wait.wait {
        return Ok(());
    }
    let started = Instant::now();
    let mut seen = since;
    let mut attempt_started = false;
    let mut last_line = String::new();
    loop {
        if started.elapsed() > Duration::from_secs(wait.timeout) {
            return Err(CliError::WaitTimedOut(format!(
                "gave up waiting after {} s; check `autohttps site show {site}`",
                wait.timeout
            )));
        }
        let events = client.events(site, 50).await?;
        // Oldest first, only those after `seen`.
        let after = seen;
        for event in events.iter().rev().filter(|e| e.id > after) {
            seen = seen.max(event.id);
            attempt_started |= event.kind == "attempt-started";
            if !json {
                eprintln!(
                    "  [{:>5.1}s] {}: {}",
                    started.elapsed().as_secs_f64(),
                    event.kind,
                    event.message
                );
            }
        }
        let status = client.certificates(site).await?;
        let busy = status.working || !status.orders_in_flight.is_empty();
        if attempt_started && !busy {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                print!("{}", render::certificates(&status));
            }
            return if status.issuance.failures > 0 {
                Err(CliError::IssuanceFailed(format!(
                    "issuance for {site} is failing: {}",
                    status
                        .issuance
                        .last_problem
                        .as_deref()
                        .unwrap_or("see `autohttps site show`")
                )))
            } else {
                Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn hsts_details_merge_over_the_current_policy() {
        let args = PolicyArgs {
            hsts_max_age: Some(600),
            ..PolicyArgs::default()
        };
        let current = api::HstsPolicy {
            enabled: true,
            max_age: 300,
            include_subdomains: true,
            preload: false,
        };
        let update = args.to_update(Some(current));
        assert_eq!(
            update.hsts,
            Some(api::HstsPolicy {
                max_age: 600,
                ..current
            })
        );
        assert_eq!(update.https, None);
        // Only the flags given are sent.
        assert_eq!(
            serde_json::to_value(&update).expect("serialises"),
            serde_json::json!({ "hsts": { "enabled": true, "max_age": 600, "include_subdomains": true, "preload": false } })
        );
    }

    #[test]
    fn canonical_host_none_clears_it() {
        let args = PolicyArgs {
            canonical_host: Some("NONE".into()),
            ..PolicyArgs::default()
        };
        assert_eq!(
            serde_json::to_value(args.to_update(None)).expect("serialises"),
            serde_json::json!({ "canonical_host": null })
        );
        assert_eq!(args.to_new_site("a", "a.test", &[]).canonical_host, None);
    }
}
