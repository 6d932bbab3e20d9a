//! Event hooks: operators are told when something happens, without polling. Each event
//! (certificate issued, renewed, failed, expiring, a name excluded for DNS) goes to every
//! webhook ([`webhook`]: HTTP POST, JSON, HMAC-SHA256 signed, retried with back-off) and
//! command ([`exec`]: the JSON on stdin, with a timeout) configured for its kind.
//!
//! Emitting never blocks issuance: each hook has its own bounded queue; when it is full the
//! event is dropped for that hook and a warning logged. Events are delivered in order per hook.
//! Queues live in memory: events not yet delivered when the process stops are lost.

pub mod exec;
pub mod webhook;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// What happened. The names are the `type` field of the payload and the values of `events`
/// in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A site's first certificate (or one for names it had none for) was stored.
    CertificateIssued,
    /// A certificate replaced one the site already had (renewal, alias change, regenerate).
    CertificateRenewed,
    /// An issuance attempt failed (the reason and the fix in words).
    CertificateFailed,
    /// A current certificate expires within `hooks.expiring_within_days` and has not been
    /// renewed.
    CertificateExpiring,
    /// A hostname was left out of the order because its DNS does not point at the platform.
    DnsExcluded,
}

impl EventKind {
    /// Every kind, for hooks that name none.
    pub const ALL: [Self; 5] = [
        Self::CertificateIssued,
        Self::CertificateRenewed,
        Self::CertificateFailed,
        Self::CertificateExpiring,
        Self::DnsExcluded,
    ];

    /// The kebab-case name (`certificate-issued`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CertificateIssued => "certificate-issued",
            Self::CertificateRenewed => "certificate-renewed",
            Self::CertificateFailed => "certificate-failed",
            Self::CertificateExpiring => "certificate-expiring",
            Self::DnsExcluded => "dns-excluded",
        }
    }
}

/// One event, as hooks receive it (the JSON body of a webhook, a command's stdin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookEvent {
    /// A unique id (also the `X-Autohttps-Delivery` header), for receivers to drop repeats:
    /// a retried delivery may arrive twice.
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The site.
    pub site: String,
    /// The certificate's names (issued, renewed, expiring).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// The certificate's serial (issued, renewed, expiring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The certificate's expiry (issued, renewed, expiring).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_after: Option<OffsetDateTime>,
    /// The hostname concerned (dns-excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// What went wrong (failed, dns-excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What to do about it, in words, as `autohttps diagnose` says it (failed, dns-excluded,
    /// expiring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl HookEvent {
    /// An event of `kind` for `site` at `at`, with a fresh id and no details yet.
    pub fn new(kind: EventKind, site: &str, at: OffsetDateTime) -> Self {
        let id: String = (0..16)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        Self {
            id,
            kind,
            at,
            site: site.to_owned(),
            names: Vec::new(),
            serial: None,
            not_after: None,
            hostname: None,
            reason: None,
            fix: None,
        }
    }
}

/// `[hooks]` in the configuration.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// `[[hooks.webhook]]` entries.
    pub webhook: Vec<webhook::WebhookConfig>,
    /// `[[hooks.exec]]` entries.
    pub exec: Vec<exec::ExecConfig>,
    /// A `certificate-expiring` event is sent once per certificate when it expires within
    /// this many days and has not been renewed.
    pub expiring_within_days: u32,
    /// Events each hook may have waiting; more are dropped (and logged) rather than delay
    /// issuance.
    pub queue: usize,
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            webhook: Vec::new(),
            exec: Vec::new(),
            expiring_within_days: 14,
            queue: 1000,
        }
    }
}

impl HooksConfig {
    /// Checks what TOML cannot: URLs, secrets, commands, sizes.
    pub fn validate(&self) -> Result<()> {
        if self.queue == 0 {
            return Err(Error::Config(
                "hooks.queue must be at least 1 (events each hook may have waiting)".into(),
            ));
        }
        if self.expiring_within_days == 0 {
            return Err(Error::Config(
                "hooks.expiring_within_days must be at least 1".into(),
            ));
        }
        for (n, hook) in self.webhook.iter().enumerate() {
            hook.validate()
                .map_err(|why| Error::Config(format!("hooks.webhook[{n}]: {why}")))?;
        }
        for (n, hook) in self.exec.iter().enumerate() {
            hook.validate()
                .map_err(|why| Error::Config(format!("hooks.exec[{n}]: {why}")))?;
        }
        Ok(())
    }

