//! The HTTP-01 challenge responder (RFC 8555 §8.3) and the internal listener's router.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Tokens currently being validated and their key authorizations (RFC 8555 §8.1).
#[derive(Debug, Clone, Default)]
pub struct ChallengeResponder {
    tokens: Arc<RwLock<HashMap<String, String>>>,
}

impl ChallengeResponder {
    /// Starts answering `token` with `key_authorization`.
    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.tokens
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    /// Stops answering `token`.
    pub fn remove(&self, token: &str) {
        self.tokens
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(token);
    }

    /// The key authorization for `token`, if one is being validated.
    pub fn get(&self, token: &str) -> Option<String> {
        self.tokens
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(token)
            .cloned()
    }

    /// How many tokens are being answered.
    pub fn len(&self) -> usize {
        self.tokens
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Whether no token is being answered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The internal listener's router: `GET /.well-known/acme-challenge/{token}`.
///
/// Envoy routes that path here for every host. More internal routes (the policy feed, CSP
/// reports) are added with [`Router::merge`] before serving.
pub fn internal_router(responder: ChallengeResponder) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(answer_challenge))
        .with_state(responder)
}

async fn answer_challenge(
    State(responder): State<ChallengeResponder>,
    Path(token): Path<String>,
) -> Response {
    match responder.get(&token) {
        // RFC 8555 §8.3: the body is the key authorization, as application/octet-stream.
        Some(key_authorization) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            key_authorization,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such ACME challenge token\n").into_response(),
    }
}
