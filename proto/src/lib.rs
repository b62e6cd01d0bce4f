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
//!
//! [`blocks`] is the framing of the block transport, which carries ReadBlock's bytes beside gRPC;
//! [`auth`] the data-plane token on the wire, both ends.

pub mod auth;
pub mod blocks;

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

pub mod lakecache {
    pub mod v1 {
        tonic::include_proto!("lakecache.v1");

        /// Metadata a worker sets on an error that comes from its source: another worker would
        /// only ask the same source again.
        pub const SOURCE_ERROR_KEY: &str = "lakecache-source-error";
        /// Metadata a worker sets on the NOT_FOUND answer to a `cached_only` ReadBlock whose
        /// block it does not hold (the object may well exist).
        pub const NOT_CACHED_KEY: &str = "lakecache-not-cached";
    }
}

pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}