    /// The `certificate-expiring` horizon.
    pub fn expiring_within(&self) -> Duration {
        Duration::from_secs(u64::from(self.expiring_within_days) * 86_400)
    }
}

/// One hook's queue and the kinds it wants.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    events: Vec<EventKind>,
    queue: mpsc::Sender<HookEvent>,
}

/// The emitting side: cheap to clone, never blocks.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    targets: Vec<Target>,
}

/// The delivering side, not yet running: [`HookWorkers::spawn`] starts one task per hook.
#[derive(Debug, Default)]
pub struct HookWorkers {
    webhooks: Vec<(webhook::WebhookConfig, mpsc::Receiver<HookEvent>)>,
    commands: Vec<(exec::ExecConfig, mpsc::Receiver<HookEvent>)>,
}

impl Hooks {
    /// The hooks of `config` (validated first), with their queues.
    pub fn new(config: &HooksConfig) -> Result<(Self, HookWorkers)> {
        config.validate()?;
        let mut hooks = Self::default();
        let mut workers = HookWorkers::default();
        for hook in &config.webhook {
            let (sender, receiver) = mpsc::channel(config.queue);
            hooks.targets.push(Target {
                name: format!("webhook {}", hook.url),
                events: hook.events.clone(),
                queue: sender,
            });
            workers.webhooks.push((hook.clone(), receiver));
        }
        for hook in &config.exec {
            let (sender, receiver) = mpsc::channel(config.queue);
            hooks.targets.push(Target {
                name: format!("command {:?}", hook.command),
                events: hook.events.clone(),
                queue: sender,
            });
            workers.commands.push((hook.clone(), receiver));
        }
        Ok((hooks, workers))
    }

    /// Whether any hook is configured.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Queues `event` for every hook that wants its kind; a full queue drops it for that
    /// hook, with a warning.
    pub fn emit(&self, event: &HookEvent) {
        for target in &self.targets {
            if !target.events.is_empty() && !target.events.contains(&event.kind) {
                continue;
            }
            match target.queue.try_send(event.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => tracing::warn!(
                    hook = %target.name,
                    event = event.kind.as_str(),
                    site = %event.site,
                    "hook queue full: event dropped for this hook (raise hooks.queue or fix the receiver)"
                ),
                Err(mpsc::error::TrySendError::Closed(_)) => tracing::warn!(
                    hook = %target.name,
                    event = event.kind.as_str(),
                    "hook not running: event dropped"
                ),
            }
        }
    }
}

impl HookWorkers {
    /// Starts one delivery task per hook.
    pub fn spawn(self) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for (config, queue) in self.webhooks {
            tasks.push(tokio::spawn(webhook::deliver_all(config, queue)));
        }
        for (config, queue) in self.commands {
            tasks.push(tokio::spawn(exec::run_all(config, queue)));
        }
        tasks
    }
}

