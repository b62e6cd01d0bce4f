//! The workers' headless Service: a stable DNS name per worker pod.
//!
//! Readers do not balance over the Service (they pick the worker that owns a block from the
//! status' worker list), so it needs no cluster IP; it exists for the StatefulSet's per-pod DNS
//! names. It publishes pods that are not ready yet, so that each worker's name resolves as soon
//! as its pod has an address.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use lakecache_api::{CacheNamespace, ValidSpec};

use super::{Names, meta, selector_labels};

/// The headless Service of the data port and the admin port (the one after it).
pub(super) fn service(
    cn: &CacheNamespace,
    names: &Names,
    owner: &OwnerReference,
    v: &ValidSpec,
) -> Service {
    let ports = vec![
        ServicePort {
            name: Some("grpc".into()),
            port: v.port,
            target_port: Some(IntOrString::Int(v.port)),
            ..Default::default()
        },
        ServicePort {
            name: Some("admin".into()),
            port: v.port + 1,
            target_port: Some(IntOrString::Int(v.port + 1)),
            ..Default::default()
        },
    ];
    Service {
        metadata: meta(cn, &names.service, owner),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&cn.name_any())),
            ports: Some(ports),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}
