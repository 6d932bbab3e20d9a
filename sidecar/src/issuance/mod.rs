//! The issuer: decides when each site needs an order (change, renewal, retry), runs the DNS
//! pre-check, splits names over the CA's limit, drives orders and stores the results.

mod seams;
#[cfg(test)]
mod tests;

pub use seams::{CertificateAuthority, NameCheck, Pending};

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Notify, OnceCell, Semaphore};

use crate::acme::AcmeClient;
use crate::acme::certificate::leaf_facts;
use crate::clock::Clock;
use crate::config::AcmeConfig;
use crate::dns_check::DnsPrecheck;
use crate::error::{Error, Result};
use crate::hooks::{EventKind, HookEvent, Hooks};
use crate::hostname::Hostname;
use crate::http01::ChallengeResponder;
use crate::metrics::AcmeRequestMetrics;
use crate::renewal::{ari_renew_at, renew_at, retry_at};
use crate::store::{AttemptLease, NewCertificate, Site, SiteEventKind, Store, StoredCertificate};

/// A site being worked on is leased for this long at a time, and the lease is renewed every
/// [`LEASE_RENEW_EVERY`] while the attempt works: a node that dies mid-attempt (under any node
/// id) holds the site for at most this long, after which another node of the fleet resumes its
/// order; a live node never loses it. Short, because a dead node's sites wait this long; not
/// shorter, so that a database away for 20 s does not let the lease run out under a live node.
const ATTEMPT_LEASE: Duration = Duration::from_secs(30);

/// How often a working attempt renews its lease (a third of it: two renewals may fail, e.g.
/// while the database is briefly away, before the lease runs out).
const LEASE_RENEW_EVERY: Duration = Duration::from_secs(10);

/// Renewal is never scheduled sooner than this after an attempt, so a certificate that is
/// already inside its renewal window when it arrives (clock skew, a CA issuing very short
/// lifetimes) cannot make the issuer order in a loop.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(600);

/// The scheduler re-reads the store at least this often.
const MAX_IDLE: Duration = Duration::from_secs(5);

/// Everything the issuer needs, passed in (the CA, DNS and time are seams).
#[derive(Debug)]
pub struct Issuer {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: AcmeConfig,
    dns: Arc<dyn NameCheck>,
    responder: ChallengeResponder,
    acme: OnceCell<Arc<dyn CertificateAuthority>>,
    wake: Notify,
    working: Mutex<HashSet<String>>,
    /// One permit per attempt (`acme.orders_in_flight`): an attempt orders its chunks one after
    /// the other, so this bounds the orders in flight, and a site is leased only once a permit
    /// is free, which leaves the other sites due to the other nodes of a fleet.
    orders: Arc<Semaphore>,
    acme_requests: AcmeRequestMetrics,
    hooks: Hooks,
}

/// What one attempt at a site achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptReport {
    /// Certificates stored by this attempt.
    pub issued: Vec<i64>,
    /// Names left out because their DNS does not point at the platform, with the reason.
    pub dns_failures: Vec<(Hostname, String)>,
    /// The order failure, if any.
    pub failure: Option<String>,
}

