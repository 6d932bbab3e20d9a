//! Where the SDS server listens (owner-only Unix socket, or TCP) and its start/stop handle.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

use super::service::SecretDiscovery;
use super::source::CertificateSource;
use crate::config::Config;
use crate::error::Error;

/// How long [`SdsServer::shutdown`] waits for open streams to close before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where the SDS server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SdsListen {
    /// A Unix socket at this path, mode 0600 (the default; Envoy's `pipe` address).
    Unix(PathBuf),
    /// A TCP address (port 0 picks a free port; see [`SdsServer::local_addr`]).
    Tcp(SocketAddr),
}

impl SdsListen {
    /// Where the configuration says to listen: `sds.tcp` if set, else the Unix socket
    /// `sds.socket`, by default `<data_dir>/sds.sock`.
    pub fn from_config(config: &Config) -> Self {
        match config.sds.tcp {
            Some(address) => SdsListen::Tcp(address),
            None => SdsListen::Unix(config.sds_socket_path()),
        }
    }
}

/// The SDS server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    /// Where to listen.
    pub listen: SdsListen,
    /// The secret name that stands for the certificate of clients without SNI: the SNI mapper's
    /// `default_value` in the Envoy config (and usable as a classic SDS secret name).
    pub default_secret_name: String,
}

impl SdsConfig {
    /// The secret name `envoy/edge.yaml` uses for clients without SNI.
    pub const DEFAULT_SECRET_NAME: &'static str = "default";

    /// Listen on the Unix socket at `path`, with the default secret name.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            listen: SdsListen::Unix(path.into()),
            default_secret_name: Self::DEFAULT_SECRET_NAME.to_owned(),
        }
    }

    /// Listen on TCP at `address`, with the default secret name.
    pub fn tcp(address: SocketAddr) -> Self {
        Self {
            listen: SdsListen::Tcp(address),
            default_secret_name: Self::DEFAULT_SECRET_NAME.to_owned(),
        }
    }
}

/// A running SDS server. Stop it with [`SdsServer::shutdown`]; dropping it also stops it
/// (streams end, the socket file is removed by the server task).
#[derive(Debug)]
pub struct SdsServer {
    listening: SdsListen,
    service: SecretDiscovery,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl SdsServer {
    /// Binds the listener and starts serving `source` in a background task.
    ///
    /// For a Unix socket: creates the parent directory (mode 0700) when missing, removes a stale
    /// socket file left by a previous run, refuses to replace a live socket or a non-socket file,
    /// and makes the socket owner-only (0600). Fails if the listener cannot be set up, so a
    /// returned server is accepting connections.
    pub async fn start(
        config: SdsConfig,
        source: Arc<dyn CertificateSource>,
    ) -> Result<Self, Error> {
        let (stop, stopping) = watch::channel(false);
        let discovery = SecretDiscovery::new(source, config.default_secret_name, stopping.clone())?;
        let service = discovery.clone().into_server();
        let until_stopped = {
            let mut stopping = stopping.clone();
            async move {
                // Err means the handle is gone: stop as well.
                let _ = stopping.wait_for(|stop| *stop).await;
            }
        };
        let (listening, task) = match config.listen {
            SdsListen::Unix(path) => {
                let listener = bind_unix(&path)?;
                let inode = std::fs::metadata(&path).map(|m| m.ino()).ok();
                tracing::info!(socket = %path.display(), "SDS server listening on a Unix socket");
                let incoming = UnixListenerStream::new(listener);
                let socket = path.clone();
                let task = tokio::spawn(async move {
                    let served = Server::builder()
                        .add_service(service)
                        .serve_with_incoming_shutdown(incoming, until_stopped)
                        .await;
                    remove_own_socket(&socket, inode);
                    served.map_err(Error::from)
                });
                (SdsListen::Unix(path), task)
            }
            SdsListen::Tcp(address) => {
                let listener =
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| Error::SdsListen {
                            address: address.to_string(),
                            source,
                        })?;
                let local = listener.local_addr().map_err(|source| Error::SdsListen {
                    address: address.to_string(),
                    source,
                })?;
                tracing::info!(address = %local, "SDS server listening on TCP");
                let incoming = TcpListenerStream::new(listener);
                let task = tokio::spawn(async move {
                    Server::builder()
                        .add_service(service)
                        .serve_with_incoming_shutdown(incoming, until_stopped)
                        .await
                        .map_err(Error::from)
                });
                (SdsListen::Tcp(local), task)
            }
        };
        Ok(Self {
            listening,
            service: discovery,
            stop,
            task: Some(task),
        })
    }

