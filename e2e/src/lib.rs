//! Test harness for lakecache: real parts, started and stopped by tests, and the fixtures
//! every crate's tests share ([`kit`]).
//!
//! - [`S3Server`]: a real S3-compatible server (moto's, from PyPI) on a loopback port.
//! - [`AzuriteServer`]: a real Azure Blob Storage server (Azurite's blob service, from npm), in
//!   memory, on a loopback port.
//! - [`GcsServer`]: a real Google Cloud Storage server (fake-gcs-server, built from a pinned Go
//!   module), in memory, on a loopback port.
//! - [`HdfsServer`]: a real HDFS (Hadoop's MiniDFSCluster, from Maven Central: a namenode and a
//!   datanode in one JVM) on loopback ports, with permissions on.
//! - [`Proxy`]: a TCP proxy that can black-hole its traffic, to make a lake unreachable the way
//!   a broken network does (connections hang; nothing is refused).
//! - [`Stack`]: N real workers and a real FUSE mount over a source, with the means to kill,
//!   restart and remount.
//! - [`Cluster`]: a real Kubernetes control plane (etcd, kube-apiserver, and on request
//!   kube-controller-manager and kube-scheduler) built from pinned upstream modules, with
//!   kubectl, helm and least-privilege kubeconfigs at hand.
//! - [`node`]: a real node for a [`Cluster`] (kubelet, containerd, runc, the bridge CNI and
//!   kube-proxy) running our own image, which [`image`] builds.

pub mod azurite;
pub mod cluster;
pub mod gcs;
pub mod hdfs;
pub mod image;
pub mod kit;
pub mod mountinfo;
pub mod node;
pub mod proxy;
pub mod s3;
pub mod stack;

pub use azurite::AzuriteServer;
pub use cluster::{Cluster, ClusterOptions};
pub use gcs::GcsServer;
pub use hdfs::HdfsServer;
pub use proxy::Proxy;
pub use s3::S3Server;
pub use stack::{Stack, StackConfig};

pub use kit::pattern;

/// Sets up logging for tests once (RUST_LOG controls it).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
