//! Wiring for `autohttps serve`: open the store, build the issuer, bind the admin and internal
//! listeners, run everything until stopped.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin_api::admin_router;
use crate::clock::Clock;
use crate::config::Config;
use crate::dns_check::DnsPrecheck;
use crate::error::{Error, Result};
use crate::http01::{ChallengeResponder, internal_router};
use crate::issuance::Issuer;
use crate::store::{SqliteStore, Store};

/// The assembled sidecar, not yet listening. Add routes to the internal listener with
/// [`Sidecar::serve`]'s `extra_internal_routes` (e.g. the policy feed).
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
    admin_token: String,
}

/// A running sidecar. Dropping it stops its listeners and the issuer.
#[derive(Debug)]
pub struct RunningSidecar {
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Where the internal listener (HTTP-01, policy feed) listens.
    pub internal_addr: SocketAddr,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The issuer.
    pub issuer: Arc<Issuer>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningSidecar {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RunningSidecar {
    /// Waits until any listener or the issuer stops (normally never), then stops the rest.
    pub async fn wait(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        if tasks.is_empty() {
            return;
        }
        let (_finished, _index, remaining) = futures::future::select_all(tasks).await;
        for task in remaining {
            task.abort();
        }
    }
}

impl Sidecar {
    /// Opens the store under `config.data_dir` and assembles the issuer with `clock`.
    pub fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Self> {
        crate::store::create_private_dir(&config.data_dir)?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.database_path())?);
        let admin_token = admin_token(&config)?;
        let responder = ChallengeResponder::default();
        let dns = DnsPrecheck::new(&config.dns, &config.platform)?;
        if !config.platform.precheck_enabled() {
            tracing::warn!(
                "platform.addresses and platform.cname_target are unset: the DNS pre-check is off"
            );
        }
        let issuer = Issuer::new(
            Arc::clone(&store),
            clock,
            config.acme.clone(),
            dns,
            responder.clone(),
        );
        Ok(Self {
            config,
            store,
            issuer,
            responder,
            admin_token,
        })
    }

    /// The admin API router.
    pub fn admin_router(&self) -> Router {
        admin_router(Arc::clone(&self.issuer), &self.admin_token)
    }

    /// The internal router: HTTP-01 challenges. Merge more routes into it before serving.
    pub fn internal_router(&self) -> Router {
        internal_router(self.responder.clone())
    }

    /// Binds both listeners, starts serving and starts the issuer's scheduler.
    /// `extra_internal_routes` is merged into the internal router (pass `Router::new()` for none).
    pub async fn serve(self, extra_internal_routes: Router) -> Result<RunningSidecar> {
        let admin = bind(self.config.listen.admin, "admin").await?;
        let internal = bind(self.config.listen.internal, "internal").await?;
        let admin_addr = admin
            .local_addr()
            .map_err(|e| Error::io("read admin address", "", e))?;
        let internal_addr = internal
            .local_addr()
            .map_err(|e| Error::io("read internal address", "", e))?;
        let admin_app = self.admin_router();
        let internal_app = self.internal_router().merge(extra_internal_routes);
        let tasks = vec![
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
            tokio::spawn(Arc::clone(&self.issuer).run()),
        ];
        tracing::info!(%admin_addr, %internal_addr, directory = %self.config.acme.directory_url, "autohttps sidecar serving");
        Ok(RunningSidecar {
            admin_addr,
            internal_addr,
            store: self.store,
            issuer: self.issuer,
            tasks,
        })
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
