//! The tonic `SecretDiscoveryService`: runs each Envoy stream's state machine against the source.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::delta::DeltaStream;
use super::nonce::Nonces;
use super::secret::{SecretResolver, self_signed_default_certificate};
use super::sotw::SotwStream;
use super::source::CertificateSource;
use crate::client_events::LogBudget;
use crate::error::Error;

/// Responses waiting to be written to one stream.
const STREAM_BUFFER: usize = 16;

/// The SDS gRPC service; mount it with [`SecretDiscovery::into_server`] or let
/// [`SdsServer`](super::SdsServer) do it.
#[derive(Clone)]
pub struct SecretDiscovery {
    shared: Arc<Shared>,
}

struct Shared {
    resolver: SecretResolver,
    server_instance: Arc<str>,
    shutdown: watch::Receiver<bool>,
    /// Streams opened so far; numbers them in logs.
    opened: AtomicU64,
    /// Streams open now.
    open: AtomicUsize,
}

impl std::fmt::Debug for SecretDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretDiscovery")
            .field("server_instance", &self.shared.server_instance)
            .field(
                "default_secret_name",
                &self.shared.resolver.default_secret_name,
            )
            .finish_non_exhaustive()
    }
}

impl SecretDiscovery {
    /// A service answering from `source`; the secret `default_secret_name` is the certificate for
    /// clients without SNI. Streams end when `shutdown` turns `true` (or its sender is dropped).
    ///
    /// Generates the self-signed fallback default certificate up front.
    pub fn new(
        source: Arc<dyn CertificateSource>,
        default_secret_name: impl Into<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, Error> {
        let server_instance = Nonces::new_server_instance();
        let self_signed_default = Arc::new(self_signed_default_certificate()?);
        tracing::info!(%server_instance, "SDS service ready");
        Ok(Self {
            shared: Arc::new(Shared {
                resolver: SecretResolver {
                    source,
                    default_secret_name: default_secret_name.into(),
                    self_signed_default,
                },
                server_instance,
                shutdown,
                opened: AtomicU64::new(0),
                open: AtomicUsize::new(0),
            }),
        })
    }

    /// The tonic server wrapper, ready for `tonic::transport::Server::add_service`.
    ///
    /// Envoy opens one stream per secret name, so the per-connection HTTP/2 stream limit must
    /// stay unlimited (tonic's default) on the server this is mounted on.
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }

    /// How many SDS streams are open now. Envoy's on-demand selector opens one per secret
    /// name it holds, so this is also the number of names Envoy is currently watching.
    pub fn open_streams(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }
}

fn node_id(node: Option<&Node>) -> String {
    node.map(|node| format!("{}/{}", node.cluster, node.id))
        .unwrap_or_default()
}

/// What the stream driver needs from a protocol state machine.
trait StreamState: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// `"delta"` or `"sotw"`, for logs.
    const FLAVOUR: &'static str;
    fn node(request: &Self::Request) -> Option<&Node>;
    fn log_request(stream: u64, request: &Self::Request);
    fn on_request(
        &mut self,
        request: &Self::Request,
        resolver: &SecretResolver,
    ) -> Option<Self::Response>;
    fn on_change(&mut self, resolver: &SecretResolver) -> Option<Self::Response>;
    fn subscribed(&self) -> usize;
    /// The names `request` asks to watch (the state may still ignore some).
    fn requested(request: &Self::Request) -> Vec<&str>;
    /// Whether the stream holds `name` after its requests so far.
    fn holds(&self, name: &str) -> bool;
}

impl StreamState for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const FLAVOUR: &'static str = "delta";
    fn node(request: &Self::Request) -> Option<&Node> {
        request.node.as_ref()
    }
    fn log_request(stream: u64, request: &Self::Request) {
        log_delta_request(stream, request);
    }
    fn on_request(
        &mut self,
        request: &Self::Request,
        resolver: &SecretResolver,
    ) -> Option<Self::Response> {
        DeltaStream::on_request(self, request, resolver)
    }
    fn on_change(&mut self, resolver: &SecretResolver) -> Option<Self::Response> {
        DeltaStream::on_change(self, resolver)
    }
    fn subscribed(&self) -> usize {
        DeltaStream::subscribed(self)
    }
    fn requested(request: &Self::Request) -> Vec<&str> {
        request
            .resource_names_subscribe
            .iter()
            .chain(request.initial_resource_versions.keys())
            .map(String::as_str)
            .collect()
    }
    fn holds(&self, name: &str) -> bool {
        DeltaStream::holds(self, name)
    }
}

impl StreamState for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const FLAVOUR: &'static str = "sotw";
    fn node(request: &Self::Request) -> Option<&Node> {
        request.node.as_ref()
    }
    fn log_request(stream: u64, request: &Self::Request) {
        log_sotw_request(stream, request);
    }
    fn on_request(
        &mut self,
        request: &Self::Request,
        resolver: &SecretResolver,
    ) -> Option<Self::Response> {
        SotwStream::on_request(self, request, resolver)
    }
    fn on_change(&mut self, resolver: &SecretResolver) -> Option<Self::Response> {
        SotwStream::on_change(self, resolver)
    }
    fn subscribed(&self) -> usize {
        SotwStream::subscribed(self)
    }
    fn requested(request: &Self::Request) -> Vec<&str> {
        request.resource_names.iter().map(String::as_str).collect()
    }
    fn holds(&self, name: &str) -> bool {
        SotwStream::holds(self, name)
    }
}

