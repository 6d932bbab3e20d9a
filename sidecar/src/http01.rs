//! The HTTP-01 challenge responder (RFC 8555 §8.3) and the internal listener's router.
//!
//! Key authorisations are kept in memory and, when the responder shares a store, in the store
//! too: in a fleet the CA's request may reach any edge node, and every node's responder finds
//! the token another node's order put there.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::store::Store;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Tokens currently being validated and their key authorizations (RFC 8555 §8.1).
#[derive(Debug, Clone, Default)]
pub struct ChallengeResponder {
    tokens: Arc<RwLock<HashMap<String, String>>>,
    /// Where every node of a fleet finds the tokens of the others.
    shared: Option<Arc<dyn Store>>,
}

impl ChallengeResponder {
    /// A responder that also writes its tokens to `store` and looks up tokens it does not hold
    /// there (another node's order).
    pub fn shared_through(store: Arc<dyn Store>) -> Self {
        Self {
            tokens: Arc::default(),
            shared: Some(store),
        }
    }

    /// Starts answering `token` with `key_authorization`. If the store cannot take it, this
    /// node still answers it (logged: other nodes will not).
    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.tokens
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(token.to_owned(), key_authorization.to_owned());
        if let Some(store) = &self.shared {
            let now = time::OffsetDateTime::now_utc();
            if let Err(error) = store.put_challenge(token, key_authorization, now) {
                tracing::warn!(%error, "cannot share an HTTP-01 token through the store; only this node answers it");
            }
        }
    }

    /// Stops answering `token`.
    pub fn remove(&self, token: &str) {
        self.tokens
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(token);
        if let Some(store) = &self.shared
            && let Err(error) = store.delete_challenge(token)
        {
            tracing::warn!(%error, "cannot remove an HTTP-01 token from the store");
        }
    }

    /// The key authorization for `token`, if this node or (through the store) another one is
    /// being validated for it. May ask the store: call it off the async workers.
    pub fn get(&self, token: &str) -> Option<String> {
        let held = self
            .tokens
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(token)
            .cloned();
        held.or_else(|| {
            let store = self.shared.as_ref()?;
            store.challenge(token).unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot look up an HTTP-01 token in the store");
                None
            })
        })
    }

    /// How many tokens this node is answering.
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
    let found = tokio::task::spawn_blocking(move || responder.get(&token))
        .await
        .ok()
        .flatten();
    match found {
        // RFC 8555 §8.3: the body is the key authorization, as application/octet-stream.
        Some(key_authorization) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            key_authorization,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such ACME challenge token\n").into_response(),
    }
}
