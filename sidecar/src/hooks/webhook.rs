//! Webhooks: each event is POSTed as JSON, signed with HMAC-SHA256 over the timestamp and
//! body, and retried with exponential back-off when the receiver is down or answers 5xx, 408
//! or 429.
//!
//! Headers: `X-Autohttps-Event` (the type), `X-Autohttps-Delivery` (the event id, the same on
//! every retry) and `X-Autohttps-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>`. A receiver recomputes the HMAC over the raw body, compares in constant
//! time and rejects old timestamps (replays); [`verify`] does exactly that.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::mpsc;

use super::{EventKind, HookEvent, event_json};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-autohttps-signature";
/// The event type header.
pub const EVENT_HEADER: &str = "x-autohttps-event";
/// The delivery (event id) header.
pub const DELIVERY_HEADER: &str = "x-autohttps-delivery";

/// The shortest secret accepted: 16 bytes.
const MIN_SECRET_LEN: usize = 16;

/// `[[hooks.webhook]]`.
#[derive(Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST (`https://…`; `http://` only for a receiver on the same host or network).
    pub url: String,
    /// The HMAC-SHA256 key the receiver shares (at least 16 characters).
    pub secret: String,
    /// The kinds to send; empty or omitted: all.
    #[serde(default)]
    pub events: Vec<EventKind>,
    /// Per-request timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Deliveries tried per event before it is given up (and logged).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The first retry's delay; each next one doubles, up to `max_backoff_ms`.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// The longest delay between two tries.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_max_attempts() -> u32 {
    10
}
fn default_backoff_ms() -> u64 {
    1_000
}
fn default_max_backoff_ms() -> u64 {
    300_000
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_ms", &self.backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .finish()
    }
}

impl WebhookConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| format!("url {:?} is not a URL ({e})", self.url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "url {:?} must be http:// or https:// with a host",
                self.url
            ));
        }
        if self.secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "secret must be at least {MIN_SECRET_LEN} characters; generate one with `openssl rand -hex 32`"
            ));
        }
        if self.timeout_ms == 0 || self.max_attempts == 0 {
            return Err("timeout_ms and max_attempts must be at least 1".into());
        }
        if self.backoff_ms == 0 || self.max_backoff_ms < self.backoff_ms {
            return Err("backoff_ms must be at least 1 and at most max_backoff_ms".into());
        }
        Ok(())
    }

    /// The delay before try `attempt` + 1 (`attempt` counted from 1).
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(30);
        Duration::from_millis(
            self.backoff_ms
                .saturating_mul(factor)
                .min(self.max_backoff_ms),
        )
    }
}

/// The `X-Autohttps-Signature` value for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The header is not `t=<unix seconds>,v1=<hex>`.
    #[error("the signature header is not t=<unix seconds>,v1=<hex HMAC-SHA256>")]
    Malformed,
    /// The timestamp is further from now than the tolerance (a replay or a wrong clock).
    #[error("the signature's timestamp is {0} s away from now: a replay, or a clock to fix")]
    Stale(u64),
    /// The HMAC does not match (another secret, or a changed body).
    #[error("the signature does not match the body: check the shared secret")]
    Mismatch,
}

