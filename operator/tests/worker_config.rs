//! The configuration the operator writes is one the worker accepts, and says the same thing.

use std::collections::BTreeMap;

use lakecache_api::{
    CacheNamespace, CacheNamespaceSpec, MetadataPolicyKind, MetadataSpec, SecretReference,
    SourceSpec, TierKind, TierSpec, WorkersSpec,
};
use lakecache_operator::cache_namespace::build::{
    CREDENTIALS_DIR, DISK_DIR, MEMORY_DIR, worker_config,
};
use lakecache_worker::config::{WorkerConfig, WorkerConfigExt};
use lakecache_worker::meta::MetadataPolicy;
use lakecache_worker::store::TierKind as WorkerTier;

#[test]
fn the_worker_parses_the_operators_config() {
    let mut cn = CacheNamespace::new(
        "imagenet",
        CacheNamespaceSpec {
            source: SourceSpec {
                uri: "oss://datasets/imagenet".into(),
                endpoint: Some("https://oss-cn-hangzhou-internal.aliyuncs.com".into()),
                region: None,
                credentials_secret_ref: Some(SecretReference {
                    name: "oss-creds".into(),
                }),
                options: BTreeMap::new(),
                timeout: Some("45s".into()),
            },
            workers: WorkersSpec::default(),
            tiers: vec![
                TierSpec {
                    kind: TierKind::Memory,
                    size: "512Mi".into(),
                    path: None,
                    storage_class_name: None,
                },
                TierSpec {
                    kind: TierKind::Disk,
                    size: "20Gi".into(),
                    path: None,
                    storage_class_name: Some("local-ssd".into()),
                },
            ],
            block_size: Some("16Mi".into()),
            metadata: MetadataSpec {
                policy: MetadataPolicyKind::Ttl,
                ttl: Some("90s".into()),
            },
        },
    );
    cn.metadata.namespace = Some("ml".into());
    let v = cn.spec.validate().unwrap();
    let yaml = worker_config(&cn, &v).to_yaml();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let cfg = WorkerConfig::load(&path).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(cfg.source.uri, "oss://datasets/imagenet");
    assert_eq!(
        cfg.source.options["endpoint"],
        "https://oss-cn-hangzhou-internal.aliyuncs.com"
    );
    assert_eq!(
        cfg.source.credentials_dir.as_deref(),
        Some(std::path::Path::new(CREDENTIALS_DIR))
    );
    assert_eq!(cfg.source.timeout, std::time::Duration::from_secs(45));
    assert_eq!(cfg.block_size.as_u64(), 16 << 20);
    assert_eq!(cfg.tiers.len(), 2);
    assert_eq!(cfg.tiers[0].kind, WorkerTier::Memory);
    assert_eq!(cfg.tiers[0].size.as_u64(), 512 << 20);
    assert_eq!(
        cfg.tiers[0].path.as_deref(),
        Some(std::path::Path::new(MEMORY_DIR))
    );
    assert_eq!(
        cfg.tiers[1].path.as_deref(),
        Some(std::path::Path::new(DISK_DIR))
    );
    assert_eq!(
        cfg.metadata,
        MetadataPolicy::Ttl {
            ttl: std::time::Duration::from_secs(90)
        }
    );
    assert_eq!(
        cfg.token_file.as_deref(),
        Some(std::path::Path::new("/etc/lakecache/token/token"))
    );
    cfg.validate().unwrap();
}

/// The CRD's rule on secret option keys (its CEL rule and `validate`) and the lake's rule
/// (log masking, the command line) are one rule: the same list and the same answer.
#[test]
fn the_crd_and_the_lake_refuse_the_same_secret_options() {
    assert_eq!(
        lakecache_api::SECRET_OPTION_KEYS,
        lakecache_lake::SECRET_OPTION_KEYS
    );
    for key in lakecache_api::SECRET_OPTION_PATTERNS
        .iter()
        .chain(lakecache_api::SECRET_OPTION_KEYS)
        .copied()
        .chain([
            "MyApiKey",
            "db_password",
            "SAS_TOKEN",
            "region",
            "endpoint",
            "root",
        ])
    {
        assert_eq!(
            lakecache_api::is_secret_option(key),
            lakecache_lake::is_secret_option(key),
            "{key}"
        );
    }
}
