//! Talking to cache workers over the data plane: their usage and hits, and preloads.
//!
//! Behind [`WorkerApi`], so controller tests can put a fault-injecting implementation in place of
//! [`GrpcWorkers`]; the suite's end-to-end tests use the real one against real workers.

use std::collections::HashMap;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use lakecache_proto::lakecache::v1 as pb;
use lakecache_proto::lakecache::v1::cache_worker_client::CacheWorkerClient;
use tonic::transport::{Channel, Endpoint};

/// Largest message the operator accepts from a worker. A preload's status is the largest a
/// worker sends: it lists at most 100 failed paths, each path and reason clipped, under 1 MiB
/// in all (`lakecache_worker::preload::MAX_STATUS_BYTES`; the operator does not depend on the
/// worker crate, so the figure is repeated here, and a test checks that it still covers it).
/// tonic's default of 4 MiB would do too; it is set explicitly so that a change of either side
/// is a visible decision.
pub const RECEIVE_LIMIT: usize = 4 << 20;

/// One worker, with the token of its CacheNamespace.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerRef {
    pub name: String,
    /// `host:port`.
    pub address: String,
    pub token: String,
}

impl std::fmt::Debug for WorkerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRef")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("worker {worker} at {address}: {message}")]
pub struct WorkerError {
    pub worker: String,
    pub address: String,
    pub message: String,
    /// The worker does not know the preload (it restarted, or never had it).
    pub not_found: bool,
}

impl WorkerError {
    fn new(w: &WorkerRef, message: impl Into<String>) -> Self {
        Self {
            worker: w.name.clone(),
            address: w.address.clone(),
            message: message.into(),
            not_found: false,
        }
    }

    fn status(w: &WorkerRef, s: tonic::Status) -> Self {
        Self {
            not_found: s.code() == tonic::Code::NotFound,
            ..Self::new(w, format!("{:?}: {}", s.code(), s.message()))
        }
    }
}

pub type StatusStream = BoxStream<'static, Result<pb::PreloadStatus, WorkerError>>;

#[async_trait::async_trait]
pub trait WorkerApi: Send + Sync {
    async fn info(&self, w: &WorkerRef) -> Result<pb::WorkerInfo, WorkerError>;
    async fn start_preload(
        &self,
        w: &WorkerRef,
        req: pb::StartPreloadRequest,
    ) -> Result<pb::PreloadStatus, WorkerError>;
    /// Statuses of a preload until it ends (the last one has a final phase).
    async fn watch_preload(&self, w: &WorkerRef, id: &str) -> Result<StatusStream, WorkerError>;
    async fn cancel_preload(&self, w: &WorkerRef, id: &str) -> Result<(), WorkerError>;
}

/// The real data plane, with one lazily connected channel per address.
pub struct GrpcWorkers {
    timeout: Duration,
    channels: parking_lot::Mutex<HashMap<String, Channel>>,
}

impl GrpcWorkers {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            channels: Default::default(),
        }
    }

    fn client(
        &self,
        w: &WorkerRef,
    ) -> Result<
        CacheWorkerClient<
            tonic::service::interceptor::InterceptedService<Channel, lakecache_proto::auth::Auth>,
        >,
        WorkerError,
    > {
        let channel = {
            let mut channels = self.channels.lock();
            match channels.get(&w.address) {
                Some(c) => c.clone(),
                None => {
                    let c = Endpoint::from_shared(format!("http://{}", w.address))
                        .map_err(|e| WorkerError::new(w, format!("bad address: {e}")))?
                        .connect_timeout(self.timeout)
                        .tcp_nodelay(true)
                        .connect_lazy();
                    channels.insert(w.address.clone(), c.clone());
                    c
                }
            }
        };
        let auth = lakecache_proto::auth::Auth::bearer(&w.token)
            .map_err(|_| WorkerError::new(w, "the data-plane token is not valid ASCII"))?;
        Ok(CacheWorkerClient::with_interceptor(channel, auth)
            .max_decoding_message_size(RECEIVE_LIMIT))
    }

    async fn timed<T>(
        &self,
        w: &WorkerRef,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, WorkerError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(WorkerError::status(w, s)),
            Err(_) => Err(WorkerError::new(
                w,
                format!("no answer within {:?}", self.timeout),
            )),
        }
    }
}

#[async_trait::async_trait]
impl WorkerApi for GrpcWorkers {
    async fn info(&self, w: &WorkerRef) -> Result<pb::WorkerInfo, WorkerError> {
        let mut c = self.client(w)?;
        self.timed(w, c.info(pb::InfoRequest {})).await
    }

    async fn start_preload(
        &self,
        w: &WorkerRef,
        req: pb::StartPreloadRequest,
    ) -> Result<pb::PreloadStatus, WorkerError> {
        let mut c = self.client(w)?;
        self.timed(w, c.start_preload(req)).await
    }

    async fn watch_preload(&self, w: &WorkerRef, id: &str) -> Result<StatusStream, WorkerError> {
        let mut c = self.client(w)?;
        let stream = self
            .timed(
                w,
                c.watch_preload(pb::WatchPreloadRequest { id: id.into() }),
            )
            .await?;
        let w = w.clone();
        Ok(stream.map_err(move |s| WorkerError::status(&w, s)).boxed())
    }

    async fn cancel_preload(&self, w: &WorkerRef, id: &str) -> Result<(), WorkerError> {
        let mut c = self.client(w)?;
        match self
            .timed(
                w,
                c.cancel_preload(pb::CancelPreloadRequest { id: id.into() }),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.not_found => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receive_limit_covers_the_largest_preload_status() {
        let largest = lakecache_worker::preload::MAX_STATUS_BYTES;
        assert!(
            RECEIVE_LIMIT >= largest,
            "a worker may send a preload status of {largest} bytes, more than {RECEIVE_LIMIT}"
        );
    }
}
