//! The admin API as the CLI sees it: where it is (checked), the token, one typed call per route,
//! and request paths whose segments are percent-encoded one by one, so an identifier can never
//! reach another route.

use autohttps_api as api;
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::failure::CliError;
use crate::config::Config;

/// No request body (for the calls that send none).
const NO_BODY: Option<&()> = None;

/// A client of the admin API: one method per route, taking and returning the contract's types
/// (`autohttps-api`), so a field renamed there fails to compile here.
#[derive(Debug)]
pub struct AdminClient {
    base: Url,
    token: Option<String>,
    /// Where the token was looked for, for the message when there is none.
    token_sources: String,
    http: reqwest::Client,
}

/// Checks `--admin-url`: an `http://` or `https://` URL of the admin API.
pub fn parse_admin_url(text: &str) -> Result<Url, CliError> {
    if !text.contains("://") {
        return Err(CliError::Usage(format!(
            "--admin-url {text:?} has no scheme: write it as http://{text}"
        )));
    }
    let url = Url::parse(text).map_err(|e| {
        CliError::Usage(format!(
            "--admin-url {text:?} is not a URL ({e}); write it like http://127.0.0.1:8081"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(CliError::Usage(format!(
            "--admin-url {text:?} must be an http:// or https:// URL with a host, like http://127.0.0.1:8081"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(CliError::Usage(format!(
            "--admin-url {text:?} must not have a query or fragment; give the API's base URL, like http://127.0.0.1:8081"
        )));
    }
    Ok(url)
}

impl AdminClient {
    /// A client for the admin API at `base` with `token` (none: requests go without one, and
    /// the API's refusal says how to give one).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, CliError> {
        Ok(Self {
            base: parse_admin_url(base)?,
            token,
            token_sources: "--token or AUTOHTTPS_ADMIN_TOKEN".into(),
            http: reqwest::Client::new(),
        })
    }

    /// Resolves the URL and token from flags, then the configuration, then defaults.
    pub fn from_cli(cli: &super::Cli) -> Result<Self, CliError> {
        let config = Config::load(cli.config.as_deref())?;
        let base = cli
            .admin_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.listen.admin));
        let token_file = config.admin_token_path();
        let token = cli.token.clone().or(config.admin.token).or_else(|| {
            std::fs::read_to_string(&token_file)
                .ok()
                .map(|t| t.trim().to_owned())
        });
        let mut client = Self::new(&base, token)?;
        client.token_sources = format!(
            "--token, AUTOHTTPS_ADMIN_TOKEN, admin.token in the configuration, or the file {} (readable where `autohttps serve` runs)",
            token_file.display()
        );
        Ok(client)
    }

    /// The URL of `segments` below the base, each segment percent-encoded (a `/`, `?` or `#`
    /// in an identifier stays inside its segment).
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// `GET /v1/sites`.
    pub async fn sites(&self) -> Result<Vec<api::Site>, CliError> {
        self.call(Method::GET, &["v1", "sites"], &[], NO_BODY).await
    }

    /// `GET /v1/sites/{site}`.
    pub async fn site(&self, site: &str) -> Result<api::SiteDetail, CliError> {
        self.call(Method::GET, &["v1", "sites", site], &[], NO_BODY)
            .await
    }

    /// `POST /v1/sites`.
    pub async fn create_site(&self, site: &api::CreateSite) -> Result<api::Site, CliError> {
        self.call(Method::POST, &["v1", "sites"], &[], Some(site))
            .await
    }

    /// `PATCH /v1/sites/{site}`.
    pub async fn update_site(
        &self,
        site: &str,
        changes: &api::UpdateSite,
    ) -> Result<api::Site, CliError> {
        self.call(Method::PATCH, &["v1", "sites", site], &[], Some(changes))
            .await
    }

    /// `DELETE /v1/sites/{site}`.
    pub async fn remove_site(&self, site: &str) -> Result<(), CliError> {
        self.send(Method::DELETE, &["v1", "sites", site], &[], NO_BODY)
            .await
            .map(|_| ())
    }

    /// `POST /v1/sites/{site}/hostnames`.
    pub async fn add_hostname(&self, site: &str, hostname: &str) -> Result<api::Site, CliError> {
        let body = api::AddHostname {
            hostname: hostname.to_owned(),
        };
        self.call(
            Method::POST,
            &["v1", "sites", site, "hostnames"],
            &[],
            Some(&body),
        )
        .await
    }

    /// `DELETE /v1/sites/{site}/hostnames/{hostname}`.
    pub async fn remove_hostname(&self, site: &str, hostname: &str) -> Result<api::Site, CliError> {
        self.call(
            Method::DELETE,
            &["v1", "sites", site, "hostnames", hostname],
            &[],
            NO_BODY,
        )
        .await
    }

    /// `POST /v1/sites/{site}/regenerate`.
    pub async fn regenerate(&self, site: &str) -> Result<api::RegenerateAccepted, CliError> {
        self.call(
            Method::POST,
            &["v1", "sites", site, "regenerate"],
            &[],
            NO_BODY,
        )
        .await
    }

    /// `GET /v1/sites/{site}/certificates`.
    pub async fn certificates(&self, site: &str) -> Result<api::CertificateStatus, CliError> {
        self.call(
            Method::GET,
            &["v1", "sites", site, "certificates"],
            &[],
            NO_BODY,
        )
        .await
    }

    /// `GET /v1/sites/{site}/events?limit=N`: the newest `limit` events, newest first.
    pub async fn events(&self, site: &str, limit: usize) -> Result<Vec<api::Event>, CliError> {
        let limit = limit.to_string();
        self.call(
            Method::GET,
            &["v1", "sites", site, "events"],
            &[("limit", &limit)],
            NO_BODY,
        )
        .await
    }

    /// `GET /v1/sites/{site}/mixed-content`.
    pub async fn mixed_content(
        &self,
        site: &str,
    ) -> Result<Vec<api::MixedContentFinding>, CliError> {
        self.call(
            Method::GET,
            &["v1", "sites", site, "mixed-content"],
            &[],
            NO_BODY,
        )
        .await
    }

    /// `GET /v1/diagnose/{hostname}`.
    pub async fn diagnose(&self, hostname: &str) -> Result<api::Diagnosis, CliError> {
        self.call(Method::GET, &["v1", "diagnose", hostname], &[], NO_BODY)
            .await
    }

    /// Sends a request and reads a 2xx answer as `T`; an answer that is not `T` (a server of
    /// another version, or not the admin API) is refused with what did not fit.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, CliError> {
        let (status, text) = self.send(method, segments, query, body).await?;
        serde_json::from_str(&text).map_err(|error| {
            if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
                return self.not_the_admin_api(status);
            }
            CliError::Server(format!(
                "the admin API at {} answered {status} with JSON this CLI does not understand ({error}): is the server another version of autohttps than this CLI ({})?",
                self.base,
                env!("CARGO_PKG_VERSION")
            ))
        })
    }

    /// Sends a request; a 2xx answer's status and body text are returned, anything else
    /// becomes the fitting [`CliError`].
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(StatusCode, String), CliError> {
        let url = self.url(segments, query);
        let mut request = self.http.request(method, url.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            CliError::Unreachable(format!(
                "cannot reach the admin API at {} ({}): is `autohttps serve` running, and is this its listen.admin address?",
                self.base,
                root_cause(&e)
            ))
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok((status, text));
        }
        // The admin API answers every failure with {"error": "..."}; anything else is another
        // server (the internal listener, a proxy, another program on the port).
        let Ok(api::ErrorBody { error: message }) = serde_json::from_str(&text) else {
            return Err(self.not_the_admin_api(status));
        };
        Err(match status {
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => CliError::Usage(message),
            StatusCode::NOT_FOUND => CliError::NotFound(message),
            StatusCode::CONFLICT => CliError::Conflict(message),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                CliError::Unauthorized(match &self.token {
                    Some(_) => format!(
                        "the admin API at {} refused the token ({status}): give the right one with {}",
                        self.base, self.token_sources
                    ),
                    None => format!(
                        "no admin token: the admin API at {} requires one; give it with {}",
                        self.base, self.token_sources
                    ),
                })
            }
            _ if status.is_server_error() => {
                CliError::Server(format!("the admin API failed ({status}): {message}"))
            }
            _ => CliError::Server(format!("the admin API answered {status}: {message}")),
        })
    }

    fn not_the_admin_api(&self, status: StatusCode) -> CliError {
        CliError::Unreachable(format!(
            "{} answered {status}, but not as the autohttps admin API: is it the internal listener (listen.internal, for Envoy) or another program? \
             Point --admin-url at listen.admin (default http://127.0.0.1:8081)",
            self.base
        ))
    }
}

