//! The ACME client side (RFC 8555): the account, and driving one order from newOrder to chain.

pub mod certificate;
pub mod http;
pub mod progress;

use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeStatus, ChallengeType,
    ExternalAccountKey, Identifier, NewAccount, NewOrder, Order, RetryPolicy,
};
use time::OffsetDateTime;

use crate::config::AcmeConfig;
use crate::error::{Error, Result};
use crate::hostname::Hostname;
use crate::http01::ChallengeResponder;
use crate::metrics::AcmeRequestMetrics;
use crate::store::{OrderInFlight, PrivateKeyPem, Store};
use progress::{OrderEvent, OrderProgress};

/// How long to poll an order for readiness or its certificate before giving up this attempt
/// (the order stays in flight and is resumed by the next attempt).
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(200))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// Order steps after which an order that still has not produced a certificate is abandoned.
const MAX_STEPS: usize = 8;

/// An ACME account at one CA (RFC 8555 §7.3), created once and persisted in the store.
#[derive(Clone)]
pub struct AcmeClient {
    account: Account,
    profile: Option<String>,
}

impl std::fmt::Debug for AcmeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeClient")
            .field("account", &self.account.id())
            .field("profile", &self.profile)
            .finish()
    }
}

/// A finished order: the chain, the key it certifies, and the order row it completes.
#[derive(Debug)]
pub struct IssuedChain {
    /// The order row to delete when the certificate is stored.
    pub order_id: i64,
    /// The names ordered.
    pub names: Vec<Hostname>,
    /// Leaf first (PEM).
    pub chain_pem: String,
    /// The leaf's key.
    pub key_pem: PrivateKeyPem,
}

/// Installs the ring crypto provider for rustls once per process (the ACME HTTP client uses it).
pub fn install_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