/// Checks a webhook's signature header against the raw `body`, as a receiver should: the
/// timestamp within `tolerance` of `now` (Unix seconds), the HMAC compared in constant time.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut tag = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
            Some(("v1", value)) => tag = decode_hex(value),
            _ => {}
        }
    }
    let (Some(timestamp), Some(tag)) = (timestamp, tag) else {
        return Err(SignatureError::Malformed);
    };
    let skew = now.abs_diff(timestamp);
    if skew > tolerance.as_secs() {
        return Err(SignatureError::Stale(skew));
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = timestamp.to_string().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(body);
    ring::hmac::verify(&key, &signed, &tag).map_err(|_| SignatureError::Mismatch)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// How one try went.
enum Outcome {
    Delivered,
    /// Try again (after at least this long, when the receiver said so).
    Retry(String, Option<Duration>),
    /// The receiver refused it for good (a 4xx other than 408/429).
    Refused(String),
}

async fn try_once(
    client: &reqwest::Client,
    config: &WebhookConfig,
    event: &HookEvent,
    body: &[u8],
) -> Outcome {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let sent = client
        .post(&config.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(EVENT_HEADER, event.kind.as_str())
        .header(DELIVERY_HEADER, &event.id)
        .header(SIGNATURE_HEADER, sign(&config.secret, now, body))
        .body(body.to_vec())
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(error) => return Outcome::Retry(format!("not delivered: {error}"), None),
    };
    let status = response.status();
    if status.is_success() {
        return Outcome::Delivered;
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let why = format!("the receiver answered {status}");
    if status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        Outcome::Retry(why, retry_after)
    } else {
        Outcome::Refused(why)
    }
}

/// Delivers one event: tries until delivered, refused, or `max_attempts` are spent.
/// Returns whether it was delivered.
pub async fn deliver(client: &reqwest::Client, config: &WebhookConfig, event: &HookEvent) -> bool {
    let body = event_json(event);
    for attempt in 1..=config.max_attempts {
        match try_once(client, config, event, &body).await {
            Outcome::Delivered => {
                tracing::debug!(url = %config.url, event = event.kind.as_str(), site = %event.site, attempt, "webhook delivered");
                return true;
            }
            Outcome::Refused(why) => {
                tracing::error!(url = %config.url, event = event.kind.as_str(), site = %event.site, "webhook refused ({why}); not retried: fix the receiver");
                return false;
            }
            Outcome::Retry(why, asked) => {
                if attempt == config.max_attempts {
                    tracing::error!(url = %config.url, event = event.kind.as_str(), site = %event.site, attempts = attempt, "webhook given up ({why})");
                    return false;
                }
                let delay = asked
                    .map_or_else(
                        || config.backoff(attempt),
                        |asked| asked.max(config.backoff(attempt)),
                    )
                    .min(Duration::from_millis(config.max_backoff_ms));
                tracing::warn!(url = %config.url, event = event.kind.as_str(), site = %event.site, attempt, retry_in = ?delay, "webhook failed ({why}); will retry");
                tokio::time::sleep(delay).await;
            }
        }
    }
    false
}

/// Delivers every event from `queue` in order, until the queue closes.
pub async fn deliver_all(config: WebhookConfig, mut queue: mpsc::Receiver<HookEvent>) {
    crate::acme::install_crypto_provider();
    let client = match reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_millis(config.timeout_ms))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(url = %config.url, %error, "cannot build the webhook client; this webhook gets no events");
            return;
        }
    };
    while let Some(event) = queue.recv().await {
        deliver(&client, &config, &event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_any_change_fails() {
        let secret = "0123456789abcdef";
        let body = br#"{"type":"certificate-issued"}"#;
        let header = sign(secret, 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="), "{header}");
        let tolerance = Duration::from_secs(300);
        assert_eq!(
            verify(secret, &header, body, 1_700_000_100, tolerance),
            Ok(())
        );
        assert_eq!(
            verify("another-secret-16", &header, body, 1_700_000_100, tolerance),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                secret,
                &header,
                br#"{"type":"certificate-failed"}"#,
                1_700_000_100,
                tolerance
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(secret, &header, body, 1_700_001_000, tolerance),
            Err(SignatureError::Stale(1000))
        );
        assert_eq!(
            verify(secret, "v1=00", body, 1_700_000_000, tolerance),
            Err(SignatureError::Malformed)
        );
    }

    /// RFC 4231 test case 2 (key "Jefe"), to pin the HMAC itself.
    #[test]
    fn hmac_sha256_matches_rfc4231() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let tag = ring::hmac::sign(&key, b"what do ya want for nothing?");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = WebhookConfig {
            url: "http://127.0.0.1:1/".into(),
            secret: "0123456789abcdef".into(),
            events: Vec::new(),
            timeout_ms: 1000,
            max_attempts: 5,
            backoff_ms: 1000,
            max_backoff_ms: 5000,
        };
        let delays: Vec<u64> = (1..=5)
            .map(|n| config.backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [1000, 2000, 4000, 5000, 5000]);
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
    }
}