    /// Where the server actually listens (with the real port when TCP port 0 was asked for).
    pub fn local_addr(&self) -> &SdsListen {
        &self.listening
    }

    /// How many SDS streams are open (one per secret name Envoy watches on demand).
    pub fn open_streams(&self) -> usize {
        self.service.open_streams()
    }

    /// Ends every stream, stops accepting, removes the socket file, and waits for the server to
    /// finish (at most a few seconds; connections still open then are cut).
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop.send_replace(true);
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(joined) => joined?,
            Err(_elapsed) => {
                tracing::warn!("SDS connections did not close in time; cutting them off");
                task.abort();
                if let SdsListen::Unix(path) = &self.listening {
                    remove_own_socket(path, None);
                }
                Ok(())
            }
        }
    }
}

impl Drop for SdsServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Binds an owner-only Unix socket at `path`, clearing a stale socket file first.
fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    let listen_error = |source| Error::SdsListen {
        address: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(listen_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::SdsSocketInUse {
                    path: path.to_owned(),
                });
            }
            tracing::info!(socket = %path.display(), "removing a stale SDS socket file");
            std::fs::remove_file(path).map_err(listen_error)?;
        }
        Ok(_) => {
            return Err(Error::SdsSocketPathOccupied {
                path: path.to_owned(),
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(listen_error(error)),
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    Ok(listener)
}

/// Removes the socket file if it is still the one this server bound (same inode), so a newer
/// server's socket at the same path is left alone.
fn remove_own_socket(path: &Path, inode: Option<u64>) {
    let still_ours = match (std::fs::symlink_metadata(path), inode) {
        (Ok(metadata), Some(inode)) => metadata.ino() == inode,
        (Ok(metadata), None) => metadata.file_type().is_socket(),
        (Err(_), _) => false,
    };
    if still_ours && let Err(error) = std::fs::remove_file(path) {
        tracing::warn!(socket = %path.display(), %error, "could not remove the SDS socket file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sds::MemoryCertificateSource;

    fn source() -> Arc<dyn CertificateSource> {
        Arc::new(MemoryCertificateSource::new())
    }

    #[tokio::test]
    async fn unix_socket_is_owner_only_and_removed_on_shutdown() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run/sds.sock");
        let server = SdsServer::start(SdsConfig::unix(&path), source())
            .await
            .expect("started");
        let mode = std::fs::metadata(&path)
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let parent_mode = std::fs::metadata(path.parent().expect("parent"))
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(parent_mode & 0o777, 0o700);
        server.shutdown().await.expect("clean shutdown");
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sds.sock");
        // A socket file nobody listens on, as a crashed sidecar leaves behind.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bound"));
        assert!(path.exists());
        let server = SdsServer::start(SdsConfig::unix(&path), source())
            .await
            .expect("started");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        server.shutdown().await.expect("clean shutdown");
    }

    #[tokio::test]
    async fn live_socket_is_not_taken_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sds.sock");
        let first = SdsServer::start(SdsConfig::unix(&path), source())
            .await
            .expect("started");
        let second = SdsServer::start(SdsConfig::unix(&path), source()).await;
        assert!(
            matches!(second, Err(Error::SdsSocketInUse { .. })),
            "{second:?}"
        );
        first.shutdown().await.expect("clean shutdown");
    }

    #[tokio::test]
    async fn regular_file_at_socket_path_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sds.sock");
        std::fs::write(&path, b"not a socket").expect("written");
        let result = SdsServer::start(SdsConfig::unix(&path), source()).await;
        assert!(
            matches!(result, Err(Error::SdsSocketPathOccupied { .. })),
            "{result:?}"
        );
        assert_eq!(std::fs::read(&path).expect("still there"), b"not a socket");
    }

    #[tokio::test]
    async fn tcp_port_zero_reports_the_real_port() {
        let server = SdsServer::start(SdsConfig::tcp(([127, 0, 0, 1], 0).into()), source())
            .await
            .expect("started");
        let SdsListen::Tcp(address) = server.local_addr() else {
            panic!("not TCP: {:?}", server.local_addr());
        };
        assert_ne!(address.port(), 0);
        assert!(std::net::TcpStream::connect(address).is_ok());
        server.shutdown().await.expect("clean shutdown");
    }
}
