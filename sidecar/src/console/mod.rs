//! The operator console, served on the admin listener under `/console`: sign-in with the admin
//! token (exchanged for a session cookie), the sites page, a site's page with its policy editor
//! and the live preview, which runs the filter's own engine compiled with wasm-bindgen
//! (`filter/web`) in the browser.
//!
//! The console never holds the admin token in the browser: its pages call `/console/api/v1/…`,
//! which checks the session (and, for state-changing methods, the CSRF token and the `Origin`)
//! and hands the request to the admin API router in-process, with the token added here. So every
//! action goes through the admin API's own handlers and checks.

mod assets;
mod session;
mod sites;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower::ServiceExt as _;

use crate::csp_reports::ReportTokens;
use crate::issuance::Issuer;
use crate::policy_feed::build_document;
use crate::store::validate_site_name;

pub use session::{COOKIE_NAME, CSRF_HEADER};
pub use sites::{CertificateState, ListingQuery, SiteSummary};

/// The console's own pages: no inline script or style, nothing from elsewhere; the browser
/// module needs `wasm-unsafe-eval` to compile the policy engine.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// What the console needs beside the admin API router.
#[derive(Debug, Clone)]
pub struct ConsoleContext {
    /// The issuer (its store and clock), for the sites listing and the policy documents.
    pub issuer: Arc<Issuer>,
    /// The admin token sign-in checks against, and the console adds to the API calls it relays.
    pub admin_token: Arc<str>,
    /// The edge settings the policy feed uses, so the preview sees the policy Envoy gets.
    pub edge: autohttps_filter::policy::Settings,
    /// The report-token key, so a `report` site's preview shows its real report URI.
    pub report_tokens: Option<ReportTokens>,
}

#[derive(Clone)]
struct ConsoleState {
    api: Router,
    context: Arc<ConsoleContext>,
    sessions: Arc<session::Sessions>,
}

impl std::fmt::Debug for ConsoleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleState")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

/// The admin API router with the console merged in under `/console`.
pub fn with_console(api: Router, context: ConsoleContext) -> Router {
    let state = ConsoleState {
        api: api.clone(),
        context: Arc::new(context),
        sessions: Arc::default(),
    };
    let signed_in = Router::new()
        .route("/console/sites", get(sites_page))
        .route("/console/site", get(site_page))
        .route("/console/preview", get(preview_page))
        .route("/console/api/session", get(session_info))
        .route("/console/api/sign-out", post(sign_out))
        .route("/console/api/sites", get(list_sites))
        .route(
            "/console/api/sites/{site}/policy-document",
            get(policy_document),
        )
        .route("/console/api/v1/{*rest}", any(relay_to_api))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    let console = Router::new()
        .route("/console", get(sign_in_page))
        .route("/console/", get(sign_in_page))
        .route("/console/sign-in", post(sign_in))
        .route("/console/static/{file}", get(static_file))
        .merge(signed_in)
        .with_state(state);
    api.merge(console)
}

/// Headers every console page and file carries.
fn page_headers(content_type: &'static str) -> [(header::HeaderName, HeaderValue); 6] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // Not `no-referrer`: with it, browsers send `Origin: null` on a form's POST, and
        // sign-in checks the Origin.
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ]
}

fn html(status: StatusCode, body: impl Into<Body>) -> Response {
    (
        status,
        page_headers("text/html; charset=utf-8"),
        body.into(),
    )
        .into_response()
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session::session_id_from_cookies)
}

/// Whether the request's `Origin` is this console's own (same host, either scheme). Browsers
/// send `Origin` on every state-changing request; one without it is not from a console page.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (host, origin) {
        (Some(host), Some(origin)) => {
            origin.strip_prefix("http://") == Some(host)
                || origin.strip_prefix("https://") == Some(host)
        }
        _ => false,
    }
}

fn refused(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "error": message })),
    )
        .into_response()
}

