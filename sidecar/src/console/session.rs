//! Console sessions: the admin token is exchanged once for a random session id kept in an
//! HttpOnly cookie; each session has its own CSRF token that state-changing requests must echo
//! in a header. Sessions live in memory and expire; a restart signs everyone out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "autohttps_console";

/// The header a state-changing request carries the session's CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How long a session lasts after sign-in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 60 * 60);

/// At most this many sessions are kept; signing in beyond it drops the oldest.
const MAX_SESSIONS: usize = 1024;

/// One signed-in browser.
#[derive(Clone)]
pub struct Session {
    /// The token state-changing requests must send in [`CSRF_HEADER`].
    pub csrf: String,
    expires_at: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("csrf", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The sessions of one sidecar process.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.by_id.lock().map_or(0, |s| s.len());
        f.debug_struct("Sessions").field("count", &count).finish()
    }
}

/// 32 random bytes, URL-safe base64.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Sessions {
    /// Starts a session; returns its id (the cookie's value).
    pub fn start(&self, now: Instant) -> String {
        let id = random_token();
        let session = Session {
            csrf: random_token(),
            expires_at: now + SESSION_LIFETIME,
        };
        let mut sessions = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires_at > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(id, _)| id.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(id.clone(), session);
        id
    }

    /// The live session with this id, if any.
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let mut sessions = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(id) {
            Some(session) if session.expires_at > now => Some(session.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn end(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// The session id in a `Cookie` header, if the console's cookie is there.
pub fn session_id_from_cookies(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
}

/// The `Set-Cookie` value for a new session: HttpOnly (no page script reads it), SameSite=Strict
/// (no other site's page sends it), scoped to the console, Secure when the console is served
/// over HTTPS.
pub fn session_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn cleared_cookie() -> String {
    format!("{COOKIE_NAME}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Compares secrets in time independent of where they differ (the admin API's comparison).
pub fn same_secret(a: &str, b: &str) -> bool {
    crate::admin_api::constant_time_eq(a.as_bytes(), b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_expires_after_its_lifetime() {
        let sessions = Sessions::default();
        let start = Instant::now();
        let id = sessions.start(start);
        assert!(sessions.get(&id, start + Duration::from_secs(60)).is_some());
        assert!(sessions.get(&id, start + SESSION_LIFETIME).is_none());
        assert!(
            sessions.get(&id, start).is_none(),
            "an expired session is gone"
        );
    }

    #[test]
    fn sessions_have_distinct_ids_and_csrf_tokens() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let a = sessions.start(now);
        let b = sessions.start(now);
        assert_ne!(a, b);
        let (sa, sb) = (
            sessions.get(&a, now).unwrap(),
            sessions.get(&b, now).unwrap(),
        );
        assert_ne!(sa.csrf, sb.csrf);
        assert_ne!(sa.csrf, a, "the CSRF token is not the session id");
        sessions.end(&a);
        assert!(sessions.get(&a, now).is_none());
    }

    #[test]
    fn the_cookie_is_httponly_strict_and_secure_over_https() {
        let cookie = session_cookie("abc", true);
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/console"] {
            assert!(cookie.contains(part), "{cookie}");
        }
        assert!(!session_cookie("abc", false).contains("Secure"));
        assert_eq!(
            session_id_from_cookies("a=1; autohttps_console=xyz; b=2"),
            Some("xyz")
        );
        assert_eq!(session_id_from_cookies("autohttps_consolex=1"), None);
    }

    #[test]
    fn the_oldest_session_goes_when_full() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let first = sessions.start(now);
        for i in 0..MAX_SESSIONS {
            sessions.start(now + Duration::from_millis(i as u64 + 1));
        }
        assert!(sessions.get(&first, now).is_none());
    }
}
