//! The admin API (axum, JSON, bearer token): sites, hostnames, policy, regenerate, certificate
//! status, events, diagnose, `/healthz` and Prometheus `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::diagnose::diagnose;
use crate::error::Error;
use crate::hostname::Hostname;
use crate::issuance::Issuer;
use crate::policy_feed::{PolicyFeed, RejectedSite};
use crate::store::{
    Event, HstsPolicy, HttpsMode, IssuanceSchedule, MixedContent, MixedContentFinding, NewSite,
    RedirectKind, Site, SitePolicy, StoredCertificate, validate_site_name,
};

/// Shared state of the admin handlers.
#[derive(Debug, Clone)]
pub struct AdminState {
    issuer: Arc<Issuer>,
    token: Arc<str>,
    feed: PolicyFeed,
}

/// The admin router. Every route except `/healthz` requires `Authorization: Bearer <token>`.
pub fn admin_router(issuer: Arc<Issuer>, token: &str, feed: PolicyFeed) -> Router {
    let state = AdminState {
        issuer,
        token: Arc::from(token),
        feed,
    };
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/sites", get(list_sites).post(create_site))
        .route(
            "/v1/sites/{site}",
            get(show_site).patch(update_site).delete(remove_site),
        )
        .route("/v1/sites/{site}/hostnames", post(add_hostname))
        .route(
            "/v1/sites/{site}/hostnames/{hostname}",
            delete(remove_hostname),
        )
        .route("/v1/sites/{site}/regenerate", post(regenerate))
        .route("/v1/sites/{site}/certificates", get(certificate_status))
        .route("/v1/sites/{site}/events", get(site_events))
        .route("/v1/sites/{site}/mixed-content", get(site_mixed_content))
        .route("/v1/diagnose/{hostname}", get(diagnose_hostname))
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .layer(middleware::from_fn(refuse_oversized_bodies))
        .with_state(state)
}

/// The largest request body the admin API reads (axum's default for `Json`).
const MAX_BODY_BYTES: u64 = 2 * 1024 * 1024;

/// How much of an oversized body is read and discarded before answering 413.
const MAX_DRAINED_BYTES: u64 = 16 * 1024 * 1024;

/// Answers 413 to a body declared larger than [`MAX_BODY_BYTES`], after reading (and
/// discarding) up to [`MAX_DRAINED_BYTES`] of it: a client still sending would otherwise see
/// the connection closed under it instead of the answer.
async fn refuse_oversized_bodies(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(declared) = declared.filter(|&n| n > MAX_BODY_BYTES) else {
        return next.run(request).await;
    };
    if declared <= MAX_DRAINED_BYTES {
        let mut body = request.into_body().into_data_stream();
        while let Some(Ok(_)) = futures::StreamExt::next(&mut body).await {}
    }
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(json!({
            "error": format!(
                "the request body is {declared} bytes; the admin API reads at most {MAX_BODY_BYTES}: send fewer hostnames per request"
            )
        })),
    )
        .into_response()
}

/// An error answered as `{"error": "..."}` with a fitting status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let status = match &error {
            Error::InvalidHostname { .. } | Error::InvalidInput(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            _ if error.is_store_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(%error, "admin request failed");
        }
        Self(status, error.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self(
            StatusCode::BAD_REQUEST,
            format!(
                "the request body is not acceptable JSON: {}; see `autohttps --help` for the fields",
                rejection.body_text()
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), state.token.as_bytes()) => {
            next.run(request).await
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({
                "error": "missing or wrong bearer token: send `Authorization: Bearer <token>` (admin.token, AUTOHTTPS_ADMIN_TOKEN, or <data_dir>/admin-token)"
            })),
        )
            .into_response(),
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such route; routes live under /v1 (sites, diagnose), plus /healthz and /metrics".into(),
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `POST /v1/sites`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSite {
    name: String,
    primary: String,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    https: HttpsMode,
    #[serde(default)]
    redirect: RedirectKind,
    #[serde(default)]
    hsts: Option<HstsPolicy>,
    #[serde(default)]
    mixed_content: MixedContent,
    #[serde(default)]
    canonical_host: Option<String>,
}