impl AcmeClient {
    /// Restores the account for `config.directory_url` from the store, or creates it (with EAB
    /// when configured, RFC 8555 §7.3.4) and stores its credentials.
    pub async fn connect(
        config: &AcmeConfig,
        store: &dyn Store,
        now: OffsetDateTime,
        requests: &AcmeRequestMetrics,
    ) -> Result<Self> {
        install_crypto_provider();
        // Our own transport, so that the CA's Retry-After survives its error answers.
        let builder = || -> Result<instant_acme::AccountBuilder> {
            let http = http::AcmeHttp::new(config.extra_root_ca.as_deref(), requests.clone())?;
            Ok(Account::builder_with_http(Box::new(http)))
        };
        let account = match store.account(&config.directory_url)? {
            Some(json) => {
                let credentials: AccountCredentials = serde_json::from_str(&json)
                    .map_err(|e| Error::CorruptStore(format!("ACME account credentials: {e}")))?;
                builder()?.from_credentials(credentials).await?
            }
            None => {
                let eab = match (&config.eab_kid, &config.eab_hmac_key) {
                    (Some(kid), Some(hmac)) => {
                        use base64::Engine as _;
                        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(hmac.trim_end_matches('='))
                            .map_err(|_| {
                                Error::Config("acme.eab_hmac_key is not base64url".into())
                            })?;
                        Some(ExternalAccountKey::new(kid.clone(), &key))
                    }
                    _ => None,
                };
                let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        config.directory_url.clone(),
                        eab.as_ref(),
                    )
                    .await?;
                let json = serde_json::to_string(&credentials)
                    .map_err(|e| Error::CorruptStore(format!("ACME account credentials: {e}")))?;
                let stored = store.save_account(&config.directory_url, &json, now)?;
                if stored == json {
                    tracing::info!(account = account.id(), directory = %config.directory_url, "ACME account created");
                    account
                } else {
                    // Another node sharing the store created the fleet's account first: use it.
                    let credentials: AccountCredentials =
                        serde_json::from_str(&stored).map_err(|e| {
                            Error::CorruptStore(format!("ACME account credentials: {e}"))
                        })?;
                    tracing::info!(directory = %config.directory_url, "another node created the ACME account first; using it");
                    builder()?.from_credentials(credentials).await?
                }
            }
        };
        Ok(Self {
            account,
            profile: config.profile.clone(),
        })
    }

    /// The CA's ARI suggested renewal window for a certificate (RFC 9773 §4.2), if it offers ARI.
    pub async fn renewal_window(&self, ari_id: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
        let quoted = serde_json::to_string(ari_id).ok()?;
        let id: instant_acme::CertificateIdentifier<'_> = serde_json::from_str(&quoted).ok()?;
        match self.account.renewal_info(&id).await {
            Ok((info, _)) => Some((info.suggested_window.start, info.suggested_window.end)),
            Err(_) => None,
        }
    }

    /// Creates an order for `names` and records it in the store before answering anything.
    pub async fn create_order(
        &self,
        store: &dyn Store,
        site: &str,
        names: &[Hostname],
        now: OffsetDateTime,
    ) -> Result<OrderInFlight> {
        let key = certificate::generate_key()?;
        let identifiers: Vec<Identifier> = names
            .iter()
            .map(|n| Identifier::Dns(n.as_str().to_owned()))
            .collect();
        let mut request = NewOrder::new(&identifiers);
        if let Some(profile) = &self.profile {
            request = request.profile(profile);
        }
        let order = self.account.new_order(&request).await?;
        let id = store.insert_order(site, names, order.url(), &key, now)?;
        Ok(OrderInFlight {
            id,
            site: site.to_owned(),
            names: names.to_vec(),
            order_url: order.url().to_owned(),
            key_pem: key,
            created_at: now,
        })
    }

    /// Drives an order in flight to its certificate, resuming wherever the CA says it stands.
    ///
    /// On a dead order (the CA marked it invalid) the row is deleted and the CA's problem is
    /// returned; on a transient failure the row stays so the next attempt resumes it.
    pub async fn complete_order(
        &self,
        store: &dyn Store,
        responder: &ChallengeResponder,
        row: &OrderInFlight,
    ) -> Result<IssuedChain> {
        let mut tokens = Vec::new();
        let result = self.drive(responder, row, &mut tokens).await;
        // After a transient failure the order is resumed by a later attempt, and the CA may
        // still be validating a challenge it was told is ready (a badNonce on the poll that
        // followed): its token keeps being answered, or the validation meets a 404 and the
        // order dies. Only an order that is done (issued or dead) stops answering.
        if !matches!(result, Err(Transient(_))) {
            for token in &tokens {
                responder.remove(token);
            }
        }
        match result {
            Ok(chain_pem) => Ok(IssuedChain {
                order_id: row.id,
                names: row.names.clone(),
                chain_pem,
                key_pem: row.key_pem.clone(),
            }),
            Err(Dead(error)) => {
                store.delete_order(row.id)?;
                Err(error)
            }
            Err(Transient(error)) => Err(error),
        }
    }

    async fn drive(
        &self,
        responder: &ChallengeResponder,
        row: &OrderInFlight,
        tokens: &mut Vec<String>,
    ) -> std::result::Result<String, OrderFailure> {
        let mut order = self
            .account
            .order(row.order_url.clone())
            .await
            .map_err(|e| {
                match &e {
                    // The CA no longer knows the order (RFC 8555 §6.7 malformed/404): start afresh.
                    instant_acme::Error::Api(problem) if problem.status == Some(404) => {
                        Dead(e.into())
                    }
                    _ => Transient(e.into()),
                }
            })?;
        let mut progress = OrderProgress::ExpectOrder.next(observed(&mut order));
        for _ in 0..MAX_STEPS {
            progress = match progress {
                OrderProgress::ExpectOrder => OrderProgress::Failed("order lost its state".into()),
                OrderProgress::ExpectAuthorizations => {
                    answer_authorizations(&mut order, responder, tokens).await?;
                    match order.poll_ready(&POLL).await {
                        Ok(_) => progress.next(observed(&mut order)),
                        // The order itself carries the problem: it is dead.
                        Err(instant_acme::Error::Api(problem)) if order.state().error.is_some() => {
                            OrderProgress::Failed(problem.to_string())
                        }
                        // The CA refused the poll (badNonce, 5xx, 429…): the order lives on
                        // and is resumed; treating this as dead placed a second order.
                        Err(other) => return Err(Transient(other.into())),
                    }
                }
                OrderProgress::ExpectFinalize => {
                    let csr = certificate::csr_der(&row.names, &row.key_pem).map_err(Dead)?;
                    order
                        .finalize_csr(&csr)
                        .await
                        .map_err(|e| Transient(e.into()))?;
                    progress.next(observed(&mut order))
                }
                OrderProgress::ExpectCertificate => {
                    let chain = order
                        .poll_certificate(&POLL)
                        .await
                        .map_err(|e| Transient(e.into()))?;
                    progress.next(OrderEvent::Downloaded(chain))
                }
                OrderProgress::Issued(chain) => return Ok(chain),
                OrderProgress::Failed(_) => break,
            };
        }
        match progress {
            OrderProgress::Issued(chain) => Ok(chain),
            OrderProgress::Failed(problem) => {
                let (problem_type, detail) = challenge_problem(&mut order)
                    .await
                    .unwrap_or((None, problem));
                Err(Dead(Error::Acme {
                    problem_type,
                    detail,
                    retry_after: None,
                }))
            }
            _ => Err(Transient(Error::Acme {
                problem_type: None,
                detail: "the order did not progress; it will be resumed".into(),
                retry_after: None,
            })),
        }
    }
}