/// Lets a request through only with a live session; a state-changing one also needs this
/// console's `Origin` and the session's CSRF token in [`CSRF_HEADER`].
async fn require_session(
    State(state): State<ConsoleState>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let session = session_id(headers).and_then(|id| state.sessions.get(id, Instant::now()));
    let Some(session) = session else {
        if request.uri().path().starts_with("/console/api/") {
            return refused(
                StatusCode::UNAUTHORIZED,
                "not signed in to the console (or the session expired): sign in at /console",
            );
        }
        return Redirect::to("/console").into_response();
    };
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    if !safe {
        if !same_origin(headers) {
            return refused(
                StatusCode::FORBIDDEN,
                "refused: a state-changing console request must come from the console's own page (Origin does not match)",
            );
        }
        let presented = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !presented.is_some_and(|token| session::same_secret(token, &session.csrf)) {
            return refused(
                StatusCode::FORBIDDEN,
                "refused: missing or wrong CSRF token; console pages send it in X-CSRF-Token (reload the page)",
            );
        }
    }
    next.run(request).await
}

const SIGN_IN_PROBLEM_SLOT: &str = "<!--problem-->";

async fn sign_in_page(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    if session_id(&headers).is_some_and(|id| state.sessions.get(id, Instant::now()).is_some()) {
        return Redirect::to("/console/sites").into_response();
    }
    html(
        StatusCode::OK,
        assets::SIGN_IN_HTML.replace(SIGN_IN_PROBLEM_SLOT, ""),
    )
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

impl std::fmt::Debug for SignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignIn { token: <redacted> }")
    }
}

/// Exchanges the admin token for a session cookie; the token itself goes no further.
async fn sign_in(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    if !same_origin(&headers) {
        return html(
            StatusCode::FORBIDDEN,
            assets::SIGN_IN_HTML.replace(
                SIGN_IN_PROBLEM_SLOT,
                r#"<p class="problem" id="problem">Refused: sign in from this console's own page.</p>"#,
            ),
        );
    }
    if !session::same_secret(form.token.trim(), &state.context.admin_token) {
        tracing::warn!("console sign-in refused: wrong admin token");
        return html(
            StatusCode::UNAUTHORIZED,
            assets::SIGN_IN_HTML.replace(
                SIGN_IN_PROBLEM_SLOT,
                r#"<p class="problem" id="problem">That is not the admin token. It is admin.token in the configuration, AUTOHTTPS_ADMIN_TOKEN, or the file &lt;data_dir&gt;/admin-token.</p>"#,
            ),
        );
    }
    let secure = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| o.starts_with("https://"));
    let id = state.sessions.start(Instant::now());
    let mut response = Redirect::to("/console/sites").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session::session_cookie(&id, secure)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn sign_out(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        state.sessions.end(id);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session::cleared_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn session_info(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    let session = session_id(&headers).and_then(|id| state.sessions.get(id, Instant::now()));
    match session {
        Some(session) => (
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({ "csrf_token": session.csrf })),
        )
            .into_response(),
        None => refused(StatusCode::UNAUTHORIZED, "not signed in"),
    }
}

async fn sites_page() -> Response {
    html(StatusCode::OK, assets::SITES_HTML)
}

async fn site_page() -> Response {
    html(StatusCode::OK, assets::SITE_HTML)
}

async fn preview_page() -> Response {
    html(StatusCode::OK, assets::PREVIEW_HTML)
}

async fn static_file(Path(file): Path<String>) -> Response {
    match assets::file(&file) {
        Some((bytes, content_type)) => {
            (StatusCode::OK, page_headers(content_type), bytes).into_response()
        }
        None if assets::is_preview_module(&file) => (
            StatusCode::NOT_FOUND,
            page_headers("text/plain; charset=utf-8"),
            assets::MODULE_MISSING,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            page_headers("text/plain; charset=utf-8"),
            "no such console file",
        )
            .into_response(),
    }
}

fn server_error(error: crate::error::Error) -> Response {
    tracing::error!(%error, "console request failed");
    let status = if error.is_store_unavailable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    refused(status, &error.to_string())
}

/// `GET /console/api/sites?q=&state=&https=&sort=&page=&per_page=`: one page of site summaries.
async fn list_sites(
    State(state): State<ConsoleState>,
    query: Result<Query<ListingQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return refused(
            StatusCode::BAD_REQUEST,
            "bad listing query: q=TEXT, state=failing|dns-not-pointing|not-in-certificate|pending|issued, https=auto|force|disable, sort=name|state|expiry, page=N, per_page=1..500",
        );
    };
    let issuer = &state.context.issuer;
    let store = Arc::clone(issuer.store());
    let now = issuer.clock().now();
    let all = tokio::task::spawn_blocking(move || sites::summaries(store.as_ref(), now)).await;
    match all {
        Ok(Ok(all)) => Json(sites::page(all, &query)).into_response(),
        Ok(Err(error)) => server_error(error),
        Err(error) => refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("listing sites failed: {error}"),
        ),
    }
}

