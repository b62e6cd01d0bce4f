//! What every worker reads: its configuration file (a ConfigMap) and the data-plane token (a
//! Secret).
//!
//! The configuration is the worker's own typed [`WorkerConfig`], not text assembled here, so the
//! operator cannot write a field the worker does not know. It names no worker and no address:
//! all workers of the StatefulSet mount the same file, and each takes its id from its pod name
//! and binds its pod IP (see the StatefulSet's environment). The token is never in the file,
//! only mounted from its Secret, so whoever may read the namespace's ConfigMaps learns nothing
//! that reaches the data.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytesize::ByteSize;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use lakecache_api::worker::{MetadataPolicy, SourceSpec, TierConfig, WorkerConfig};
use lakecache_api::{CacheNamespace, TierKind, ValidSpec};

use super::{Names, meta};

/// Where things are inside a worker container.
pub const CONFIG_DIR: &str = "/etc/lakecache/config";
pub const CONFIG_FILE: &str = "worker.yaml";
pub const TOKEN_DIR: &str = "/etc/lakecache/token";
pub const CREDENTIALS_DIR: &str = "/etc/lakecache/credentials";
pub const MEMORY_DIR: &str = "/cache/memory";
pub const DISK_DIR: &str = "/cache/disk";
/// The key of the token in the token Secret (and in the CSI stage secret).
pub use lakecache_api::volume::TOKEN_KEY;

/// The worker configuration file. Every worker of the StatefulSet reads the same file, so it
/// names no worker: each takes its id from its pod name.
pub fn worker_config(cn: &CacheNamespace, v: &ValidSpec) -> WorkerConfig {
    let src = &cn.spec.source;
    let mut source = SourceSpec::new(src.uri.clone());
    source.options = src.options.clone();
    if let Some(e) = &src.endpoint {
        source.options.insert("endpoint".into(), e.clone());
    }
    if let Some(r) = &src.region {
        source.options.insert("region".into(), r.clone());
    }
    source.timeout = v.source_timeout;
    if src.credentials_secret_ref.is_some() {
        source.credentials_dir = Some(CREDENTIALS_DIR.into());
    }
    let mut tiers = vec![];
    if let Some(m) = v.memory {
        tiers.push(TierConfig {
            kind: TierKind::Memory,
            path: Some(MEMORY_DIR.into()),
            size: ByteSize::b(m),
        });
    }
    if let Some(d) = &v.disk {
        tiers.push(TierConfig {
            kind: TierKind::Disk,
            path: Some(DISK_DIR.into()),
            size: ByteSize::b(d.size),
        });
    }
    WorkerConfig {
        id: String::new(),
        // `validate` keeps the port within 1..=65534, so both fit.
        listen: SocketAddr::from(([0, 0, 0, 0], v.port as u16)),
        admin_listen: SocketAddr::from(([0, 0, 0, 0], (v.port + 1) as u16)),
        block_size: ByteSize::b(v.block_size),
        tiers,
        metadata: match v.metadata_ttl {
            None => MetadataPolicy::Immutable,
            Some(ttl) => MetadataPolicy::Ttl { ttl },
        },
        token_file: Some(format!("{TOKEN_DIR}/{TOKEN_KEY}").into()),
        ..WorkerConfig::new(source)
    }
}

/// The ConfigMap that holds the worker configuration file `config`.
pub(super) fn config_map(
    cn: &CacheNamespace,
    names: &Names,
    owner: &OwnerReference,
    config: String,
) -> ConfigMap {
    ConfigMap {
        metadata: meta(cn, &names.config_map, owner),
        data: Some(BTreeMap::from([(CONFIG_FILE.into(), config)])),
        ..Default::default()
    }
}

/// The Secret that holds the data-plane token: mounted by the workers, and the CSI stage and
/// publish secret of the PersistentVolume.
pub(super) fn token_secret(
    cn: &CacheNamespace,
    names: &Names,
    owner: &OwnerReference,
    token: &str,
) -> Secret {
    Secret {
        metadata: meta(cn, &names.token_secret, owner),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.into(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn the_config_says_what_the_spec_says_and_holds_no_secret() {
        let cn = cn(vec![tier(TierKind::Memory, "1Gi", None, None)]);
        let v = cn.spec.validate().unwrap();
        let y = worker_config(&cn, &v).to_yaml();
        let val: serde_json::Value = serde_yaml_ng::from_str(&y).unwrap();
        assert_eq!(val["source"]["uri"], "s3://datasets/imagenet");
        assert_eq!(
            val["source"]["options"]["endpoint"],
            "http://s3.example:9000"
        );
        assert_eq!(val["source"]["options"]["region"], "us-east-1");
        assert_eq!(val["source"]["credentialsDir"], CREDENTIALS_DIR);
        assert_eq!(val["blockSize"], 8 << 20);
        assert_eq!(val["tiers"][0]["size"], 1u64 << 30);
        assert_eq!(val["metadata"]["policy"], "Ttl");
        assert!(!y.contains("t0ken"));
    }
}
