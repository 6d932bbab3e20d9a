//! Wiring for `autohttps serve`: open the store, build the issuer, bind the admin and internal
//! listeners (the internal one serves HTTP-01 challenges and the policy feed), start the SDS
//! server over the store, run everything until stopped.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin_api::admin_router;
use crate::clock::Clock;
use crate::config::{Config, StoreLocation};
use crate::csp_reports::{ReportLimits, ReportTokens};
use crate::dns_check::DnsPrecheck;
use crate::error::{Error, Result};
use crate::hooks::{HookWorkers, Hooks, watch_expiry};
use crate::http01::{ChallengeResponder, internal_router};
use crate::issuance::Issuer;
use crate::metrics::ops_router;
use crate::policy_feed::{POLICY_PATH, PolicyFeed};
use crate::sds::{
    SdsConfig, SdsListen, SdsServer, StoreCertificateSource, default_certificate_from_files,
};
use crate::store::{PostgresStore, PostgresStoreOptions, SqliteStore, Store};

/// The assembled sidecar, not yet listening. [`Sidecar::serve`] binds the admin and internal
/// listeners and the SDS server; add routes to the internal listener with its
/// `extra_internal_routes`.
#[derive(Debug)]
pub struct Sidecar {
    /// The configuration it was built from.
    pub config: Config,
    /// The store (SDS and the policy feed read certificates and sites from here).
    pub store: Arc<dyn Store>,
    /// The issuer.
    pub issuer: Arc<Issuer>,
    /// The HTTP-01 responder shared with the internal router.
    pub responder: ChallengeResponder,
    clock: Arc<dyn Clock>,
    admin_token: String,
    report_tokens: ReportTokens,
    hook_workers: HookWorkers,
    /// The policy feed: served on the internal listener; its rejected sites are reported by
    /// the admin API and the metrics.
    feed: PolicyFeed,
}

/// A running sidecar. Dropping it stops its listeners and the issuer.
#[derive(Debug)]
pub struct RunningSidecar {
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Where the internal listener (HTTP-01, policy feed at [`POLICY_PATH`]) listens.
    pub internal_addr: SocketAddr,
    /// Where the SDS server listens (the real port when TCP port 0 was configured).
    pub sds_listen: SdsListen,
    /// Where the operations listener (`/metrics`, `/readyz`, `/healthz`) listens.
    pub metrics_addr: SocketAddr,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The issuer.
    pub issuer: Arc<Issuer>,
    sds: Option<SdsServer>,
    tasks: Vec<JoinHandle<()>>,
    /// Hook delivery and the expiry watch: stopped with the rest, but their end (a webhook
    /// whose client cannot be built) does not stop the sidecar.
    background: Vec<JoinHandle<()>>,
}

impl Drop for RunningSidecar {
    fn drop(&mut self) {
        for task in self.tasks.iter().chain(&self.background) {
            task.abort();
        }
    }
}

impl RunningSidecar {
    /// Stops everything; ends the SDS streams and removes the SDS socket file.
    pub async fn shutdown(mut self) {
        for task in self.tasks.iter().chain(&self.background) {
            task.abort();
        }
        if let Some(sds) = self.sds.take()
            && let Err(error) = sds.shutdown().await
        {
            tracing::warn!(%error, "SDS server did not stop cleanly");
        }
    }

    /// How many SDS streams Envoy holds open (one per secret name it watches).
    pub fn sds_open_streams(&self) -> usize {
        self.sds.as_ref().map_or(0, SdsServer::open_streams)
    }

    /// Waits until any listener, the SDS index refresh or the issuer stops (normally never).
    /// Call [`RunningSidecar::shutdown`] afterwards.
    pub async fn wait(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        let _finished = futures::future::select_all(self.tasks.iter_mut()).await;
    }
}

/// How long `serve` waits between attempts to reach a PostgreSQL store that is down at start,
/// at most.
const STORE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the store the configuration names ([`Config::store_location`]). A PostgreSQL store
/// that cannot be reached yet is waited for: the wait is logged and retried with a growing
/// pause (up to [`STORE_RETRY_MAX`]), never turned into an exit, so a node that boots before
/// its database simply starts once the database answers. A URL that cannot work (bad syntax,
/// a schema newer than this build) fails at once.
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    match config.store_location()? {
        StoreLocation::Sqlite(path) => Ok(Arc::new(SqliteStore::open(&path)?)),
        StoreLocation::Postgres(url) => {
            let mut options = PostgresStoreOptions::new(url, config.store.node_id());
            options.connections = config.store.connections;
            let store = PostgresStore::new(options)?;
            let mut pause = std::time::Duration::from_millis(500);
            loop {
                match store.ping() {
                    Ok(()) => break,
                    Err(error) if error.is_store_unavailable() => {
                        tracing::warn!(%error, retry_in_ms = pause.as_millis(), "waiting for the store");
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(STORE_RETRY_MAX);
                    }
                    Err(error) => return Err(error),
                }
            }
            tracing::info!(node = %config.store.node_id(), "using the PostgreSQL store");
            Ok(Arc::new(store))
        }
    }
}

