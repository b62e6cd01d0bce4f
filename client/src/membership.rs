//! Who the workers are, and a client for each.

use std::sync::Arc;
use std::time::Duration;

use lakecache_proto::lakecache::v1::cache_worker_client::CacheWorkerClient;
use parking_lot::RwLock;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// HTTP/2 keepalive of worker connections: a ping this often, and the connection is closed when
/// its answer takes longer than the timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One worker as published: its ring id and its gRPC endpoint (`http://host:port`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    pub id: String,
    pub endpoint: String,
}

type Header = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

/// Adds the data-plane token to every call. The token sits in a cell shared by every clone
/// (every worker's client), so that a new token reaches every connection at once, without new
/// channels: the next call carries it.
#[derive(Clone)]
pub struct Auth {
    header: Arc<RwLock<Option<Header>>>,
}

/// `Bearer <token>`, the token without surrounding whitespace (as workers read their token
/// file). A blank token is refused: it must never mean "no authentication".
fn bearer_header(token: &str) -> Result<Header, MembershipError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(MembershipError::EmptyToken);
    }
    format!("Bearer {token}")
        .parse()
        .map_err(|_| MembershipError::Token)
}

impl Auth {
    /// Sends `authorization: Bearer <token>`.
    pub fn bearer(token: &str) -> Result<Self, MembershipError> {
        Ok(Self {
            header: Arc::new(RwLock::new(Some(bearer_header(token)?))),
        })
    }

    /// Sends no token.
    pub fn none() -> Self {
        Self {
            header: Arc::new(RwLock::new(None)),
        }
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &*self.header.read() {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

pub type WorkerClient = CacheWorkerClient<InterceptedService<Channel, Auth>>;

/// A member with its (lazily connected) client.
pub struct Conn {
    pub member: Member,
    pub client: WorkerClient,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("worker {id}: bad endpoint {endpoint:?}: {message}")]
    Endpoint {
        id: String,
        endpoint: String,
        message: String,
    },
    #[error("the data-plane token is not valid ASCII")]
    Token,
    #[error("the data-plane token is empty; give the token, not a blank")]
    EmptyToken,
}

/// The current set of workers. Replacing it keeps the connections of workers that stay.
pub struct Membership {
    conns: RwLock<Arc<Vec<Arc<Conn>>>>,
    auth: Auth,
    connect_timeout: Duration,
    /// Bumped by every token change; see [`Membership::token_changes`].
    token_generation: tokio::sync::watch::Sender<u64>,
    rotates: std::sync::atomic::AtomicBool,
}

impl Membership {
    pub fn new(token: Option<&str>, connect_timeout: Duration) -> Result<Self, MembershipError> {
        let auth = match token {
            Some(t) => Auth::bearer(t)?,
            None => Auth::none(),
        };
        Ok(Self {
            conns: RwLock::new(Arc::new(vec![])),
            auth,
            connect_timeout,
            token_generation: tokio::sync::watch::Sender::new(0),
            rotates: Default::default(),
        })
    }

    /// Replaces the data-plane token of every worker's client (a rotation). Returns whether it
    /// changed. A blank token is refused and the current one kept.
    pub fn set_token(&self, token: &str) -> Result<bool, MembershipError> {
        let header = bearer_header(token)?;
        let mut cur = self.auth.header.write();
        if cur.as_ref() == Some(&header) {
            return Ok(false);
        }
        *cur = Some(header);
        drop(cur);
        self.token_generation.send_modify(|g| *g += 1);
        tracing::info!("data-plane token replaced");
        Ok(true)
    }

    /// Says that the token may be replaced while mounted (the FUSE server follows a token
    /// file). From then on a read that every worker refused for its token waits, within its
    /// deadline, for the next token instead of failing at once.
    pub fn expect_rotation(&self) {
        self.rotates
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// See [`Membership::expect_rotation`].
    pub fn token_rotates(&self) -> bool {
        self.rotates.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A receiver that sees every token change.
    pub fn token_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.token_generation.subscribe()
    }

    /// Replaces the member list.
    pub fn set(&self, members: Vec<Member>) -> Result<(), MembershipError> {
        let old = self.conns.read().clone();
        let mut next = Vec::with_capacity(members.len());
        for m in members {
            if let Some(c) = old.iter().find(|c| c.member == m) {
                next.push(c.clone());
                continue;
            }
            let err = |message: String| MembershipError::Endpoint {
                id: m.id.clone(),
                endpoint: m.endpoint.clone(),
                message,
            };
            let channel = Endpoint::from_shared(m.endpoint.clone())
                .map_err(|e| err(e.to_string()))?
                .connect_timeout(self.connect_timeout)
                // A peer that stops answering pings (a stopped process, a partition, a
                // half-open connection) is dropped in seconds, failing its calls at once.
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true)
                .http2_adaptive_window(true)
                .initial_stream_window_size(8 << 20)
                .initial_connection_window_size(32 << 20)
                .connect_lazy();
            let client = CacheWorkerClient::with_interceptor(channel, self.auth.clone())
                .max_decoding_message_size(16 << 20);
            next.push(Arc::new(Conn { member: m, client }));
        }
        tracing::info!(members = ?next.iter().map(|c| c.member.id.as_str()).collect::<Vec<_>>(),
            "membership updated");
        *self.conns.write() = Arc::new(next);
        Ok(())
    }

    /// A snapshot of the members.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Conn>>> {
        self.conns.read().clone()
    }

    /// Members in rendezvous order for an item, best owner first.
    pub fn owners(&self, item: u128) -> Vec<Arc<Conn>> {
        let conns = self.snapshot();
        let ids: Vec<&str> = conns.iter().map(|c| c.member.id.as_str()).collect();
        lakecache_lake::block::rendezvous_order(&ids, item)
            .into_iter()
            .map(|i| conns[i].clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn sent(auth: &mut Auth) -> Option<String> {
        let req = auth.call(tonic::Request::new(())).unwrap();
        req.metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn a_new_token_reaches_every_client_at_once() {
        let m = Membership::new(Some("old\n"), Duration::from_secs(1)).unwrap();
        // A client made before the change (each worker's client holds a clone).
        let mut client_auth = m.auth.clone();
        assert_eq!(sent(&mut client_auth).as_deref(), Some("Bearer old"));
        let changes = m.token_changes();
        assert!(m.set_token("new").unwrap());
        assert!(changes.has_changed().unwrap());
        assert_eq!(sent(&mut client_auth).as_deref(), Some("Bearer new"));
        assert!(
            !m.set_token(" new ").unwrap(),
            "the same token is no change"
        );
    }

    #[test]
    fn a_blank_token_is_refused_not_taken_for_no_authentication() {
        for blank in ["", "  ", "\n"] {
            assert!(matches!(
                Membership::new(Some(blank), Duration::from_secs(1)),
                Err(MembershipError::EmptyToken)
            ));
        }
        let m = Membership::new(Some("t"), Duration::from_secs(1)).unwrap();
        assert!(matches!(m.set_token(" "), Err(MembershipError::EmptyToken)));
        assert_eq!(sent(&mut m.auth.clone()).as_deref(), Some("Bearer t"));
        let mut none = Membership::new(None, Duration::from_secs(1)).unwrap().auth;
        assert_eq!(sent(&mut none), None);
    }
}
