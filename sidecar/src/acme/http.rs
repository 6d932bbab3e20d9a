//! The ACME client's HTTP transport (instant-acme's `HttpClient` seam) on reqwest. It also keeps
//! the CA's `Retry-After` (RFC 8555 §6.6, RFC 9110 §10.2.3) from error answers, which
//! instant-acme's `Error::Api` drops, so the issuer can honour it.

use std::cell::Cell;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Request, Response, header};
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use crate::error::{Error, Result};
use crate::metrics::AcmeRequestMetrics;

tokio::task_local! {
    /// The last `Retry-After` an error answer carried, within [`with_retry_after_capture`].
    static RETRY_AFTER: Cell<Option<RetryAfter>>;
}

/// A `Retry-After` value: a delay (`delay-seconds`) or a point in time (`HTTP-date`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// Come back after this long.
    Delay(Duration),
    /// Come back at this time.
    At(OffsetDateTime),
}

impl RetryAfter {
    /// Parses a `Retry-After` header value (RFC 9110 §10.2.3); `None` when it is neither form.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Self::Delay(Duration::from_secs(seconds)));
        }
        // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is RFC 2822 with the obsolete zone "GMT".
        let numeric_zone = value.strip_suffix("GMT").map(|rest| format!("{rest}+0000"));
        OffsetDateTime::parse(numeric_zone.as_deref().unwrap_or(value), &Rfc2822)
            .ok()
            .map(Self::At)
    }

    /// The time it names, a delay being counted from `now`.
    pub fn resolve(self, now: OffsetDateTime) -> OffsetDateTime {
        match self {
            Self::Delay(delay) => now + delay,
            Self::At(at) => at,
        }
    }
}

/// Runs `work`, remembering the `Retry-After` of any error answer the CA gives meanwhile;
/// read it with [`retry_after_seen`] from inside `work`.
pub async fn with_retry_after_capture<F: Future>(work: F) -> F::Output {
    RETRY_AFTER.scope(Cell::new(None), work).await
}

/// The last `Retry-After` an error answer carried in the current capture, if any.
pub fn retry_after_seen() -> Option<RetryAfter> {
    RETRY_AFTER.try_with(Cell::get).ok().flatten()
}

/// instant-acme's HTTP client, on reqwest (HTTP/1.1, rustls, no redirects followed).
#[derive(Debug, Clone)]
pub struct AcmeHttp {
    client: reqwest::Client,
    requests: AcmeRequestMetrics,
}