impl Sidecar {
    /// Opens the store under `config.data_dir` and assembles the issuer with `clock`.
    pub fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Self> {
        crate::store::create_private_dir(&config.data_dir)?;
        let store = open_store(&config)?;
        let admin_token = admin_token(&config)?;
        let report_tokens = ReportTokens::load_or_create(&config.data_dir)?;
        let responder = ChallengeResponder::shared_through(Arc::clone(&store));
        let dns = DnsPrecheck::new(&config.dns, &config.platform)?;
        if !config.platform.precheck_enabled() {
            tracing::warn!(
                "platform.addresses and platform.cname_target are unset: the DNS pre-check is off"
            );
        }
        let (hooks, hook_workers) = Hooks::new(&config.hooks)?;
        let issuer = Issuer::new(
            Arc::clone(&store),
            Arc::clone(&clock),
            config.acme.clone(),
            dns,
            responder.clone(),
            hooks,
        );
        let feed = PolicyFeed::new(
            Arc::clone(&store),
            Arc::clone(&clock),
            config.edge.clone(),
            report_tokens.clone(),
        );
        Ok(Self {
            config,
            store,
            issuer,
            responder,
            clock,
            admin_token,
            report_tokens,
            hook_workers,
            feed,
        })
    }

    /// The admin API router, with the operator console under `/console`.
    pub fn admin_router(&self) -> Router {
        crate::console::with_console(
            admin_router(
                Arc::clone(&self.issuer),
                &self.admin_token,
                self.feed.clone(),
            ),
            crate::console::ConsoleContext {
                issuer: Arc::clone(&self.issuer),
                admin_token: Arc::from(self.admin_token.as_str()),
                edge: self.config.edge.clone(),
                report_tokens: Some(self.report_tokens.clone()),
            },
        )
    }

    /// The internal router: HTTP-01 challenges, the policy feed and mixed-content reports. Merge more routes into it
    /// before serving.
    pub fn internal_router(&self) -> Router {
        internal_router(self.responder.clone())
            .merge(self.feed.clone().router())
            .merge(crate::csp_reports::router(
                Arc::clone(&self.store),
                Arc::clone(&self.clock),
                self.report_tokens.clone(),
                ReportLimits::default(),
            ))
    }

    /// Starts the SDS server over the store (see [`StoreCertificateSource`]) and the task that
    /// keeps its index current.
    pub async fn start_sds(&self) -> Result<(SdsServer, JoinHandle<()>)> {
        let default = match (
            &self.config.sds.default_certificate,
            &self.config.sds.default_key,
        ) {
            (Some(chain), Some(key)) => Some(default_certificate_from_files(chain, key)?),
            _ => None,
        };
        let configured_default = default.is_some();
        // A fleet's PostgreSQL can go away: its edges then keep every certificate in memory, so
        // that no handshake needs the database (SQLite is a local file: loaded on demand).
        let source = StoreCertificateSource::with_holding(
            Arc::clone(&self.store),
            Arc::clone(&self.clock),
            default,
            self.config.store.url.is_some(),
        )?;
        let refresh = source.spawn_refresh();
        let listen = SdsListen::from_config(&self.config);
        if let SdsListen::Unix(path) = &listen {
            warn_unless_private_parent(path);
        }
        let server = SdsServer::start(
            SdsConfig {
                listen,
                default_secret_name: SdsConfig::DEFAULT_SECRET_NAME.to_owned(),
            },
            source,
        )
        .await?;
        tracing::info!(
            default_secret = SdsConfig::DEFAULT_SECRET_NAME,
            default_certificate = if configured_default {
                "configured"
            } else {
                "self-signed"
            },
            "SDS serves the store's certificates by SNI name"
        );
        Ok((server, refresh))
    }

    /// Binds the admin and internal listeners and the SDS server, starts serving and starts the
    /// issuer's scheduler. `extra_internal_routes` is merged into the internal router (pass
    /// `Router::new()` for none).
    pub async fn serve(self, extra_internal_routes: Router) -> Result<RunningSidecar> {
        let admin = bind(self.config.listen.admin, "admin").await?;
        let internal = bind(self.config.listen.internal, "internal").await?;
        self.serve_on(admin, internal, extra_internal_routes).await
    }