/// How often certificates are checked for `certificate-expiring` (also whenever one is stored).
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Sends `certificate-expiring` once per current certificate that expires within
/// `config.expiring_within()` (a renewed certificate is no longer current). Checks at start,
/// every hour and whenever certificates change; runs until dropped. After a restart a
/// certificate still expiring is reported again.
pub async fn watch_expiry(
    hooks: Hooks,
    store: std::sync::Arc<dyn crate::store::Store>,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    within: Duration,
) {
    let mut changed = store.certificates_changed();
    let mut reported = std::collections::HashSet::new();
    loop {
        let now = clock.now();
        match store.all_current_certificates() {
            Ok(certificates) => {
                for certificate in certificates {
                    if certificate.not_after > now + within || !reported.insert(certificate.id) {
                        continue;
                    }
                    let site = store.site(&certificate.site).ok().flatten();
                    let mut event =
                        HookEvent::new(EventKind::CertificateExpiring, &certificate.site, now);
                    event.fix = Some(match site.as_ref().filter(|s| s.issuance.failures > 0) {
                        Some(failing) => crate::diagnose::failing_fix(
                            failing
                                .issuance
                                .last_problem
                                .as_deref()
                                .unwrap_or("unknown"),
                            failing.issuance.next_attempt_at,
                            &certificate.site,
                        ),
                        None => format!(
                            "It has not been renewed yet; renewal is scheduled at {}. Check `autohttps site show {site}`, or run `autohttps cert regenerate {site}` to renew now.",
                            site.as_ref()
                                .and_then(|s| s.issuance.next_attempt_at)
                                .map_or_else(|| "no time".to_owned(), crate::clock::human_time),
                            site = certificate.site
                        ),
                    });
                    event.names = certificate.names.iter().map(ToString::to_string).collect();
                    event.serial = Some(certificate.serial);
                    event.not_after = Some(certificate.not_after);
                    hooks.emit(&event);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot check certificates for expiry"),
        }
        tokio::select! {
            () = tokio::time::sleep(EXPIRY_CHECK_INTERVAL) => {}
            outcome = changed.changed() => if outcome.is_err() { return },
        }
    }
}

/// Serialises an event for a hook.
pub(crate) fn event_json(event: &HookEvent) -> Vec<u8> {
    serde_json::to_vec(event).unwrap_or_else(|error| {
        tracing::error!(%error, "cannot serialise a hook event");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_entry_and_the_fix() {
        let parse = |text: &str| -> std::result::Result<HooksConfig, String> {
            let config: HooksConfig = toml::from_str(text).map_err(|e| e.to_string())?;
            config.validate().map_err(|e| e.to_string())?;
            Ok(config)
        };
        let ok = parse(
            r#"
            [[webhook]]
            url = "https://hooks.example/autohttps"
            secret = "0123456789abcdef0123"
            events = ["certificate-failed", "certificate-expiring"]
            [[exec]]
            command = ["/usr/local/bin/notify", "--quiet"]
            "#,
        )
        .expect("valid");
        assert_eq!(ok.webhook[0].events.len(), 2);
        assert!(ok.exec[0].events.is_empty(), "no events: all of them");

        let bad_event = parse(
            "[[webhook]]\nurl = \"https://h.example/\"\nsecret = \"0123456789abcdef\"\nevents = [\"cert-issued\"]\n",
        )
        .expect_err("unknown event");
        assert!(bad_event.contains("certificate-issued"), "{bad_event}");
        let short = parse("[[webhook]]\nurl = \"https://h.example/\"\nsecret = \"short\"\n")
            .expect_err("short secret");
        assert!(
            short.contains("hooks.webhook[0]") && short.contains("16"),
            "{short}"
        );
        let scheme =
            parse("[[webhook]]\nurl = \"ftp://h.example/\"\nsecret = \"0123456789abcdef\"\n")
                .expect_err("scheme");
        assert!(scheme.contains("http:// or https://"), "{scheme}");
        let empty = parse("[[exec]]\ncommand = []\n").expect_err("empty command");
        assert!(empty.contains("hooks.exec[0]"), "{empty}");
        let relative = parse("[[exec]]\ncommand = [\"notify\"]\n").expect_err("relative command");
        assert!(relative.contains("absolute path"), "{relative}");
    }

    #[test]
    fn payload_names_its_type_in_kebab_case_and_omits_empty_details() {
        let at = time::macros::datetime!(2026-12-02 06:00 UTC);
        let mut event = HookEvent::new(EventKind::CertificateFailed, "shop", at);
        event.reason = Some("rateLimited".into());
        let json: serde_json::Value = serde_json::from_slice(&event_json(&event)).expect("json");
        assert_eq!(json["type"], "certificate-failed");
        assert_eq!(json["site"], "shop");
        assert_eq!(json["at"], "2026-12-02T06:00:00Z");
        assert_eq!(json["reason"], "rateLimited");
        assert!(json.get("serial").is_none() && json.get("names").is_none());
        assert_eq!(event.id.len(), 32);
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_blocking() {
        let config = HooksConfig {
            queue: 2,
            exec: vec![exec::ExecConfig {
                command: vec!["/bin/true".into()],
                events: vec![EventKind::DnsExcluded],
                timeout_ms: 1000,
            }],
            ..HooksConfig::default()
        };
        let (hooks, workers) = Hooks::new(&config).expect("hooks");
        let at = OffsetDateTime::UNIX_EPOCH;
        for _ in 0..5 {
            hooks.emit(&HookEvent::new(EventKind::DnsExcluded, "s", at));
        }
        // Not wanted by the hook: not queued at all.
        hooks.emit(&HookEvent::new(EventKind::CertificateIssued, "s", at));
        let (_, mut queue) = workers.commands.into_iter().next().expect("queue");
        let mut queued = 0;
        while let Ok(event) = queue.try_recv() {
            assert_eq!(event.kind, EventKind::DnsExcluded);
            queued += 1;
        }
        assert_eq!(queued, 2);
    }
}
