//! Generated gRPC bindings.
//!
//! - [`csi::v1`]: the Container Storage Interface (Identity and Node services), from the CSI spec.
//! - [`lakecache::v1`]: the cache data plane between readers and cache workers, and the mounter
//!   service between the CSI plugin and the process that hosts its FUSE servers.
//!
//! Both are compiled at build time from `proto/` by `protox`, so building needs no `protoc`.
#![allow(clippy::all, missing_docs, rust_2018_idioms)]

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

pub mod lakecache {
    pub mod v1 {
        tonic::include_proto!("lakecache.v1");
    }
}