/// Envoy opens a stream for each secret name it watches, so every handshake with a made-up SNI
/// opens (and closes) one: the lines about streams opening and ending share this budget, and
/// what it suppresses is counted (`autohttps_log_lines_suppressed_total`).
static STREAM_LOG: LogBudget = LogBudget::new(20, Duration::from_secs(60));

/// Drives one stream: requests and source changes in, responses out, until either side ends
/// or the server stops.
async fn run_stream<S: StreamState>(
    shared: Arc<Shared>,
    mut inbound: Streaming<S::Request>,
    outbound: mpsc::Sender<Result<S::Response, Status>>,
    mut state: S,
) {
    let flavour = S::FLAVOUR;
    let stream = shared.opened.fetch_add(1, Ordering::Relaxed) + 1;
    shared.open.fetch_add(1, Ordering::Relaxed);
    let mut changes = Some(shared.resolver.source.changes());
    let mut shutdown = shared.shutdown.clone();
    let mut node = String::new();
    // The names this stream told the source it watches.
    let mut watching: HashSet<String> = HashSet::new();
    loop {
        let response = tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if node.is_empty() {
                        node = node_id(S::node(&request));
                        if let Some(suppressed) = STREAM_LOG.admit() {
                            tracing::info!(flavour, stream, %node, suppressed, "Envoy opened an SDS stream");
                        }
                    }
                    S::log_request(stream, &request);
                    // Watched before they are resolved, so the source keeps what it loads.
                    for name in S::requested(&request) {
                        if !watching.contains(name) {
                            shared.resolver.source.watch(name);
                            watching.insert(name.to_owned());
                        }
                    }
                    let response = state.on_request(&request, &shared.resolver);
                    watching.retain(|name| {
                        let held = state.holds(name);
                        if !held {
                            shared.resolver.source.unwatch(name);
                        }
                        held
                    });
                    response
                }
                Ok(None) => {
                    if let Some(suppressed) = STREAM_LOG.admit() {
                        tracing::info!(flavour, stream, %node, suppressed, "Envoy closed its SDS stream");
                    }
                    break;
                }
                Err(status) => {
                    if let Some(suppressed) = STREAM_LOG.admit() {
                        tracing::info!(flavour, stream, %node, code = ?status.code(), suppressed, "SDS stream ended");
                    }
                    break;
                }
            },
            changed = async {
                match changes.as_mut() {
                    Some(receiver) => receiver.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if changed.is_err() {
                    tracing::warn!(flavour, stream, %node, "certificate source is gone; no further updates on this stream");
                    changes = None;
                    None
                } else {
                    if let Some(receiver) = changes.as_mut() {
                        receiver.borrow_and_update();
                    }
                    state.on_change(&shared.resolver)
                }
            },
            _ = shutdown.wait_for(|stopping| *stopping) => {
                tracing::info!(flavour, stream, %node, "SDS server stopping; ending stream");
                break;
            }
        };
        if let Some(response) = response
            && outbound.send(Ok(response)).await.is_err()
        {
            tracing::info!(flavour, stream, %node, "Envoy went away");
            break;
        }
    }
    for name in watching {
        shared.resolver.source.unwatch(&name);
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(flavour, stream, %node, subscribed = state.subscribed(), "SDS stream finished");
}

fn log_delta_request(stream: u64, request: &DeltaDiscoveryRequest) {
    let mut initial: Vec<_> = request
        .initial_resource_versions
        .iter()
        .map(|(name, version)| format!("{name}@{version}"))
        .collect();
    initial.sort();
    tracing::debug!(
        stream,
        type_url = %request.type_url,
        subscribe = %request.resource_names_subscribe.join(","),
        unsubscribe = %request.resource_names_unsubscribe.join(","),
        initial_resource_versions = %initial.join(","),
        nonce = %request.response_nonce,
        error = request.error_detail.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
        "delta secrets request"
    );
}

fn log_sotw_request(stream: u64, request: &DiscoveryRequest) {
    tracing::debug!(
        stream,
        type_url = %request.type_url,
        names = %request.resource_names.join(","),
        version = %request.version_info,
        nonce = %request.response_nonce,
        error = request.error_detail.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
        "secrets request"
    );
}

#[tonic::async_trait]
impl SecretDiscoveryService for SecretDiscovery {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let (outbound, receiver) = mpsc::channel(STREAM_BUFFER);
        let shared = Arc::clone(&self.shared);
        let state = DeltaStream::new(Nonces::new(Arc::clone(&shared.server_instance)));
        let inbound = request.into_inner();
        tokio::spawn(run_stream(shared, inbound, outbound, state));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (outbound, receiver) = mpsc::channel(STREAM_BUFFER);
        let shared = Arc::clone(&self.shared);
        let state = SotwStream::new(Nonces::new(Arc::clone(&shared.server_instance)));
        let inbound = request.into_inner();
        tokio::spawn(run_stream(shared, inbound, outbound, state));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let request = request.into_inner();
        log_sotw_request(0, &request);
        let mut state = SotwStream::new(Nonces::new(Arc::clone(&self.shared.server_instance)));
        match state.on_request(&request, &self.shared.resolver) {
            Some(response) => Ok(Response::new(response)),
            None => Err(Status::not_found(format!(
                "no certificate for any of the requested secrets ({})",
                request.resource_names.join(", ")
            ))),
        }
    }
}
