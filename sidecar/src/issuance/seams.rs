//! The issuer's two outside parties as traits, so its attempt logic runs against either the
//! real ones or test fakes: the CA ([`CertificateAuthority`], implemented by
//! [`AcmeClient`]) and the DNS pre-check ([`NameCheck`], implemented by [`DnsPrecheck`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use time::OffsetDateTime;

use crate::acme::{AcmeClient, IssuedChain};
use crate::config::PlatformConfig;
use crate::dns_check::{DnsAnswer, DnsPrecheck};
use crate::error::Result;
use crate::hostname::Hostname;
use crate::http01::ChallengeResponder;
use crate::store::{OrderInFlight, Store};

/// A future a seam answers with (boxed, so the traits can be used as `dyn`).
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the issuer asks of a CA (RFC 8555).
pub trait CertificateAuthority: Send + Sync + fmt::Debug {
    /// Places an order for `names` and records it in `store` ([`crate::store::OrderStore::insert_order`], with
    /// the key its CSR will use) before answering, so a crash after this never loses it.
    fn create_order<'a>(
        &'a self,
        store: &'a dyn Store,
        site: &'a str,
        names: &'a [Hostname],
        now: OffsetDateTime,
    ) -> Pending<'a, Result<OrderInFlight>>;

    /// Drives an order in flight to its certificate chain, answering its challenges through
    /// `responder`. A dead order (the CA marked it invalid) has its row deleted and fails with
    /// the CA's problem; a transient failure keeps the row for the next attempt.
    fn complete_order<'a>(
        &'a self,
        store: &'a dyn Store,
        responder: &'a ChallengeResponder,
        row: &'a OrderInFlight,
    ) -> Pending<'a, Result<IssuedChain>>;

    /// The CA's suggested renewal window for a certificate (ARI), if it offers one.
    fn renewal_window<'a>(
        &'a self,
        ari_id: &'a str,
    ) -> Pending<'a, Option<(OffsetDateTime, OffsetDateTime)>>;
}

impl CertificateAuthority for AcmeClient {
    fn create_order<'a>(
        &'a self,
        store: &'a dyn Store,
        site: &'a str,
        names: &'a [Hostname],
        now: OffsetDateTime,
    ) -> Pending<'a, Result<OrderInFlight>> {
        Box::pin(AcmeClient::create_order(self, store, site, names, now))
    }

    fn complete_order<'a>(
        &'a self,
        store: &'a dyn Store,
        responder: &'a ChallengeResponder,
        row: &'a OrderInFlight,
    ) -> Pending<'a, Result<IssuedChain>> {
        Box::pin(AcmeClient::complete_order(self, store, responder, row))
    }

    fn renewal_window<'a>(
        &'a self,
        ari_id: &'a str,
    ) -> Pending<'a, Option<(OffsetDateTime, OffsetDateTime)>> {
        Box::pin(AcmeClient::renewal_window(self, ari_id))
    }
}

/// The DNS pre-check: whether a name points at the platform before it is ordered.
pub trait NameCheck: Send + Sync + fmt::Debug {
    /// Resolves `name` now and says whether it points at the platform (and why not).
    fn check<'a>(&'a self, name: &'a Hostname) -> Pending<'a, DnsAnswer>;

    /// What "points at the platform" means.
    fn platform(&self) -> &PlatformConfig;
}

impl NameCheck for DnsPrecheck {
    fn check<'a>(&'a self, name: &'a Hostname) -> Pending<'a, DnsAnswer> {
        Box::pin(DnsPrecheck::check(self, name))
    }

    fn platform(&self) -> &PlatformConfig {
        DnsPrecheck::platform(self)
    }
}