enum OrderFailure {
    Dead(Error),
    Transient(Error),
}
use OrderFailure::{Dead, Transient};

impl From<instant_acme::Error> for OrderFailure {
    fn from(error: instant_acme::Error) -> Self {
        Transient(error.into())
    }
}

fn observed(order: &mut Order) -> OrderEvent {
    let state = order.state();
    OrderEvent::Observed {
        status: state.status,
        problem: state.error.as_ref().map(ToString::to_string),
    }
}

/// RFC 8555 §7.5.1: for each pending authorization, publish the HTTP-01 key authorization and
/// tell the CA the challenge is ready (unless it is already being processed, after a restart).
///
/// A challenge may change state under us (a resumed order whose validation was already under
/// way); if telling the CA fails, the order is re-read once and only challenges that are still
/// pending are retried, so the second failure is the one reported.
async fn answer_authorizations(
    order: &mut Order,
    responder: &ChallengeResponder,
    tokens: &mut Vec<String>,
) -> std::result::Result<(), OrderFailure> {
    let first = answer_pass(order, responder, tokens).await?;
    if first.is_none() {
        return Ok(());
    }
    order.refresh().await?;
    match answer_pass(order, responder, tokens).await? {
        None => Ok(()),
        Some(error) => Err(Transient(error.into())),
    }
}

/// One pass over the authorizations; returns the first `set_ready` failure, if any.
async fn answer_pass(
    order: &mut Order,
    responder: &ChallengeResponder,
    tokens: &mut Vec<String>,
) -> std::result::Result<Option<instant_acme::Error>, OrderFailure> {
    let mut failure = None;
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            status => {
                return Err(Dead(Error::Acme {
                    problem_type: None,
                    detail: format!(
                        "the authorization for {} is {status:?}",
                        authorization.identifier()
                    ),
                    retry_after: None,
                }));
            }
        }
        let identifier = authorization.identifier().to_string();
        let mut challenge = authorization
            .challenge(ChallengeType::Http01)
            .ok_or_else(|| {
                Dead(Error::Acme {
                    problem_type: None,
                    detail: format!("the CA offers no http-01 challenge for {identifier}"),
                    retry_after: None,
                })
            })?;
        responder.insert(&challenge.token, challenge.key_authorization().as_str());
        tokens.push(challenge.token.clone());
        if challenge.status == ChallengeStatus::Pending
            && let Err(error) = challenge.set_ready().await
        {
            tracing::debug!(%identifier, %error, "telling the CA the challenge is ready failed");
            failure.get_or_insert(error);
        }
    }
    Ok(failure)
}

/// The first challenge error of an invalid order, which says why validation failed.
async fn challenge_problem(order: &mut Order) -> Option<(Option<String>, String)> {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let identifier = authorization.identifier().to_string();
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        for challenge in &state.challenges {
            if let Some(problem) = &challenge.error {
                return Some((
                    problem.r#type.clone(),
                    format!(
                        "{identifier}: {}",
                        problem
                            .detail
                            .clone()
                            .unwrap_or_else(|| problem.to_string())
                    ),
                ));
            }
        }
    }
    None
}
