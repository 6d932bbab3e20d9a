//! A MOCK, not a real CA: a fault-injecting, TLS-terminating HTTP proxy in front of Pebble. It
//! answers chosen requests itself (429 with `Retry-After`, 5xx) and can go down (connections
//! refused, open ones cut) and come back: situations a real Pebble cannot produce on demand.
//! Everything else is forwarded to Pebble with the `Host` header kept, so Pebble's URLs
//! (and the JWS `url` it checks) name the proxy and every later request comes through it too.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// An answer the proxy gives instead of forwarding, for requests whose method and path match.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Only this method (e.g. "POST"), or any.
    pub method: Option<&'static str>,
    /// Only paths starting with this (Pebble's newOrder is `/order-plz`), or any.
    pub path_prefix: &'static str,
    /// The status to answer.
    pub status: u16,
    /// The `Retry-After` header to send, if any.
    pub retry_after: Option<String>,
    /// The body: an RFC 7807 problem document, or any text (a load balancer's HTML page).
    pub body: String,
    /// How many matching requests get this answer (then it is used up).
    pub times: usize,
    /// How many matching requests are let through first.
    pub after: usize,
}

impl Fault {
    /// An ACME problem document answer (RFC 8555 §6.7) with `type` `urn:ietf:params:acme:error:<kind>`.
    pub fn problem(
        method: &'static str,
        path_prefix: &'static str,
        status: u16,
        kind: &str,
        retry_after: Option<&str>,
        times: usize,
    ) -> Self {
        Self {
            method: Some(method),
            path_prefix,
            status,
            retry_after: retry_after.map(str::to_owned),
            body: serde_json::json!({
                "type": format!("urn:ietf:params:acme:error:{kind}"),
                "detail": format!("injected by the test's mock CA proxy ({status})"),
                "status": status,
            })
            .to_string(),
            times,
            after: 0,
        }
    }
}

#[derive(Debug)]
struct Inner {
    upstream: String,
    client: reqwest::Client,
    faults: Mutex<Vec<Fault>>,
    injected: Mutex<Vec<(String, u16)>>,
    forwarded: Mutex<Vec<String>>,
    /// Bumped when the proxy goes down: connections of an older generation fail.
    generation: AtomicU64,
}

/// The running mock proxy. Dropping it stops it.
pub struct CaProxy {
    /// Where it listens (HTTPS, Pebble's listener certificate).
    pub addr: SocketAddr,
    /// Pebble's directory URL, through the proxy.
    pub directory_url: String,
    inner: Arc<Inner>,
    acceptor: TlsAcceptor,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CaProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaProxy").field("addr", &self.addr).finish()
    }
}

impl Drop for CaProxy {
    fn drop(&mut self) {
        if let Some(task) = self.server.lock().expect("server").take() {
            task.abort();
        }
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl CaProxy {
    /// Starts the proxy in front of `pebble` on a free loopback port.
    pub async fn start(pebble: &super::Pebble) -> anyhow::Result<Self> {
        let (cert, key) = pebble.listener_identity();
        let chain = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&key)?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let upstream = pebble
            .directory_url
            .strip_suffix("/dir")
            .ok_or_else(|| anyhow::anyhow!("unexpected directory URL"))?
            .to_owned();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
                &pebble.listener_ca,
            )?)?)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        let inner = Arc::new(Inner {
            upstream,
            client,
            faults: Mutex::new(Vec::new()),
            injected: Mutex::new(Vec::new()),
            forwarded: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let proxy = Self {
            addr,
            directory_url: format!("https://{addr}/dir"),
            inner,
            acceptor,
            server: Mutex::new(None),
        };
        proxy.serve(listener);
        Ok(proxy)
    }

    fn serve(&self, listener: TcpListener) {
        let app = Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&self.inner));
        let tls = TlsListener {
            listener,
            acceptor: self.acceptor.clone(),
            inner: Arc::clone(&self.inner),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(tls, app).await;
        });
        *self.server.lock().expect("server") = Some(task);
    }

    /// Adds a fault (faults are tried in the order added).
    pub fn inject(&self, fault: Fault) {
        self.inner.faults.lock().expect("faults").push(fault);
    }

    /// Faults answered so far: (method and path, status).
    pub fn injected(&self) -> Vec<(String, u16)> {
        self.inner.injected.lock().expect("injected").clone()
    }

    /// Requests forwarded to Pebble so far (method and path).
    pub fn forwarded(&self) -> Vec<String> {
        self.inner.forwarded.lock().expect("forwarded").clone()
    }

    /// The CA becomes unreachable: new connections are refused, open ones fail.
    pub fn go_down(&self) {
        if let Some(task) = self.server.lock().expect("server").take() {
            task.abort();
        }
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The CA is reachable again, on the same address.
    pub async fn come_back(&self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }
}

async fn forward(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let method = request.method().as_str().to_owned();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let fault = {
        let mut faults = inner.faults.lock().expect("faults");
        faults
            .iter_mut()
            .find(|f| {
                f.times > 0
                    && f.method.is_none_or(|m| m == method)
                    && path.starts_with(f.path_prefix)
            })
            .and_then(|f| {
                if f.after > 0 {
                    f.after -= 1;
                    return None;
                }
                f.times -= 1;
                Some(f.clone())
            })
    };
    if let Some(fault) = fault {
        inner
            .injected
            .lock()
            .expect("injected")
            .push((format!("{method} {path}"), fault.status));
        let content_type = if fault.body.starts_with('{') {
            "application/problem+json"
        } else {
            "text/html"
        };
        let mut response = (
            StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            fault.body,
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(value) = fault
            .retry_after
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    inner
        .forwarded
        .lock()
        .expect("forwarded")
        .push(format!("{method} {path}"));
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut upstream = inner
        .client
        .request(parts.method, format!("{}{path}", inner.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        upstream = upstream.header(name, value);
    }
    let Ok(answer) = upstream.send().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let Ok(bytes) = answer.bytes().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut response = (status, bytes).into_response();
    for (name, value) in &headers {
        if name != header::TRANSFER_ENCODING
            && name != header::CONNECTION
            && name != header::CONTENT_LENGTH
        {
            response.headers_mut().append(name, value.clone());
        }
    }
    response
}

/// TLS on accepted TCP connections, each tagged with the proxy's generation.
struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    inner: Arc<Inner>,
}

impl axum::serve::Listener for TlsListener {
    type Io = Cuttable<tokio_rustls::server::TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.listener.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                let generation = self.inner.generation.load(Ordering::SeqCst);
                return (
                    Cuttable {
                        io: tls,
                        generation,
                        inner: Arc::clone(&self.inner),
                    },
                    peer,
                );
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection that fails once the proxy went down after it was opened.
struct Cuttable<T> {
    io: T,
    generation: u64,
    inner: Arc<Inner>,
}

impl<T> Cuttable<T> {
    fn cut(&self) -> Option<io::Error> {
        (self.inner.generation.load(Ordering::SeqCst) != self.generation)
            .then(|| io::Error::new(io::ErrorKind::ConnectionReset, "mock CA proxy went down"))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Cuttable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(error) = self.cut() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Cuttable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.cut() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
