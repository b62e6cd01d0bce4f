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

/// The worker configuration file (its text: [`WorkerConfig::to_yaml`]). Every worker of the StatefulSet reads the same file, so it
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
        listen: SocketAddr::from(([0, 0, 0, 0], port(v.port))),
        admin_listen: SocketAddr::from(([0, 0, 0, 0], port(v.port + 1))),
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

/// A port of a valid spec: `validate` keeps the data port within 1..=65534, so it and the admin
/// port (the next one) fit.
fn port(p: i32) -> u16 {
    u16::try_from(p).expect("a validated port fits in 16 bits")
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

    /// What the operator of the last release wrote (d266082's `worker_config`, kept as the
    /// reference): the text must not change, or every worker rolls on upgrade.
    fn released_text(cn: &CacheNamespace, v: &ValidSpec) -> String {
        let src = &cn.spec.source;
        let mut options = serde_json::Map::new();
        for (k, val) in &src.options {
            options.insert(k.clone(), val.clone().into());
        }
        if let Some(e) = &src.endpoint {
            options.insert("endpoint".into(), e.clone().into());
        }
        if let Some(r) = &src.region {
            options.insert("region".into(), r.clone().into());
        }
        let mut source = serde_json::json!({
            "uri": src.uri,
            "options": options,
            "timeout": format!("{}ms", v.source_timeout.as_millis()),
        });
        if src.credentials_secret_ref.is_some() {
            source["credentialsDir"] = CREDENTIALS_DIR.into();
        }
        let mut tiers = vec![];
        if let Some(m) = v.memory {
            tiers.push(serde_json::json!({"kind": "Memory", "path": MEMORY_DIR, "size": m}));
        }
        if let Some(d) = &v.disk {
            tiers.push(serde_json::json!({"kind": "Disk", "path": DISK_DIR, "size": d.size}));
        }
        let metadata = match v.metadata_ttl {
            None => serde_json::json!({"policy": "Immutable"}),
            Some(t) => serde_json::json!({"policy": "Ttl", "ttl": format!("{}ms", t.as_millis())}),
        };
        let cfg = serde_json::json!({
            "source": source,
            "listen": format!("0.0.0.0:{}", v.port),
            "adminListen": format!("0.0.0.0:{}", v.port + 1),
            "blockSize": v.block_size,
            "tiers": tiers,
            "metadata": metadata,
            "tokenFile": format!("{TOKEN_DIR}/{TOKEN_KEY}"),
        });
        serde_yaml_ng::to_string(&cfg).expect("JSON values serialize as YAML")
    }

    #[test]
    fn the_text_is_what_the_last_release_wrote() {
        let mut specs = vec![
            cn(vec![tier(TierKind::Memory, "1Gi", None, None)]),
            cn(vec![
                tier(TierKind::Memory, "1500M", None, None),
                tier(TierKind::Disk, "50Gi", Some("/mnt/nvme0"), None),
            ]),
        ];
        let mut plain = cn(vec![tier(TierKind::Disk, "20Gi", None, Some("fast"))]);
        plain.spec.source.credentials_secret_ref = None;
        plain.spec.source.endpoint = None;
        plain.spec.source.region = None;
        plain.spec.source.options.clear();
        plain.spec.source.timeout = Some("45s".into());
        plain.spec.metadata = Default::default();
        plain.spec.block_size = None;
        plain.spec.workers.port = Some(9000);
        specs.push(plain);
        for cn in specs {
            let v = cn.spec.validate().unwrap();
            let text = worker_config(&cn, &v).to_yaml();
            assert_eq!(text, released_text(&cn, &v));
        }
    }
}