/// The innermost cause: for a failed connection, what the OS said ("Connection refused").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_stay_inside_their_path_segment() {
        let client = AdminClient::new("http://127.0.0.1:8081", None).unwrap();
        let url = client.url(&["v1", "sites", "demo/hostnames/www.demo.test"], &[]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8081/v1/sites/demo%2Fhostnames%2Fwww.demo.test"
        );
        let url = client.url(&["v1", "sites", "demo?x=1#y"], &[("limit", "10")]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8081/v1/sites/demo%3Fx=1%23y?limit=10"
        );
        let proxied = AdminClient::new("https://ops.example/autohttps/", None).unwrap();
        assert_eq!(
            proxied.url(&["v1", "sites"], &[]).as_str(),
            "https://ops.example/autohttps/v1/sites"
        );
    }

    #[test]
    fn an_admin_url_without_scheme_says_how_to_write_it() {
        let error = parse_admin_url("127.0.0.1:8081").unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(
            error.to_string().contains("http://127.0.0.1:8081"),
            "{error}"
        );
        assert!(parse_admin_url("ftp://127.0.0.1:8081").is_err());
        assert!(parse_admin_url("http://127.0.0.1:8081/?x=1").is_err());
        assert!(parse_admin_url("http://[::1]:8081").is_ok());
    }
}