impl AcmeHttp {
    /// A client trusting the usual web roots, or only `extra_root_ca` when given (a PEM file
    /// with one CA certificate, for a private or test CA). Every request is counted and timed
    /// in `requests`.
    pub fn new(extra_root_ca: Option<&Path>, requests: AcmeRequestMetrics) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .no_proxy();
        if let Some(root) = extra_root_ca {
            let bad_root = |what: String| {
                Error::Config(format!(
                    "acme.extra_root_ca {}: {what} (it must be a PEM file with one CA certificate)",
                    root.display()
                ))
            };
            let pem = std::fs::read(root).map_err(|e| bad_root(e.to_string()))?;
            let certificate =
                reqwest::Certificate::from_pem(&pem).map_err(|e| bad_root(e.to_string()))?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(certificate);
        }
        let client = builder
            .build()
            .map_err(|e| Error::Config(format!("cannot build the ACME HTTP client: {e}")))?;
        Ok(Self { client, requests })
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>;

impl HttpClient for AcmeHttp {
    fn request(&self, request: Request<BodyWrapper<Bytes>>) -> Answer {
        let client = self.client.clone();
        let requests = self.requests.clone();
        Box::pin(async move {
            let method = request.method().to_string();
            let path = request.uri().path().to_owned();
            let started = std::time::Instant::now();
            let answer = exchange(client, request).await;
            let status = answer.as_ref().ok().map(|a| a.parts.status.as_u16());
            requests.observe(&method, &path, status, started.elapsed());
            answer
        })
    }
}

/// Sends one request and reads its whole answer.
async fn exchange(
    client: reqwest::Client,
    request: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, instant_acme::Error> {
    let other = |e: reqwest::Error| instant_acme::Error::Other(Box::new(e));
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(axum::body::Body::new(body), usize::MAX)
        .await
        .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
    let response = client
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await
        .map_err(other)?;
    let status = response.status();
    let headers = response.headers().clone();
    if (status.is_client_error() || status.is_server_error())
        && let Some(retry_after) = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(RetryAfter::parse)
    {
        let _outside_capture = RETRY_AFTER.try_with(|slot| slot.set(Some(retry_after)));
    }
    let mut bytes = response.bytes().await.map_err(other)?;
    if status.is_client_error() || status.is_server_error() {
        bytes = problem_document(status, &headers, bytes);
    }
    let mut head = Response::new(());
    *head.status_mut() = status;
    *head.headers_mut() = headers;
    let (parts, ()) = head.into_parts();
    Ok(BytesResponse {
        parts,
        body: Box::new(bytes),
    })
}

/// An error answer's body as an RFC 7807 problem document: the CA's own, or, when a proxy or
/// load balancer answered with something else (an HTML 503 page), one that says so. Without
/// this the error would read as a JSON syntax error.
fn problem_document(
    status: axum::http::StatusCode,
    headers: &axum::http::HeaderMap,
    body: Bytes,
) -> Bytes {
    let is_problem =
        serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|value| value.is_object());
    if is_problem {
        return body;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type");
    let excerpt: String = String::from_utf8_lossy(&body).chars().take(80).collect();
    let detail = format!(
        "the CA answered HTTP {status} without an ACME problem document ({content_type}: {excerpt:?}); \
         it may be down or overloaded; the attempt will be retried"
    );
    Bytes::from(serde_json::json!({ "detail": detail, "status": status.as_u16() }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// RFC 9110 §10.2.3: `Retry-After: 120` and `Retry-After: Fri, 31 Dec 1999 23:59:59 GMT`.
    #[test]
    fn retry_after_reads_both_rfc9110_forms() {
        assert_eq!(
            RetryAfter::parse("120"),
            Some(RetryAfter::Delay(Duration::from_secs(120)))
        );
        assert_eq!(
            RetryAfter::parse("Fri, 31 Dec 1999 23:59:59 GMT"),
            Some(RetryAfter::At(datetime!(1999-12-31 23:59:59 UTC)))
        );
        assert_eq!(RetryAfter::parse("soon"), None);
        let now = datetime!(2026-01-01 00:00 UTC);
        assert_eq!(
            RetryAfter::Delay(Duration::from_secs(60)).resolve(now),
            datetime!(2026-01-01 00:01 UTC)
        );
    }

    #[test]
    fn a_non_acme_error_page_becomes_a_problem_that_says_so() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "text/html".parse().expect("value"));
        let body = problem_document(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            &headers,
            Bytes::from_static(b"<html>503 Service Temporarily Unavailable</html>"),
        );
        let problem: instant_acme::Problem = serde_json::from_slice(&body).expect("problem");
        let detail = problem.detail.expect("detail");
        assert!(detail.contains("HTTP 503 Service Unavailable"), "{detail}");
        assert!(detail.contains("text/html"), "{detail}");
        assert_eq!(problem.status, Some(503));
        let own = Bytes::from_static(br#"{"type":"urn:ietf:params:acme:error:rateLimited"}"#);
        assert_eq!(
            problem_document(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                &headers,
                own.clone()
            ),
            own
        );
    }

    #[tokio::test]
    async fn retry_after_is_remembered_only_inside_a_capture() {
        assert_eq!(retry_after_seen(), None);
        let seen = with_retry_after_capture(async {
            let _ = RETRY_AFTER.try_with(|slot| {
                slot.set(Some(RetryAfter::Delay(Duration::from_secs(5))));
            });
            retry_after_seen()
        })
        .await;
        assert_eq!(seen, Some(RetryAfter::Delay(Duration::from_secs(5))));
        assert_eq!(retry_after_seen(), None);
    }
}