    /// Like [`Sidecar::serve`], on admin and internal listeners the caller has bound
    /// (`listen.admin` and `listen.internal` are not used; `listen.metrics` is bound here): for a caller that must name a port
    /// before the sidecar starts and cannot leave it unbound meanwhile, such as a test that
    /// tells its CA which port to validate HTTP-01 on.
    pub async fn serve_on(
        self,
        admin: TcpListener,
        internal: TcpListener,
        extra_internal_routes: Router,
    ) -> Result<RunningSidecar> {
        let admin_addr = admin
            .local_addr()
            .map_err(|e| Error::io("read admin address", "", e))?;
        let internal_addr = internal
            .local_addr()
            .map_err(|e| Error::io("read internal address", "", e))?;
        let metrics = bind(self.config.listen.metrics, "metrics").await?;
        let metrics_addr = metrics
            .local_addr()
            .map_err(|e| Error::io("read metrics address", "", e))?;
        let (sds, sds_refresh) = self.start_sds().await?;
        let sds_listen = sds.local_addr().clone();
        let ops_app = ops_router(
            Arc::clone(&self.issuer),
            sds_listen.clone(),
            self.config.metrics.clone(),
            self.feed.clone(),
        );
        let admin_app = self.admin_router();
        let internal_app = self.internal_router().merge(extra_internal_routes);
        let mut background = self.hook_workers.spawn();
        if !self.issuer.hooks().is_empty() {
            background.push(tokio::spawn(watch_expiry(
                self.issuer.hooks().clone(),
                Arc::clone(&self.store),
                Arc::clone(&self.clock),
                self.config.hooks.expiring_within(),
            )));
        }
        let tasks = vec![
            sds_refresh,
            tokio::spawn(async move {
                if let Err(error) = axum::serve(admin, admin_app).await {
                    tracing::error!(%error, "admin listener stopped");
                }
            }),
            tokio::spawn(async move {
                if let Err(error) = axum::serve(internal, internal_app).await {
                    tracing::error!(%error, "internal listener stopped");
                }
            }),
            tokio::spawn(async move {
                if let Err(error) = axum::serve(metrics, ops_app).await {
                    tracing::error!(%error, "metrics listener stopped");
                }
            }),
            tokio::spawn(Arc::clone(&self.issuer).run()),
        ];
        let sds_at = match &sds_listen {
            SdsListen::Unix(path) => format!("unix:{}", path.display()),
            SdsListen::Tcp(address) => format!("tcp:{address}"),
        };
        tracing::info!(
            %admin_addr,
            %internal_addr,
            %metrics_addr,
            sds = %sds_at,
            policy_feed = %format!("http://{internal_addr}{POLICY_PATH}"),
            directory = %self.config.acme.directory_url,
            "autohttps sidecar serving"
        );
        Ok(RunningSidecar {
            admin_addr,
            internal_addr,
            sds_listen,
            metrics_addr,
            store: self.store,
            issuer: self.issuer,
            sds: Some(sds),
            tasks,
            background,
        })
    }
}

/// The SDS socket hands out private keys: its directory should let no one else in, so that no
/// one can reach the socket in the moment between its creation and its `chmod 0600`.
fn warn_unless_private_parent(socket: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return;
    };
    if let Ok(metadata) = std::fs::metadata(parent)
        && metadata.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            directory = %parent.display(),
            mode = format!("{:o}", metadata.permissions().mode() & 0o777),
            "the SDS socket's directory is open to other users; make it 0700 (chmod 700)"
        );
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| {
        Error::Config(format!(
            "cannot listen on {addr} for the {what} listener: {source}; change listen.{what}"
        ))
    })
}

/// The admin token: from the config (or `AUTOHTTPS_ADMIN_TOKEN`), else `<data_dir>/admin-token`,
/// generated (32 random bytes, hex, file 0600) on first start.
pub fn admin_token(config: &Config) -> Result<String> {
    if let Some(token) = &config.admin.token {
        return Ok(token.clone());
    }
    let path = config.admin_token_path();
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(Error::io("read admin token", &path, error)),
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io("create admin token file", &path, e))?;
    file.write_all(token.as_bytes())
        .map_err(|e| Error::io("write admin token file", &path, e))?;
    tracing::info!(path = %path.display(), "generated an admin token");
    Ok(token)
}
