//! The data-plane token on the wire: `authorization: Bearer <token>` on every call to a cache
//! worker. Both ends live here, so the header's name and form are defined once: [`Auth`], the
//! readers' (and the operator's) interceptor that adds it, and [`TokenCheck`], the workers'
//! interceptor that checks it.
//!
//! A reader's token can be rotated while its connections stay up: every worker's client holds a
//! clone of one [`Auth`], whose token sits in a shared cell, so the next call of every client
//! carries the new one. The token it replaced is kept beside it ([`Tokens::previous`]) for the
//! reader's retry during a rotation, when some workers still take only the old token.

use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// The metadata key that carries the token.
pub const AUTHORIZATION: &str = "authorization";

/// A ready `authorization` value.
pub type Header = MetadataValue<Ascii>;

/// A token that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the data-plane token is not valid ASCII")]
    NotAscii,
    #[error("the data-plane token is empty; give the token, not a blank")]
    Empty,
}

/// `Bearer <token>`, the token without surrounding whitespace (as workers read their token
/// file). A blank token is refused: it must never mean "no authentication".
pub fn bearer_header(token: &str) -> Result<Header, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    let mut header: Header = format!("Bearer {token}")
        .parse()
        .map_err(|_| TokenError::NotAscii)?;
    // Kept out of HTTP/2 header compression tables and debug output.
    header.set_sensitive(true);
    Ok(header)
}

/// The tokens an [`Auth`] holds. No `Debug`: it would print them.
#[derive(Default)]
pub struct Tokens {
    /// What every call carries unless it carries a token already.
    pub current: Option<Header>,
    /// The token before the last rotation, kept while some worker may still take only it.
    pub previous: Option<Header>,
}

/// Adds the data-plane token to every call that carries none yet.
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Arc<RwLock<Tokens>>,
}

impl Auth {
    /// Sends `authorization: Bearer <token>`.
    pub fn bearer(token: &str) -> Result<Self, TokenError> {
        Ok(Self {
            tokens: Arc::new(RwLock::new(Tokens {
                current: Some(bearer_header(token)?),
                previous: None,
            })),
        })
    }

    /// Sends no token.
    pub fn none() -> Self {
        Self::default()
    }

    /// The tokens, shared with every clone.
    pub fn tokens(&self) -> RwLockReadGuard<'_, Tokens> {
        self.tokens.read()
    }

    /// The tokens, to change them for every clone at once.
    pub fn tokens_mut(&self) -> RwLockWriteGuard<'_, Tokens> {
        self.tokens.write()
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        // A call that already carries a token (a retry with the other token during a
        // rotation) keeps it.
        if !req.metadata().contains_key(AUTHORIZATION)
            && let Some(h) = &self.tokens.read().current
        {
            req.metadata_mut().insert(AUTHORIZATION, h.clone());
        }
        Ok(req)
    }
}

/// Checks the bearer token of every call, in constant time.
#[derive(Clone)]
pub struct TokenCheck {
    pub expected: Option<Arc<str>>,
}

impl TokenCheck {
    /// Whether a call whose `authorization` is this (`Bearer <token>`) may go on; the token is
    /// compared in constant time.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let given = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let (a, b) = (given.as_bytes(), expected.as_bytes());
        let mut diff = a.len() ^ b.len();
        for i in 0..a.len().min(b.len()) {
            diff |= (a[i] ^ b[i]) as usize;
        }
        diff == 0
    }

    /// The answer to a call whose token [`TokenCheck::accepts`] refused.
    pub fn refusal() -> Status {
        Status::unauthenticated(
            "missing or wrong data-plane token: readers need the CacheNamespace's token",
        )
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if self.accepts(given) {
            Ok(req)
        } else {
            Err(Self::refusal())
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    #[test]
    fn what_one_end_sends_the_other_accepts() {
        let mut auth = Auth::bearer(" s3cr3t\n").unwrap();
        let req = auth.call(Request::new(())).unwrap();
        let mut check = TokenCheck {
            expected: Some("s3cr3t".into()),
        };
        assert!(check.call(req).is_ok());
        let refused = check.call(Request::new(())).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let mut other = Auth::bearer("other").unwrap();
        assert!(check.call(other.call(Request::new(())).unwrap()).is_err());
        assert!(check.accepts(Some("Bearer s3cr3t")));
        assert!(!check.accepts(Some("Bearer s3cr3")));
        assert!(!check.accepts(Some("s3cr3t")));
        assert!(TokenCheck { expected: None }.accepts(None));
    }

    #[test]
    fn a_blank_token_is_refused() {
        assert_eq!(bearer_header(" \n").unwrap_err(), TokenError::Empty);
        assert_eq!(bearer_header("t\u{7f}k").unwrap_err(), TokenError::NotAscii);
        assert!(Auth::none().tokens().current.is_none());
    }
}
