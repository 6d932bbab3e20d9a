//! The admin API (axum, JSON, bearer token): sites, hostnames, policy, regenerate, certificate
//! status, events, diagnose, `/healthz`, Prometheus `/metrics` and its own OpenAPI document.
//!
//! The bodies are the types of the contract crate `autohttps-api` (converted from the store's
//! in [`wire`]). Every route is declared once, with `#[utoipa::path]` on its handler and
//! `routes!` below: that one declaration makes both the axum route and the document's path.

mod wire;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

use autohttps_api as api;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use utoipa::OpenApi as _;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::diagnose::diagnose;
use crate::error::Error;
use crate::hostname::Hostname;
use crate::issuance::Issuer;
use crate::policy_feed::PolicyFeed;
use crate::store::{HstsPolicy, NewSite, SiteEventKind, SitePolicy, validate_site_name};

/// Shared state of the admin handlers.
#[derive(Debug, Clone)]
pub struct AdminState {
    issuer: Arc<Issuer>,
    token: Arc<str>,
    feed: PolicyFeed,
}

/// The path the OpenAPI document is served at.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";

/// The name of the bearer-token security scheme in the document.
const BEARER_SCHEME: &str = "admin_token";

/// The operations that never touch the store, so never answer 500/503 for it.
const STORELESS_OPERATIONS: [&str; 2] = ["healthz", "openapi_document"];

/// What the document says about the API as a whole.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "autohttps admin API",
        description = "Sites, hostnames, HTTPS policy, certificates, events, mixed-content findings and diagnosis of the autohttps sidecar. Every route except /healthz needs `Authorization: Bearer <token>` (admin.token, AUTOHTTPS_ADMIN_TOKEN, or <data_dir>/admin-token). Every failure is answered as {\"error\": \"...\"} saying what was wrong and how to fix it."
    ),
    tags(
        (name = "sites", description = "Sites, their hostnames and HTTPS policy"),
        (name = "certificates", description = "Certificates, issuance and history"),
        (name = "diagnose", description = "Why a hostname has (or has no) working HTTPS"),
        (name = "operations", description = "Health, metrics and this document")
    ),
    components(schemas(api::ErrorBody))
)]
struct AdminApiInfo;

/// The routes anyone may call (the liveness probe), with their documentation.
fn public_routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new().routes(routes!(healthz))
}

/// The routes that need the token, with their documentation. Routes are added here only
/// through `routes!`, so none goes undocumented (the `admin_contract` test checks the router
/// against the document).
fn protected_routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(openapi_document))
        .routes(routes!(list_sites, create_site))
        .routes(routes!(show_site, update_site, remove_site))
        .routes(routes!(add_hostname))
        .routes(routes!(remove_hostname))
        .routes(routes!(regenerate))
        .routes(routes!(certificate_status))
        .routes(routes!(site_events))
        .routes(routes!(site_mixed_content))
        .routes(routes!(diagnose_hostname))
}

/// The admin API's OpenAPI 3.1 document, generated from the handlers' declarations: what
/// `GET /v1/openapi.json` serves and `autohttps api openapi` prints.
pub fn openapi() -> OpenApi {
    let (_, public) = public_routes().split_for_parts();
    let (_, mut document) = OpenApiRouter::with_openapi(AdminApiInfo::openapi())
        .merge(public_routes())
        .merge(protected_routes())
        .split_for_parts();
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER_SCHEME,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The admin token: admin.token in the configuration, AUTOHTTPS_ADMIN_TOKEN, or the file <data_dir>/admin-token.",
                ))
                .build(),
        ),
    );
    document.security = Some(vec![SecurityRequirement::new(
        BEARER_SCHEME,
        Vec::<String>::new(),
    )]);
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorBody",
                        ))))
                        .build(),
                )
                .build(),
        )
    };
    for (path, item) in &mut document.paths.paths {
        let is_public = public.paths.paths.contains_key(path);
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.patch,
            &mut item.delete,
            &mut item.put,
        ]
        .into_iter()
        .flatten()
        {
            let id = operation.operation_id.clone().unwrap_or_default();
            let responses = &mut operation.responses.responses;
            if is_public {
                operation.security = Some(Vec::new());
            } else {
                responses.insert(
                    "401".into(),
                    error("Missing or wrong bearer token (the answer carries `WWW-Authenticate: Bearer`)."),
                );
            }
            if !STORELESS_OPERATIONS.contains(&id.as_str()) {
                responses.insert(
                    "503".into(),
                    error("The store is unavailable (e.g. the database is down); retry later."),
                );
                responses.insert(
                    "500".into(),
                    error("An unexpected failure, logged by the sidecar."),
                );
            }
        }
    }
    document
}