/// `PATCH /v1/sites/{site}`: only the fields given change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateSite {
    https: Option<HttpsMode>,
    redirect: Option<RedirectKind>,
    hsts: Option<HstsPolicy>,
    mixed_content: Option<MixedContent>,
    /// Absent: unchanged; `null`: none; a name: that one.
    #[serde(default, deserialize_with = "present")]
    canonical_host: Option<Option<String>>,
}

/// A field that is present, even as `null` (`Some(None)`), as opposed to absent (`None`).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

/// A canonical host: one of the site's exact names (the filter refuses any other).
fn check_canonical(name: &str, names: &[Hostname]) -> Result<Hostname, Error> {
    let canonical = Hostname::parse(name)?;
    if canonical.as_str().starts_with("*.") || !names.contains(&canonical) {
        return Err(Error::InvalidInput(format!(
            "canonical host {canonical} is not one of the site's exact hostnames ({}); add it first, or pick one of them",
            names
                .iter()
                .map(Hostname::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(canonical)
}

/// `POST /v1/sites/{site}/hostnames`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddHostname {
    hostname: String,
}

/// The largest HSTS max-age accepted (two years, what preload lists ask for).
const MAX_HSTS_MAX_AGE: u64 = 63_072_000;

fn check_hsts(hsts: &HstsPolicy) -> Result<(), Error> {
    if hsts.max_age > MAX_HSTS_MAX_AGE {
        return Err(Error::InvalidInput(format!(
            "hsts.max_age {} is more than two years ({MAX_HSTS_MAX_AGE} s); use a smaller value",
            hsts.max_age
        )));
    }
    // The filter refuses a policy breaking this rule (hstspreload.org's), so it is refused here.
    if hsts.preload && (hsts.max_age < 31_536_000 || !hsts.include_subdomains) {
        return Err(Error::InvalidInput(
            "hsts preload needs include_subdomains and a max_age of at least 31536000 (one year); set both, or leave preload off".into(),
        ));
    }
    Ok(())
}

async fn list_sites(State(state): State<AdminState>) -> ApiResult<Vec<Site>> {
    Ok(Json(state.issuer.store().list_sites()?))
}

async fn create_site(
    State(state): State<AdminState>,
    body: Result<Json<CreateSite>, JsonRejection>,
) -> Result<(StatusCode, Json<Site>), ApiError> {
    let Json(body) = body?;
    validate_site_name(&body.name)?;
    let primary = Hostname::parse(&body.primary)?;
    let hostnames = body
        .hostnames
        .iter()
        .map(|h| Hostname::parse(h))
        .collect::<Result<Vec<_>, _>>()?;
    let hsts = body.hsts.unwrap_or_default();
    check_hsts(&hsts)?;
    let mut names = hostnames.clone();
    names.push(primary.clone());
    let canonical_host = body
        .canonical_host
        .as_deref()
        .map(|c| check_canonical(c, &names))
        .transpose()?;
    let issuer = &state.issuer;
    let site = issuer.store().create_site(
        NewSite {
            name: body.name,
            primary,
            hostnames,
            policy: SitePolicy {
                https: body.https,
                redirect: body.redirect,
                hsts,
                mixed_content: body.mixed_content,
                canonical_host,
            },
        },
        issuer.clock().now(),
        issuer.debounced(),
    )?;
    issuer.wake();
    Ok((StatusCode::CREATED, Json(site)))
}

/// A site id from the path (percent-decoded): refused with 400 unless it is a valid site id,
/// so `demo/hostnames/x` or `demo?x=1` never reaches the store as something else.
fn valid_site_id(name: &str) -> Result<(), ApiError> {
    validate_site_name(name).map_err(ApiError::from)
}

fn require_site(state: &AdminState, name: &str) -> Result<Site, ApiError> {
    valid_site_id(name)?;
    state.issuer.store().site(name)?.ok_or_else(|| {
        Error::NotFound(format!(
            "no site named {name:?}; list sites with `autohttps site list`"
        ))
        .into()
    })
}

/// A site as `GET /v1/sites/{site}` shows it: the stored site and, when the policy feed cannot
/// serve its entry (it fails the filter's validation), why.
#[derive(Debug, Serialize)]
struct ShownSite {
    #[serde(flatten)]
    site: Site,
    /// The filter's problems with the site's entry and whether its previous good entry is
    /// served instead; `null` when its entry is served as stored.
    policy_rejected: Option<RejectedSite>,
}

async fn show_site(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> ApiResult<ShownSite> {
    let site = require_site(&state, &site)?;
    let policy_rejected = state.feed.rejected_site(&site.name);
    Ok(Json(ShownSite {
        site,
        policy_rejected,
    }))
}

async fn update_site(
    State(state): State<AdminState>,
    Path(site): Path<String>,
    body: Result<Json<UpdateSite>, JsonRejection>,
) -> ApiResult<Site> {
    let Json(body) = body?;
    let record = require_site(&state, &site)?;
    let names = record.names();
    let mut policy = record.policy;
    if let Some(canonical) = body.canonical_host {
        policy.canonical_host = canonical
            .as_deref()
            .map(|c| check_canonical(c, &names))
            .transpose()?;
    }
    if let Some(https) = body.https {
        policy.https = https;
    }
    if let Some(redirect) = body.redirect {
        policy.redirect = redirect;
    }
    if let Some(hsts) = body.hsts {
        check_hsts(&hsts)?;
        policy.hsts = hsts;
    }
    if let Some(mixed) = body.mixed_content {
        policy.mixed_content = mixed;
    }
    Ok(Json(state.issuer.store().set_policy(&site, policy)?))
}

async fn remove_site(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> Result<StatusCode, ApiError> {
    valid_site_id(&site)?;
    state.issuer.store().delete_site(&site)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn add_hostname(
    State(state): State<AdminState>,
    Path(site): Path<String>,
    body: Result<Json<AddHostname>, JsonRejection>,
) -> Result<(StatusCode, Json<Site>), ApiError> {
    valid_site_id(&site)?;
    let Json(body) = body?;
    let name = Hostname::parse(&body.hostname)?;
    let issuer = &state.issuer;
    let site =
        issuer
            .store()
            .add_hostname(&site, &name, issuer.clock().now(), issuer.debounced())?;
    issuer.wake();
    Ok((StatusCode::CREATED, Json(site)))
}

async fn remove_hostname(
    State(state): State<AdminState>,
    Path((site, hostname)): Path<(String, String)>,
) -> ApiResult<Site> {
    valid_site_id(&site)?;
    let name = Hostname::parse(&hostname)?;
    let issuer = &state.issuer;
    let site =
        issuer
            .store()
            .remove_hostname(&site, &name, issuer.clock().now(), issuer.debounced())?;
    issuer.wake();
    Ok(Json(site))
}

async fn regenerate(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let issuer = &state.issuer;
    require_site(&state, &site)?;
    let now = issuer.clock().now();
    issuer.store().request_issuance(&site, now, true)?;
    issuer.store().add_event(
        &site,
        now,
        "regenerate-requested",
        "regenerate requested",
        None,
        None,
    )?;
    issuer.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "site": site, "status": "regeneration scheduled" })),
    ))
}

/// `GET /v1/sites/{site}/certificates`.
#[derive(Debug, Serialize)]
struct CertificateStatus {
    site: String,
    certificates: Vec<StoredCertificate>,
    uncovered: Vec<Hostname>,
    orders_in_flight: Vec<OrderSummary>,
    working: bool,
    issuance: IssuanceSchedule,
}

#[derive(Debug, Serialize)]
struct OrderSummary {
    names: Vec<Hostname>,
    order_url: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: time::OffsetDateTime,
}

async fn certificate_status(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> ApiResult<CertificateStatus> {
    let record = require_site(&state, &site)?;
    let store = state.issuer.store();
    let certificates = store.current_certificates(&site)?;
    let uncovered = record
        .names()
        .into_iter()
        .filter(|n| !certificates.iter().any(|c| c.covers(n)))
        .collect();
    let orders_in_flight = store
        .orders_in_flight(Some(&site))?
        .into_iter()
        .map(|o| OrderSummary {
            names: o.names,
            order_url: o.order_url,
            created_at: o.created_at,
        })
        .collect();
    Ok(Json(CertificateStatus {
        working: state.issuer.is_working_on(&site),
        site,
        certificates,
        uncovered,
        orders_in_flight,
        issuance: record.issuance,
    }))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn site_events(
    State(state): State<AdminState>,
    Path(site): Path<String>,
    Query(query): Query<EventsQuery>,
) -> ApiResult<Vec<Event>> {
    require_site(&state, &site)?;
    let limit = query.limit.unwrap_or(100).min(10_000);
    Ok(Json(state.issuer.store().events(&site, limit)?))
}

/// The `http://` resources browsers reported for a site in `report` mode, by page.
async fn site_mixed_content(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> ApiResult<Vec<MixedContentFinding>> {
    require_site(&state, &site)?;
    Ok(Json(state.issuer.store().mixed_content(&site)?))
}

async fn diagnose_hostname(
    State(state): State<AdminState>,
    Path(hostname): Path<String>,
) -> ApiResult<crate::diagnose::Diagnosis> {
    let name = Hostname::parse(&hostname)?;
    Ok(Json(diagnose(&state.issuer, &name).await?))
}

async fn metrics(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let store = state.issuer.store();
    let counts = store.counts()?;
    let mut expiry: BTreeMap<(String, String), i64> = BTreeMap::new();
    for certificate in store.all_current_certificates()? {
        for name in &certificate.names {
            let entry = expiry
                .entry((name.to_string(), certificate.site.clone()))
                .or_insert(0);
            *entry = (*entry).max(certificate.not_after.unix_timestamp());
        }
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# HELP autohttps_certificate_expiry_timestamp_seconds Expiry (Unix time) of the newest certificate serving each name."
    );
    let _ = writeln!(
        text,
        "# TYPE autohttps_certificate_expiry_timestamp_seconds gauge"
    );
    for ((name, site), not_after) in &expiry {
        let _ = writeln!(
            text,
            "autohttps_certificate_expiry_timestamp_seconds{{name=\"{}\",site=\"{}\"}} {not_after}",
            escape_label(name),
            escape_label(site)
        );
    }
    let _ = writeln!(
        text,
        "# HELP autohttps_issuance_attempts_total Issuance attempts started."
    );
    let _ = writeln!(text, "# TYPE autohttps_issuance_attempts_total counter");
    let _ = writeln!(
        text,
        "autohttps_issuance_attempts_total {}",
        counts.attempts
    );
    let _ = writeln!(
        text,
        "# HELP autohttps_issuance_failures_total Failed issuance attempts by reason."
    );
    let _ = writeln!(text, "# TYPE autohttps_issuance_failures_total counter");
    for (reason, n) in &counts.failures_by_reason {
        let _ = writeln!(
            text,
            "autohttps_issuance_failures_total{{reason=\"{}\"}} {n}",
            escape_label(reason)
        );
    }
    let _ = writeln!(
        text,
        "# HELP autohttps_orders_in_flight ACME orders created and not yet completed."
    );
    let _ = writeln!(text, "# TYPE autohttps_orders_in_flight gauge");
    let _ = writeln!(
        text,
        "autohttps_orders_in_flight {}",
        counts.orders_in_flight
    );
    let _ = writeln!(text, "# HELP autohttps_sites Sites by HTTPS mode.");
    let _ = writeln!(text, "# TYPE autohttps_sites gauge");
    for (mode, n) in &counts.sites_by_mode {
        let mode = serde_json::to_value(mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(text, "autohttps_sites{{https_mode=\"{mode}\"}} {n}");
    }
    crate::client_events::COUNTERS.write_prometheus(&mut text);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
