//! Generated gRPC bindings.
//!
//! - [`csi::v1`]: the Container Storage Interface (Identity and Node services), from the CSI spec.
//! - [`lakecache::v1`]: the cache data plane between readers and cache workers, and the mounter
//!   service between the CSI plugin and the process that hosts its FUSE servers.
//! - [`pluginregistration`]: kubelet's plugin registration API (proto package
//!   `pluginregistration`, unversioned as kubelet has it), which the CSI node plugin's registrar
//!   serves so that kubelet finds the plugin.
//!
//! All are compiled at build time from `proto/` by `protox`, so building needs no `protoc`.
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

pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}
