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

/// Adds the data-plane token to every call.
#[derive(Clone)]
pub struct Auth {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Auth {
    /// Sends `authorization: Bearer <token>`.
    pub fn bearer(token: &str) -> Result<Self, MembershipError> {
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| MembershipError::Token)?;
        Ok(Self {
            header: Some(header),
        })
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
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
}

/// The current set of workers. Replacing it keeps the connections of workers that stay.
pub struct Membership {
    conns: RwLock<Arc<Vec<Arc<Conn>>>>,
    auth: Auth,
    connect_timeout: Duration,
}

impl Membership {
    pub fn new(token: Option<&str>, connect_timeout: Duration) -> Result<Self, MembershipError> {
        let auth = match token {
            Some(t) => Auth::bearer(t)?,
            None => Auth { header: None },
        };
        Ok(Self {
            conns: RwLock::new(Arc::new(vec![])),
            auth,
            connect_timeout,
        })
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