/// `GET /console/api/sites/{site}/policy-document`: the policy document the feed would give
/// Envoy for this site alone (edge settings, `cert_ready`, report token), which the editor
/// changes and the preview runs.
async fn policy_document(State(state): State<ConsoleState>, Path(site): Path<String>) -> Response {
    if let Err(error) = validate_site_name(&site) {
        return refused(StatusCode::BAD_REQUEST, &error.to_string());
    }
    let context = &state.context;
    let store = context.issuer.store();
    let record = match store.site(&site) {
        Ok(Some(record)) => record,
        Ok(None) => {
            return refused(
                StatusCode::NOT_FOUND,
                &format!("no site named {site:?}; the sites page lists them"),
            );
        }
        Err(error) => return server_error(error),
    };
    let certificates = match store.current_certificates(&site) {
        Ok(certificates) => certificates,
        Err(error) => return server_error(error),
    };
    let document = build_document(
        &[record],
        &certificates,
        &context.edge,
        context.report_tokens.as_ref(),
        context.issuer.clock().now(),
    );
    Json(document).into_response()
}

/// `/console/api/v1/…` → the admin API's `/v1/…`, with the admin token added here.
async fn relay_to_api(State(state): State<ConsoleState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .strip_prefix("/console/api")
        .unwrap_or("/")
        .to_owned();
    let relayed = axum::http::Request::builder()
        .method(parts.method)
        .uri(&path_and_query)
        .body(body);
    let Ok(mut relayed) = relayed else {
        return refused(
            StatusCode::BAD_REQUEST,
            &format!("{path_and_query:?} is not a path the admin API can be asked for"),
        );
    };
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH, header::ACCEPT] {
        if let Some(value) = parts.headers.get(&name) {
            relayed.headers_mut().insert(name, value.clone());
        }
    }
    if let Ok(value) = HeaderValue::from_str(&format!("Bearer {}", state.context.admin_token)) {
        relayed.headers_mut().insert(header::AUTHORIZATION, value);
    }
    match state.api.clone().oneshot(relayed).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_static(file: &str) -> (StatusCode, String, Vec<u8>) {
        let response = static_file(Path(file.to_owned())).await;
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        (status, content_type, body.to_vec())
    }

    #[tokio::test]
    async fn the_preview_module_is_served_as_wasm_or_its_absence_says_how_to_build_it() {
        let (status, content_type, body) = get_static("autohttps_policy_web_bg.wasm").await;
        if cfg!(console_preview_module) {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(content_type, "application/wasm");
            assert!(body.starts_with(b"\0asm"), "a wasm module");
        } else {
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(String::from_utf8_lossy(&body).contains("make build"));
        }
    }

    #[tokio::test]
    async fn console_files_carry_the_strict_csp() {
        let response = static_file(Path("sites.js".to_owned())).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(header::CONTENT_SECURITY_POLICY),
            Some(&HeaderValue::from_static(CONTENT_SECURITY_POLICY))
        );
        assert!(CONTENT_SECURITY_POLICY.starts_with("default-src 'self'"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-inline"));
        let (status, _, _) = get_static("../admin-token").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn origin_must_be_this_host() {
        let headers = |host: &str, origin: Option<&str>| {
            let mut map = HeaderMap::new();
            map.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            if let Some(origin) = origin {
                map.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
            }
            map
        };
        assert!(same_origin(&headers(
            "127.0.0.1:8081",
            Some("http://127.0.0.1:8081")
        )));
        assert!(same_origin(&headers(
            "admin.example",
            Some("https://admin.example")
        )));
        assert!(!same_origin(&headers(
            "127.0.0.1:8081",
            Some("http://evil.example")
        )));
        assert!(!same_origin(&headers("127.0.0.1:8081", Some("null"))));
        assert!(!same_origin(&headers("127.0.0.1:8081", None)));
    }
}