/// [`openapi`] as pretty JSON with a final newline, the form checked in as `docs/openapi.json`.
pub fn openapi_json() -> String {
    let mut text = openapi().to_pretty_json().unwrap_or_else(|error| {
        format!("{{\"error\": \"cannot write the OpenAPI document: {error}\"}}")
    });
    text.push('\n');
    text
}

/// The document as served, built once.
static OPENAPI_JSON: LazyLock<String> = LazyLock::new(openapi_json);

/// The admin router. Every route except `/healthz` requires `Authorization: Bearer <token>`.
pub fn admin_router(issuer: Arc<Issuer>, token: &str, feed: PolicyFeed) -> Router {
    let state = AdminState {
        issuer,
        token: Arc::from(token),
        feed,
    };
    let (public, _) = public_routes().split_for_parts();
    let (protected, _) = protected_routes().split_for_parts();
    let protected = protected
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    public
        .method_not_allowed_fallback(method_not_allowed)
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
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body is {declared} bytes; the admin API reads at most {MAX_BODY_BYTES}: send fewer hostnames per request"
        ),
    )
    .into_response()
}

/// An error answered as `{"error": "..."}` ([`api::ErrorBody`]) with a fitting status.
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
        (self.0, Json(api::ErrorBody { error: self.1 })).into_response()
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
            [(header::WWW_AUTHENTICATE, "Bearer")],
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` (admin.token, AUTOHTTPS_ADMIN_TOKEN, or <data_dir>/admin-token)".into(),
            ),
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
        "no such route; routes live under /v1 (sites, diagnose; the document at /v1/openapi.json), plus /healthz and /metrics".into(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not take that method; the methods of every route are in the OpenAPI document at /v1/openapi.json (or `autohttps api openapi`)".into(),
    )
}

/// Liveness: answers while the admin API runs (no token needed).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The admin API is up.", body = api::Health))
)]
async fn healthz() -> Json<api::Health> {
    Json(api::Health {
        status: "ok".into(),
    })
}

/// This document (OpenAPI 3.1), generated from the handlers.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", content_type = "application/json", body = Object))
)]
async fn openapi_document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON.as_str(),
    )
        .into_response()
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
    if hsts.preload
        && (hsts.max_age < autohttps_filter::policy::HSTS_PRELOAD_MIN_MAX_AGE
            || !hsts.include_subdomains)
    {
        return Err(Error::InvalidInput(
            "hsts preload needs include_subdomains and a max_age of at least 31536000 (one year); set both, or leave preload off".into(),
        ));
    }
    Ok(())
}

/// Every site, by name.
#[utoipa::path(
    get,
    path = "/v1/sites",
    tag = "sites",
    responses((status = 200, description = "All sites, by name.", body = Vec<api::Site>))
)]
async fn list_sites(State(state): State<AdminState>) -> ApiResult<Vec<api::Site>> {
    let sites = state.issuer.store().list_sites()?;
    Ok(Json(sites.into_iter().map(api::Site::from).collect()))
}

/// Creates a site; its certificate is ordered automatically.
#[utoipa::path(
    post,
    path = "/v1/sites",
    tag = "sites",
    request_body = api::CreateSite,
    responses(
        (status = 201, description = "The site as created.", body = api::Site),
        (status = 400, description = "A bad site id, hostname or policy, or a body that is not the JSON described.", body = api::ErrorBody),
        (status = 409, description = "A site of that id exists, or a hostname belongs to another site.", body = api::ErrorBody),
        (status = 413, description = "The body is larger than 2 MiB.", body = api::ErrorBody)
    )
)]
async fn create_site(
    State(state): State<AdminState>,
    body: Result<Json<api::CreateSite>, JsonRejection>,
) -> Result<(StatusCode, Json<api::Site>), ApiError> {
    let Json(body) = body?;
    validate_site_name(&body.name)?;
    let primary = Hostname::parse(&body.primary)?;
    let hostnames = body
        .hostnames
        .iter()
        .map(|h| Hostname::parse(h))
        .collect::<Result<Vec<_>, _>>()?;
    let hsts = body.hsts.map(HstsPolicy::from).unwrap_or_default();
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
    Ok((StatusCode::CREATED, Json(site.into())))
}

/// A site id from the path (percent-decoded): refused with 400 unless it is a valid site id,
/// so `demo/hostnames/x` or `demo?x=1` never reaches the store as something else.
fn valid_site_id(name: &str) -> Result<(), ApiError> {
    validate_site_name(name).map_err(ApiError::from)
}

fn require_site(state: &AdminState, name: &str) -> Result<crate::store::Site, ApiError> {
    valid_site_id(name)?;
    state.issuer.store().site(name)?.ok_or_else(|| {
        Error::NotFound(format!(
            "no site named {name:?}; list sites with `autohttps site list`"
        ))
        .into()
    })
}

/// One site.
#[utoipa::path(
    get,
    path = "/v1/sites/{site}",
    tag = "sites",
    params(("site" = String, Path, description = "Site id")),
    responses(
        (status = 200, description = "The site.", body = api::SiteDetail),
        (status = 400, description = "Not a valid site id.", body = api::ErrorBody),
        (status = 404, description = "No such site.", body = api::ErrorBody)
    )
)]
async fn show_site(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> ApiResult<api::SiteDetail> {
    let site = require_site(&state, &site)?;
    let policy_rejected =
        state
            .feed
            .rejected_site(&site.name)
            .map(|rejected| api::PolicyRejection {
                site: rejected.site,
                problems: rejected.problems,
                previous_kept: rejected.previous_kept,
            });
    Ok(Json(api::SiteDetail {
        site: site.into(),
        policy_rejected,
    }))
}

/// Changes a site's policy; only the fields present change.
#[utoipa::path(
    patch,
    path = "/v1/sites/{site}",
    tag = "sites",
    params(("site" = String, Path, description = "Site id")),
    request_body = api::UpdateSite,
    responses(
        (status = 200, description = "The site as changed.", body = api::Site),
        (status = 400, description = "A bad policy, or a body that is not the JSON described.", body = api::ErrorBody),
        (status = 404, description = "No such site.", body = api::ErrorBody),
        (status = 413, description = "The body is larger than 2 MiB.", body = api::ErrorBody)
    )
)]
async fn update_site(
    State(state): State<AdminState>,
    Path(site): Path<String>,
    body: Result<Json<api::UpdateSite>, JsonRejection>,
) -> ApiResult<api::Site> {
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
        let hsts = HstsPolicy::from(hsts);
        check_hsts(&hsts)?;
        policy.hsts = hsts;
    }
    if let Some(mixed) = body.mixed_content {
        policy.mixed_content = mixed;
    }
    Ok(Json(state.issuer.store().set_policy(&site, policy)?.into()))
}

/// Removes a site, its certificates and its history.
#[utoipa::path(
    delete,
    path = "/v1/sites/{site}",
    tag = "sites",
    params(("site" = String, Path, description = "Site id")),
    responses(
        (status = 204, description = "Removed."),
        (status = 400, description = "Not a valid site id.", body = api::ErrorBody),
        (status = 404, description = "No such site.", body = api::ErrorBody)
    )
)]
async fn remove_site(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> Result<StatusCode, ApiError> {
    valid_site_id(&site)?;
    state.issuer.store().delete_site(&site)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds a subdomain or alias; the certificate is re-issued to include it.
#[utoipa::path(
    post,
    path = "/v1/sites/{site}/hostnames",
    tag = "sites",
    params(("site" = String, Path, description = "Site id")),
    request_body = api::AddHostname,
    responses(
        (status = 201, description = "The site with the new hostname.", body = api::Site),
        (status = 400, description = "A bad site id or hostname, or a body that is not the JSON described.", body = api::ErrorBody),
        (status = 404, description = "No such site.", body = api::ErrorBody),
        (status = 409, description = "The hostname belongs to a site already.", body = api::ErrorBody),
        (status = 413, description = "The body is larger than 2 MiB.", body = api::ErrorBody)
    )
)]
async fn add_hostname(
    State(state): State<AdminState>,
    Path(site): Path<String>,
    body: Result<Json<api::AddHostname>, JsonRejection>,
) -> Result<(StatusCode, Json<api::Site>), ApiError> {
    valid_site_id(&site)?;
    let Json(body) = body?;
    let name = Hostname::parse(&body.hostname)?;
    let issuer = &state.issuer;
    let site =
        issuer
            .store()
            .add_hostname(&site, &name, issuer.clock().now(), issuer.debounced())?;
    issuer.wake();
    Ok((StatusCode::CREATED, Json(site.into())))
}

/// Removes a subdomain or alias (not the primary domain).
#[utoipa::path(
    delete,
    path = "/v1/sites/{site}/hostnames/{hostname}",
    tag = "sites",
    params(
        ("site" = String, Path, description = "Site id"),
        ("hostname" = String, Path, description = "The hostname to remove")
    ),
    responses(
        (status = 200, description = "The site without the hostname.", body = api::Site),
        (status = 400, description = "A bad site id or hostname, or the primary domain.", body = api::ErrorBody),
        (status = 404, description = "No such site, or the hostname is not one of its names.", body = api::ErrorBody)
    )
)]
async fn remove_hostname(
    State(state): State<AdminState>,
    Path((site, hostname)): Path<(String, String)>,
) -> ApiResult<api::Site> {
    valid_site_id(&site)?;
    let name = Hostname::parse(&hostname)?;
    let issuer = &state.issuer;
    let site =
        issuer
            .store()
            .remove_hostname(&site, &name, issuer.clock().now(), issuer.debounced())?;
    issuer.wake();
    Ok(Json(site.into()))
}

/// Orders new certificates for a site now, even if the current ones suffice.
#[utoipa::path(
    post,
    path = "/v1/sites/{site}/regenerate",
    tag = "certificates",
    params(("site" = String, Path, description = "Site id")),
    responses(
        (status = 202, description = "Scheduled; follow it in the site's events and certificate status.", body = api::RegenerateAccepted),
        (status = 400, description = "Not a valid site id.", body = api::ErrorBody),
        (status = 404, description = "No such site.", body = api::ErrorBody)
    )
)]
async fn regenerate(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> Result<(StatusCode, Json<api::RegenerateAccepted>), ApiError> {
    let issuer = &state.issuer;
    require_site(&state, &site)?;
    let now = issuer.clock().now();
    issuer.store().request_issuance(&site, now, true)?;
    issuer.store().add_event(
        &site,
        now,
        SiteEventKind::RegenerateRequested,
        "regenerate requested",
        None,
        None,
    )?;
    issuer.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(api::RegenerateAccepted {
            site,
            status: "regeneration scheduled".into(),
        }),
    ))
}

/// A site's certificates, the names they do not cover, orders in flight and the schedule.
#[utoipa::path(
    get,
    path = "/v1/sites/{site}/certificates",
    tag = "certificates",
    params(("site" = String, Path, description = "Site id")),
    responses(
        (status = 200, description = "The site's certificate status.", body = api::CertificateStatus),
        (status = 400, description = "Not a valid site id.", body = api::ErrorBody),
        (status = 404, description = "No such site.", body = api::ErrorBody)
    )
)]
async fn certificate_status(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> ApiResult<api::CertificateStatus> {
    let record = require_site(&state, &site)?;
    let store = state.issuer.store();
    let certificates = store.current_certificates(&site)?;
    let uncovered = record
        .names()
        .into_iter()
        .filter(|n| !certificates.iter().any(|c| c.covers(n)))
        .map(String::from)
        .collect();
    let orders_in_flight = store
        .orders_in_flight(Some(&site))?
        .into_iter()
        .map(api::OrderSummary::from)
        .collect();
    Ok(Json(api::CertificateStatus {
        working: state.issuer.is_working_on(&site),
        site,
        certificates: certificates
            .into_iter()
            .map(api::Certificate::from)
            .collect(),
        uncovered,
        orders_in_flight,
        issuance: record.issuance.into(),
    }))
}

/// A site's history, newest first.
#[utoipa::path(
    get,
    path = "/v1/sites/{site}/events",
    tag = "certificates",
    params(("site" = String, Path, description = "Site id"), api::EventsQuery),
    responses(
        (status = 200, description = "The site's events, newest first.", body = Vec<api::Event>),
        (status = 400, description = "Not a valid site id, or a limit that is not a number.", body = api::ErrorBody),
        (status = 404, description = "No such site.", body = api::ErrorBody)
    )
)]
async fn site_events(
    State(state): State<AdminState>,
    Path(site): Path<String>,
    query: Result<Query<api::EventsQuery>, QueryRejection>,
) -> ApiResult<Vec<api::Event>> {
    require_site(&state, &site)?;
    let Query(query) = query.map_err(|rejection| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "the query is not acceptable: {}; `limit` is a whole number of events",
                rejection.body_text()
            ),
        )
    })?;
    let limit = query.limit.unwrap_or(100).min(10_000);
    let events = state.issuer.store().events(&site, limit)?;
    Ok(Json(events.into_iter().map(api::Event::from).collect()))
}

/// The `http://` resources browsers reported for a site in `report` mode, by page.
#[utoipa::path(
    get,
    path = "/v1/sites/{site}/mixed-content",
    tag = "sites",
    params(("site" = String, Path, description = "Site id")),
    responses(
        (status = 200, description = "The findings, most recently seen first.", body = Vec<api::MixedContentFinding>),
        (status = 400, description = "Not a valid site id.", body = api::ErrorBody),
        (status = 404, description = "No such site.", body = api::ErrorBody)
    )
)]
async fn site_mixed_content(
    State(state): State<AdminState>,
    Path(site): Path<String>,
) -> ApiResult<Vec<api::MixedContentFinding>> {
    require_site(&state, &site)?;
    let findings = state.issuer.store().mixed_content(&site)?;
    Ok(Json(
        findings
            .into_iter()
            .map(api::MixedContentFinding::from)
            .collect(),
    ))
}

/// Why a hostname has (or has no) working HTTPS, and how to fix it.
#[utoipa::path(
    get,
    path = "/v1/diagnose/{hostname}",
    tag = "diagnose",
    params(("hostname" = String, Path, description = "A hostname of one of the sites")),
    responses(
        (status = 200, description = "The diagnosis.", body = api::Diagnosis),
        (status = 400, description = "Not a valid hostname.", body = api::ErrorBody),
        (status = 404, description = "The hostname belongs to no site.", body = api::ErrorBody)
    )
)]
async fn diagnose_hostname(
    State(state): State<AdminState>,
    Path(hostname): Path<String>,
) -> ApiResult<api::Diagnosis> {
    let name = Hostname::parse(&hostname)?;
    Ok(Json(diagnose(&state.issuer, &name).await?.into()))
}

/// Prometheus metrics: certificate expiry per name, issuance attempts and failures, orders in
/// flight, sites by mode, clients' event counters.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.", content_type = "text/plain; version=0.0.4", body = String))
)]
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