impl Issuer {
    /// Assembles an issuer. Nothing talks to the CA until the first attempt.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: AcmeConfig,
        dns: DnsPrecheck,
        responder: ChallengeResponder,
        hooks: Hooks,
    ) -> Arc<Self> {
        Self::with_seams(store, clock, config, Arc::new(dns), None, responder, hooks)
    }

    /// Assembles an issuer on given seams: `dns` answers the pre-check, and `ca`, when given,
    /// is the CA (else the ACME account of `config` is connected on the first attempt).
    pub fn with_seams(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: AcmeConfig,
        dns: Arc<dyn NameCheck>,
        ca: Option<Arc<dyn CertificateAuthority>>,
        responder: ChallengeResponder,
        hooks: Hooks,
    ) -> Arc<Self> {
        let orders = Arc::new(Semaphore::new(config.orders_in_flight));
        Arc::new(Self {
            store,
            clock,
            config,
            dns,
            responder,
            acme: OnceCell::new_with(ca),
            wake: Notify::new(),
            working: Mutex::new(HashSet::new()),
            orders,
            acme_requests: AcmeRequestMetrics::default(),
            hooks,
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Where events go (webhooks, commands).
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// The ACME client's request counts and timings.
    pub fn acme_requests(&self) -> &AcmeRequestMetrics {
        &self.acme_requests
    }

    /// The DNS pre-check.
    pub fn dns(&self) -> &dyn NameCheck {
        self.dns.as_ref()
    }

    /// When a change made now should be acted on (debounce: changes within the window coalesce).
    pub fn debounced(&self) -> OffsetDateTime {
        self.clock.now() + self.config.debounce()
    }

    /// Tells the scheduler to look at the store again now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether an attempt for `site` is running right now.
    pub fn is_working_on(&self, site: &str) -> bool {
        self.lock_working().contains(site)
    }

    fn lock_working(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.working
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn acme(&self) -> Result<&dyn CertificateAuthority> {
        let ca = self
            .acme
            .get_or_try_init(|| async {
                let client = AcmeClient::connect(
                    &self.config,
                    self.store.as_ref(),
                    self.clock.now(),
                    &self.acme_requests,
                )
                .await?;
                Ok::<_, Error>(Arc::new(client) as Arc<dyn CertificateAuthority>)
            })
            .await?;
        Ok(ca.as_ref())
    }

    /// Runs the scheduler until the task is dropped: resumes orders left in flight by a previous
    /// process, then starts an attempt for every site that comes due.
    pub async fn run(self: Arc<Self>) {
        match self.store.orders_in_flight(None) {
            Ok(orders) => {
                let now = self.clock.now();
                for order in orders {
                    tracing::info!(site = %order.site, order = %order.order_url, "resuming order left in flight");
                    let failures = self
                        .store
                        .site(&order.site)
                        .ok()
                        .flatten()
                        .map_or(0, |s| s.issuance.failures);
                    if let Err(error) = self.store.schedule(&order.site, Some(now), failures, None)
                    {
                        tracing::error!(%error, "cannot schedule resumption");
                    }
                }
            }
            Err(error) => tracing::error!(%error, "cannot read orders in flight"),
        }
        if let Err(error) = self.release_stale_leases() {
            tracing::error!(%error, "cannot release the leases of interrupted attempts");
        }
        loop {
            self.start_due_attempts();
            let now = self.clock.now();
            let idle = match self.store.next_due() {
                Ok(Some(next)) if next > now => Duration::try_from(next - now)
                    .unwrap_or(MAX_IDLE)
                    .min(MAX_IDLE),
                Ok(Some(_)) => MAX_IDLE.min(Duration::from_millis(500)),
                _ => MAX_IDLE,
            };
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// Makes due now every site whose attempt this node's previous run started and never
    /// finished (killed or stopped mid-attempt, e.g. during the DNS pre-check): the lease it
    /// holds under this node's id would otherwise hold the site until it runs out. One process
    /// runs per node id, so no live attempt holds such a lease; a lease held under another id is
    /// left alone (a live node renews it; a dead one's runs out within [`ATTEMPT_LEASE`]).
    fn release_stale_leases(&self) -> Result<()> {
        for site in self.store.release_own_leases(self.clock.now())? {
            tracing::info!(%site, "retrying an attempt a previous run of this node did not finish");
        }
        Ok(())
    }

    /// Starts an attempt (on its own task) for due sites not already being worked on, as many
    /// as there are free order permits. Taking the lease only with a permit in hand matters in
    /// a fleet: a node that leased every due site at once and then queued on its permits would
    /// hold sites the other nodes could be issuing.
    pub fn start_due_attempts(self: &Arc<Self>) {
        if self.orders.available_permits() == 0 {
            return;
        }
        let due = match self.store.due_sites(self.clock.now()) {
            Ok(due) => due,
            Err(error) => {
                tracing::error!(%error, "cannot read due sites");
                return;
            }
        };
        for site in due {
            let Ok(permit) = Arc::clone(&self.orders).try_acquire_owned() else {
                break;
            };
            if !self.lock_working().insert(site.clone()) {
                continue;
            }
            let issuer = Arc::clone(self);
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(error) = issuer.attempt(&site).await {
                    tracing::error!(%site, %error, "attempt failed before it could be recorded");
                }
                issuer.lock_working().remove(&site);
                issuer.wake();
            });
        }
    }

    /// One attempt at a site: resume its orders in flight, pre-check DNS, order what is
    /// missing or due for renewal, store results, and schedule the next attempt.
    pub async fn attempt(&self, site_name: &str) -> Result<AttemptReport> {
        crate::acme::http::with_retry_after_capture(self.attempt_capturing(site_name)).await
    }

    async fn attempt_capturing(&self, site_name: &str) -> Result<AttemptReport> {
        let now = self.clock.now();
        let lease_until = now + ATTEMPT_LEASE;
        // Read and lease in one step: a change made after the read is seen at the end.
        let site = match self.store.begin_attempt(site_name, now, lease_until)? {
            AttemptLease::Taken(site) => *site,
            AttemptLease::HeldElsewhere { node, until } => {
                tracing::debug!(site = %site_name, %node, %until, "another node holds the site's issuance lease");
                return Ok(AttemptReport::default());
            }
            AttemptLease::NoSuchSite => return Ok(AttemptReport::default()),
        };
        let lease = HeldLease::new(lease_until);
        tokio::select! {
            report = self.work_on(site_name, site, now, &lease) => report,
            never = self.keep_lease(site_name, &lease) => match never {},
        }
    }

    /// Renews this node's lease on `site` every [`LEASE_RENEW_EVERY`] while the attempt works
    /// (the attempt ends this future). A failed renewal is retried at the next turn; a lease
    /// found taken by another node (it ran out, e.g. the database was away too long) is marked
    /// lost and no longer renewed.
    async fn keep_lease(&self, site: &str, lease: &HeldLease) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(LEASE_RENEW_EVERY).await;
            let held = lease.until();
            let until = self.clock.now() + ATTEMPT_LEASE;
            match self.store.renew_lease(site, held, until) {
                Ok(true) => lease.renewed(until),
                Ok(false) => {
                    tracing::warn!(%site, "this node's issuance lease ran out and another node took the site; leaving it to that node");
                    lease.lose();
                    return std::future::pending().await;
                }
                Err(error) => {
                    tracing::warn!(%site, %error, "cannot renew the issuance lease; retrying");
                }
            }
        }
    }

    /// The attempt itself, while this node holds the site's lease (`lease`).
    async fn work_on(
        &self,
        site_name: &str,
        site: Site,
        now: OffsetDateTime,
        lease: &HeldLease,
    ) -> Result<AttemptReport> {
        let failures_before = site.issuance.failures;
        let regenerate = self.store.take_regenerate_request(site_name)?;
        tracing::debug!(site = %site_name, names = site.names().len(), regenerate, "issuance attempt started");
        self.store.add_event(
            site_name,
            now,
            SiteEventKind::AttemptStarted,
            "issuance attempt started",
            None,
            None,
        )?;
        let mut report = AttemptReport::default();
        let mut retry_after = None;
        let mut order_failure: Option<Error> = None;

        // 1. Orders a previous attempt (or process) left in flight.
        for row in self.store.orders_in_flight(Some(site_name))? {
            self.store.add_event(
                site_name,
                self.clock.now(),
                SiteEventKind::OrderResumed,
                &format!("resuming {}", row.order_url),
                None,
                None,
            )?;
            match self.finish_order(&row).await {
                Ok(id) => report.issued.push(id),
                Err(error) => {
                    order_failure = Some(error);
                }
            }
        }

        // 2. DNS pre-check.
        let mut passing = Vec::new();
        for name in site.names() {
            let answer = self.dns.check(&name).await;
            if answer.points_here {
                passing.push(name);
            } else {
                let why = answer
                    .problem
                    .unwrap_or_else(|| format!("{name} does not point at the platform"));
                tracing::warn!(site = %site_name, name = %name, problem = %why, "left out of the order: DNS does not point at the platform");
                self.store.add_event(
                    site_name,
                    self.clock.now(),
                    SiteEventKind::DnsNotPointing,
                    &why,
                    None,
                    Some("dns"),
                )?;
                let mut event = HookEvent::new(EventKind::DnsExcluded, site_name, self.clock.now());
                event.fix = Some(crate::diagnose::dns_fix(
                    &name,
                    &crate::dns_check::platform_description(self.dns.platform()),
                    site_name,
                ));
                event.reason = Some(why.clone());
                event.hostname = Some(name.to_string());
                self.hooks.emit(&event);
                report.dns_failures.push((name, why));
            }
        }

        // 3. Order what is needed, in chunks of the CA's per-certificate limit.
        if order_failure.is_none() && !passing.is_empty() && !lease.is_lost() {
            let current = self.store.current_certificates(site_name)?;
            if regenerate || needs_order(&site, &passing, &current, self.clock.now()) {
                for chunk in passing.chunks(self.config.names_per_certificate()) {
                    if lease.is_lost() {
                        break;
                    }
                    match self.order_chunk(site_name, chunk).await {
                        Ok(id) => report.issued.push(id),
                        Err(error) => {
                            order_failure = Some(error);
                            break;
                        }
                    }
                }
            }
        }

        // 4. Record the outcome and schedule the next attempt.
        let now = self.clock.now();
        if let Some(error) = &order_failure {
            let problem_type = match error {
                Error::Acme {
                    problem_type,
                    retry_after: ra,
                    ..
                } => {
                    retry_after = *ra;
                    problem_type.clone()
                }
                _ => None,
            };
            // instant-acme's errors drop the CA's Retry-After; our transport kept it.
            retry_after = retry_after
                .or_else(|| crate::acme::http::retry_after_seen().map(|seen| seen.resolve(now)));
            self.store.add_event(
                site_name,
                now,
                SiteEventKind::AttemptFailed,
                &error.to_string(),
                problem_type.as_deref(),
                Some(&error.reason()),
            )?;
            report.failure = Some(error.to_string());
        } else if !report.dns_failures.is_empty() && passing.is_empty() {
            tracing::warn!(site = %site_name, "issuance attempt failed: no hostname of the site points at the platform");
            self.store.add_event(
                site_name,
                now,
                SiteEventKind::AttemptFailed,
                "no hostname of the site points at the platform",
                None,
                Some("dns"),
            )?;
        }
        let failed = order_failure.is_some() || !report.dns_failures.is_empty();
        let failures = if failed { failures_before + 1 } else { 0 };
        let mut next = self.renewal_time(site_name).await?;
        let mut last_problem = None;
        if failed {
            let jitter = rand::random::<f64>();
            let retry = retry_at(now, failures, jitter, retry_after);
            next = Some(next.map_or(retry, |n| n.min(retry)));
            last_problem = report.failure.clone().or_else(|| {
                Some(
                    report
                        .dns_failures
                        .iter()
                        .map(|(_, why)| why.as_str())
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            });
        }
        if lease.is_lost() {
            // The site is another node's now: its attempt records the outcome.
            return Ok(report);
        }
        // A change made while we worked (anything but our lease) keeps its earlier schedule;
        // the store decides in one step (reading here, then writing, lost a change that landed
        // in between: a hostname added as an attempt ended waited for the renewal date).
        self.store.finish_attempt(
            site_name,
            lease.until(),
            next,
            failures,
            last_problem.as_deref(),
        )?;
        let attempt_failed = order_failure.is_some() || (passing.is_empty() && failed);
        if let (true, Some(problem)) = (attempt_failed, &last_problem) {
            let scheduled = self
                .store
                .site(site_name)?
                .and_then(|s| s.issuance.next_attempt_at);
            let mut event = HookEvent::new(EventKind::CertificateFailed, site_name, now);
            event.fix = Some(crate::diagnose::failing_fix(problem, scheduled, site_name));
            event.reason = Some(problem.clone());
            self.hooks.emit(&event);
        }
        if let Some(error) = &order_failure {
            let names = site
                .names()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let next_attempt = next
                .and_then(|at| {
                    at.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            // Repeated failures of one site are an error: a retry alone will not fix them.
            if failures >= 3 {
                tracing::error!(site = %site_name, names = %names, reason = %error.reason(), failures, next_attempt = %next_attempt, %error, "issuance attempt failed");
            } else {
                tracing::warn!(site = %site_name, names = %names, reason = %error.reason(), failures, next_attempt = %next_attempt, %error, "issuance attempt failed");
            }
        } else if !failed {
            tracing::debug!(site = %site_name, issued = report.issued.len(), "issuance attempt finished");
        }
        Ok(report)
    }

    /// When the site's certificates should next be renewed: ARI when the CA offers it,
    /// else a third of the lifetime before expiry (half for short-lived certificates).
    async fn renewal_time(&self, site: &str) -> Result<Option<OffsetDateTime>> {
        let now = self.clock.now();
        let mut earliest: Option<OffsetDateTime> = None;
        for certificate in self.store.current_certificates(site)? {
            let mut at = renew_at(now, certificate.not_before, certificate.not_after);
            if let (Some(ari_id), Ok(acme)) = (&certificate.ari_id, self.acme().await)
                && let Some((start, end)) = acme.renewal_window(ari_id).await
            {
                at = ari_renew_at(now, start, end, rand::random::<f64>());
            }
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        }
        Ok(earliest.map(|at| at.max(now + MIN_RENEWAL_INTERVAL)))
    }

    async fn order_chunk(&self, site: &str, names: &[Hostname]) -> Result<i64> {
        let acme = self.acme().await?;
        let row = acme
            .create_order(self.store.as_ref(), site, names, self.clock.now())
            .await?;
        self.finish_order(&row).await
    }

    async fn finish_order(&self, row: &crate::store::OrderInFlight) -> Result<i64> {
        let acme = self.acme().await?;
        let issued = acme
            .complete_order(self.store.as_ref(), &self.responder, row)
            .await?;
        let facts = leaf_facts(&issued.chain_pem)?;
        let missing: Vec<_> = issued
            .names
            .iter()
            .filter(|n| !facts.names.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Certificate(format!(
                "the CA's certificate lacks {missing:?}; it was not stored"
            )));
        }
        let renewal = !self.store.current_certificates(&row.site)?.is_empty();
        let stored = self.store.store_certificate(
            NewCertificate {
                site: row.site.clone(),
                names: facts.names,
                chain_pem: issued.chain_pem,
                key_pem: issued.key_pem,
                not_before: facts.not_before,
                not_after: facts.not_after,
                serial: facts.serial,
                ari_id: facts.ari_id,
            },
            Some(issued.order_id),
            self.clock.now(),
        )?;
        tracing::info!(site = %row.site, serial = %stored.serial, names = stored.names.len(), "certificate stored");
        let kind = if renewal {
            EventKind::CertificateRenewed
        } else {
            EventKind::CertificateIssued
        };
        let mut event = HookEvent::new(kind, &row.site, self.clock.now());
        event.names = stored.names.iter().map(ToString::to_string).collect();
        event.serial = Some(stored.serial.clone());
        event.not_after = Some(stored.not_after);
        self.hooks.emit(&event);
        Ok(stored.id)
    }
}

/// This node's lease on a site while an attempt works on it: when it runs out (renewals move
/// it) and whether another node took it.
#[derive(Debug)]
struct HeldLease {
    until: Mutex<OffsetDateTime>,
    lost: std::sync::atomic::AtomicBool,
}

impl HeldLease {
    fn new(until: OffsetDateTime) -> Self {
        Self {
            until: Mutex::new(until),
            lost: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn until(&self) -> OffsetDateTime {
        *self
            .until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn renewed(&self, until: OffsetDateTime) {
        *self
            .until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = until;
    }

    fn lose(&self) {
        self.lost.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Whether a site needs a new order now: a passing name is not covered, a certificate names a
/// host the site no longer has, a certificate is due for renewal, or nothing was ever issued.
pub fn needs_order(
    site: &Site,
    passing: &[Hostname],
    current: &[StoredCertificate],
    now: OffsetDateTime,
) -> bool {
    let wanted = site.names();
    let uncovered = passing
        .iter()
        .any(|name| !current.iter().any(|c| c.covers(name)));
    let stale_names = current
        .iter()
        .any(|c| c.names.iter().any(|n| !wanted.contains(n)));
    let renewal_due = current
        .iter()
        .any(|c| renew_at(now, c.not_before, c.not_after) <= now);
    uncovered || stale_names || renewal_due
}
