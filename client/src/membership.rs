//! Who the workers are, and a client for each.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The readers' token interceptor: one definition with the workers' check, in the proto crate.
pub use lakecache_proto::auth::Auth;
use lakecache_proto::auth::{AUTHORIZATION, Header, TokenError, bearer_header};

/// Which of the tokens a call carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Current,
    Previous,
}

pub type WorkerClient = CacheWorkerClient<InterceptedService<Channel, Auth>>;

/// A member with its (lazily connected) client.
pub struct Conn {
    pub member: Member,
    pub client: WorkerClient,
    /// 1 + the token generation in which this worker took the previous token and refused the
    /// current one (0: it took the current one, or was never asked with the previous one). Its
    /// calls then carry the previous token first, until the worker moves on or the token
    /// changes again.
    previous_ok: AtomicU64,
    /// 1 + the token generation in which this worker took the current token (0: not yet).
    current_ok: AtomicU64,
    /// Block transport connections to the worker (`None`: its endpoint is not plain HTTP).
    pub blocks: Option<Arc<crate::blocks::BlockPool>>,
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

impl From<TokenError> for MembershipError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::NotAscii => MembershipError::Token,
            TokenError::Empty => MembershipError::EmptyToken,
        }
    }
}

/// The current set of workers. Replacing it keeps the connections of workers that stay.
pub struct Membership {
    conns: RwLock<Arc<Vec<Arc<Conn>>>>,
    auth: Auth,
    connect_timeout: Duration,
    /// Bumped by every token change; see [`Membership::token_changes`].
    token_generation: tokio::sync::watch::Sender<u64>,
    /// Bumped by every change of the member list; see [`Membership::member_changes`].
    member_generation: tokio::sync::watch::Sender<u64>,
    rotates: std::sync::atomic::AtomicBool,
    /// Whether block reads use the block transport where workers speak it.
    block_transport: std::sync::atomic::AtomicBool,
    /// How long a read waits for a worker when none answers (milliseconds; 0: it fails).
    worker_wait_ms: std::sync::atomic::AtomicU64,
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
            member_generation: tokio::sync::watch::Sender::new(0),
            rotates: Default::default(),
            block_transport: std::sync::atomic::AtomicBool::new(true),
            worker_wait_ms: Default::default(),
        })
    }

    /// Whether block reads go over the block transport (on by default) or gRPC only.
    pub fn set_block_transport(&self, on: bool) {
        self.block_transport.store(on, Ordering::Relaxed);
    }

    /// The block transport connections of `conn`, if block reads use that transport now.
    pub fn block_pool<'a>(&self, conn: &'a Conn) -> Option<&'a Arc<crate::blocks::BlockPool>> {
        conn.blocks
            .as_ref()
            .filter(|p| self.block_transport.load(Ordering::Relaxed) && p.supported())
    }

    /// What a call carries as `authorization` when it carries nothing else (see
    /// [`Membership::call`]): `Bearer <current token>`, or nothing without a token.
    pub fn authorization(&self) -> String {
        self.auth
            .tokens()
            .current
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    /// Replaces the data-plane token of every worker's client (a rotation), and keeps the one
    /// it replaces as the previous token (see [`Membership::call`]). Returns whether it
    /// changed. A blank token is refused and the current one kept.
    pub fn set_token(&self, token: &str) -> Result<bool, MembershipError> {
        let header = bearer_header(token)?;
        let mut cur = self.auth.tokens_mut();
        if cur.current.as_ref() == Some(&header) {
            return Ok(false);
        }
        let old = cur.current.replace(header);
        // Back to the previous token (a rotation undone): the other one is now the previous.
        cur.previous = old;
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

    /// Lets a read wait up to `wait` when no worker answers, asking again when the member list
    /// changes or after a pause: workers that restart together, or all at new addresses (a
    /// rolling update of their StatefulSet), are briefly all unreachable. Without it (the
    /// default), such a read fails at once.
    pub fn wait_for_workers(&self, wait: Duration) {
        self.worker_wait_ms.store(
            wait.as_millis().min(u64::MAX as u128) as u64,
            std::sync::atomic::Ordering::Release,
        );
    }

    /// See [`Membership::wait_for_workers`].
    pub fn worker_wait(&self) -> Duration {
        Duration::from_millis(
            self.worker_wait_ms
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// See [`Membership::expect_rotation`].
    pub fn token_rotates(&self) -> bool {
        self.rotates.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A receiver that sees every token change.
    pub fn token_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.token_generation.subscribe()
    }

    /// A receiver that sees every change of the member list.
    pub fn member_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.member_generation.subscribe()
    }

    /// Whether a token from before the last rotation is kept.
    pub fn has_previous_token(&self) -> bool {
        self.auth.tokens().previous.is_some()
    }

    /// Calls worker `conn` with `msg` through `call` (which makes the gRPC call on a clone of
    /// `conn.client`, and may read the first message of a stream). During a rotation the
    /// workers and this reader change tokens at different moments, so when the worker refuses
    /// the token (`Unauthenticated`, not an error of its source) and a previous token is kept,
    /// the call is made once more with the other token. A worker that took the previous one
    /// gets it first from then on, until the token changes again or it refuses it.
    ///
    /// The previous token is dropped once every current member has taken the current one: the
    /// rotation is then over, and an old (perhaps revoked) token should not stay in memory and
    /// on the wire for as long as the process runs. Not after a grace period: a rollout of the
    /// workers has no bound a reader could know (a worker stuck on the old token for an hour
    /// still serves with it), and dropping the token under such a worker would fail its reads,
    /// while keeping it costs one retried call per refusal. A member that is never called
    /// keeps the previous token around, which is harmless. A worker that goes back to the old
    /// token afterwards is refused until the token changes again, as before any rotation.
    pub async fn call<Req, T, F, Fut>(
        &self,
        conn: &Conn,
        msg: Req,
        mut call: F,
    ) -> Result<T, tonic::Status>
    where
        Req: Clone,
        F: FnMut(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let tokens = {
            let tokens = self.auth.tokens();
            tokens
                .previous
                .clone()
                .map(|previous| (tokens.current.clone(), previous))
        };
        let Some((current, previous)) = tokens else {
            // No rotation under way (every call but a rotation's): the interceptor adds the
            // only token.
            return call(tonic::Request::new(msg)).await;
        };
        let generation = *self.token_generation.borrow();
        let sent_current = current.clone();
        let (first, second) = {
            let prefer_previous = conn.previous_ok.load(Ordering::Acquire) == generation + 1;
            let current = (Which::Current, current);
            let previous = (Which::Previous, Some(previous));
            if prefer_previous {
                (previous, current)
            } else {
                (current, previous)
            }
        };
        let stamped = |header: &Option<Header>| {
            let mut req = tonic::Request::new(msg.clone());
            if let Some(h) = header {
                req.metadata_mut().insert(AUTHORIZATION, h.clone());
            }
            req
        };
        let took = |which: Which| {
            let v = match which {
                Which::Previous => generation + 1,
                Which::Current => 0,
            };
            conn.previous_ok.store(v, Ordering::Release);
            if which == Which::Current {
                conn.current_ok.store(generation + 1, Ordering::Release);
                self.forget_previous_if_all_took(generation, &sent_current);
            }
        };
        match call(stamped(&first.1)).await {
            Err(s) if refused_token(&s) => {}
            r => {
                if r.is_ok() {
                    took(first.0);
                }
                return r;
            }
        }
        tracing::debug!(worker = %conn.member.id, tried = ?first.0,
            "the worker refused the token; trying the other one");
        let r = call(stamped(&second.1)).await;
        if r.is_ok() {
            took(second.0);
        }
        r
    }

    /// Drops the previous token when every member took `current`, the current token of
    /// `generation`, unless the token changed since.
    fn forget_previous_if_all_took(&self, generation: u64, current: &Option<Header>) {
        let all = self
            .snapshot()
            .iter()
            .all(|c| c.current_ok.load(Ordering::Acquire) == generation + 1);
        if !all {
            return;
        }
        let mut tokens = self.auth.tokens_mut();
        // `set_token` replaces the token under this lock before it bumps the generation: both
        // are compared, so that a token replaced meanwhile keeps its own previous one.
        if tokens.previous.is_some()
            && tokens.current == *current
            && *self.token_generation.borrow() == generation
        {
            tokens.previous = None;
            drop(tokens);
            tracing::info!(
                "every worker takes the new data-plane token; the previous one is dropped"
            );
        }
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
            next.push(Arc::new(Conn {
                blocks: crate::blocks::BlockPool::for_endpoint(&m.endpoint).map(Arc::new),
                member: m,
                client,
                previous_ok: AtomicU64::new(0),
                current_ok: AtomicU64::new(0),
            }));
        }
        tracing::info!(members = ?next.iter().map(|c| c.member.id.as_str()).collect::<Vec<_>>(),
            "membership updated");
        *self.conns.write() = Arc::new(next);
        self.member_generation.send_modify(|g| *g += 1);
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

/// Whether a worker refused the token itself (not its source refusing the worker).
fn refused_token(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unauthenticated
        && s.metadata()
            .get(lakecache_proto::lakecache::v1::SOURCE_ERROR_KEY)
            .is_none()
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

    /// A worker that takes only the header `takes`: the `authorization` header the call carried
    /// (None: no token), and the worker's answer to it.
    fn answer(
        req: &tonic::Request<()>,
        takes: &str,
    ) -> (Option<String>, Result<(), tonic::Status>) {
        let h = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        let r = if h.as_deref().is_none_or(|h| h == takes) {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated("wrong token"))
        };
        (h, r)
    }

    #[tokio::test]
    async fn a_refused_token_is_tried_again_with_the_other_one_during_a_rotation() {
        let m = Membership::new(Some("old"), Duration::from_secs(1)).unwrap();
        m.set(vec![Member {
            id: "w0".into(),
            endpoint: "http://127.0.0.1:1".into(),
        }])
        .unwrap();
        let conn = m.snapshot()[0].clone();
        // What the worker takes, and the tokens the calls carried (None: the interceptor's).
        let takes = parking_lot::Mutex::new("Bearer old");
        let seen = parking_lot::Mutex::new(Vec::<Option<String>>::new());
        let ask = || {
            seen.lock().clear();
            let (m, takes, seen) = (&m, &takes, &seen);
            let conn = conn.clone();
            async move {
                m.call(&conn, (), |req: tonic::Request<()>| {
                    let (h, r) = answer(&req, &takes.lock());
                    seen.lock().push(h);
                    std::future::ready(r)
                })
                .await
            }
        };
        let tried = |seen: &parking_lot::Mutex<Vec<Option<String>>>| {
            seen.lock()
                .iter()
                .map(|h| {
                    h.as_deref()
                        .unwrap_or("-")
                        .trim_start_matches("Bearer ")
                        .to_string()
                })
                .collect::<Vec<_>>()
        };
        // No rotation yet: one call, with the interceptor's token.
        ask().await.unwrap();
        assert_eq!(tried(&seen), ["-"]);
        // The reader has the new token, the worker still the old one: the old one after a
        // refusal, then the old one first.
        m.set_token("new").unwrap();
        ask().await.unwrap();
        assert_eq!(tried(&seen), ["new", "old"]);
        ask().await.unwrap();
        assert_eq!(tried(&seen), ["old"]);
        // The worker restarts with the new token.
        *takes.lock() = "Bearer new";
        ask().await.unwrap();
        assert_eq!(tried(&seen), ["old", "new"]);
        // Its only worker took the new token: the rotation is over, the old token is dropped.
        assert!(!m.has_previous_token());
        ask().await.unwrap();
        assert_eq!(tried(&seen), ["-"]);
        // The workers roll to a token the reader has not got yet: both are refused.
        m.set_token("newer").unwrap();
        *takes.lock() = "Bearer newest";
        let e = ask().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(tried(&seen), ["newer", "new"]);
        m.set_token("newest").unwrap();
        ask().await.unwrap();
        assert_eq!(tried(&seen), ["newest"]);
        // A source that refused the worker is not a refused token: asked once.
        let e = m
            .call(&conn, (), |_| async {
                let mut s = tonic::Status::unauthenticated("the lake refused the worker");
                s.metadata_mut().insert(
                    lakecache_proto::lakecache::v1::SOURCE_ERROR_KEY,
                    "1".parse().unwrap(),
                );
                Err::<(), _>(s)
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    /// The previous token is dropped once every member took the current one, not before.
    #[tokio::test]
    async fn the_previous_token_goes_once_every_member_takes_the_current_one() {
        let m = Membership::new(Some("old"), Duration::from_secs(1)).unwrap();
        m.set(
            (0..2)
                .map(|i| Member {
                    id: format!("w{i}"),
                    endpoint: format!("http://127.0.0.1:{}", i + 1),
                })
                .collect(),
        )
        .unwrap();
        let conns = m.snapshot();
        // What each worker takes; the tokens the last call carried (None: the interceptor's).
        let takes = parking_lot::Mutex::new(["Bearer old", "Bearer old"]);
        let seen = parking_lot::Mutex::new(Vec::<String>::new());
        let ask = |i: usize| {
            seen.lock().clear();
            let (m, takes, seen) = (&m, &takes, &seen);
            let conn = conns[i].clone();
            async move {
                m.call(&conn, (), |req: tonic::Request<()>| {
                    let (h, r) = answer(&req, takes.lock()[i]);
                    seen.lock().push(
                        h.as_deref()
                            .unwrap_or("-")
                            .trim_start_matches("Bearer ")
                            .to_string(),
                    );
                    std::future::ready(r)
                })
                .await
            }
        };
        m.set_token("new").unwrap();
        assert!(m.has_previous_token());
        // w0 moves to the new token; w1 still takes only the old one.
        takes.lock()[0] = "Bearer new";
        ask(0).await.unwrap();
        assert_eq!(*seen.lock(), ["new"]);
        ask(1).await.unwrap();
        assert_eq!(*seen.lock(), ["new", "old"]);
        assert!(m.has_previous_token(), "w1 still needs the old token");
        // w1 moves too: the rotation is over.
        takes.lock()[1] = "Bearer new";
        ask(1).await.unwrap();
        assert_eq!(*seen.lock(), ["old", "new"]);
        assert!(!m.has_previous_token());
        ask(1).await.unwrap();
        assert_eq!(
            *seen.lock(),
            ["-"],
            "one call, with the interceptor's token"
        );
        // A member that joins during the next rotation must take the new token too.
        m.set_token("newer").unwrap();
        *takes.lock() = ["Bearer newer", "Bearer newer"];
        m.set(vec![
            conns[0].member.clone(),
            Member {
                id: "w2".into(),
                endpoint: "http://127.0.0.1:3".into(),
            },
        ])
        .unwrap();
        ask(0).await.unwrap();
        assert_eq!(*seen.lock(), ["newer"]);
        assert!(m.has_previous_token(), "w2 has not taken the token yet");
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
