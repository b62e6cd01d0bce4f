//! What limits the workers: who may reach them (a NetworkPolicy) and how many may be down at
//! once for maintenance (a PodDisruptionBudget).
//!
//! The data port serves every block of the CacheNamespace to whoever has the token; the token
//! is the guard, and the optional NetworkPolicy is a second one for clusters where tenants share
//! a network: only the chart's CSI plugin and operator pods reach the data port. The admin port
//! (probes, metrics, no data) stays open, since kubelet and Prometheus must reach it. The
//! budget lets a drain take one worker at a time: each worker holds a share of the cache that
//! readers then fetch from the lake, so losing several at once costs more than waiting.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use lakecache_api::{CacheNamespace, ValidSpec};

use super::{Names, meta, selector_labels};
use crate::NetworkPolicyPeers;

/// Ingress to the worker pods: the data port only from the chart's CSI plugin and operator pods
/// (in their namespace), the admin port (probes, /metrics; no data) from anywhere.
pub(super) fn network_policy(
    cn: &CacheNamespace,
    names: &Names,
    owner: &OwnerReference,
    v: &ValidSpec,
    peers: &NetworkPolicyPeers,
) -> NetworkPolicy {
    let port = |p: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let peer = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".into(),
                peers.namespace.clone(),
            )])),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(peers.labels.clone()),
            match_expressions: (!peers.components.is_empty()).then(|| {
                vec![LabelSelectorRequirement {
                    key: "app.kubernetes.io/component".into(),
                    operator: "In".into(),
                    values: Some(peers.components.clone()),
                }]
            }),
        }),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: meta(cn, &names.network_policy, owner),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&cn.name_any())),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![peer]),
                    ports: Some(vec![port(v.port)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![port(v.port + 1)]),
                },
            ]),
            ..Default::default()
        }),
    }
}

/// At most one worker voluntarily disrupted at a time.
pub(super) fn pdb(
    cn: &CacheNamespace,
    names: &Names,
    owner: &OwnerReference,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(cn, &names.pdb, owner),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&cn.name_any())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use lakecache_api::TierKind;

    #[test]
    fn the_network_policy_lets_only_the_chart_pods_reach_the_data_port() {
        let cn = cn(vec![tier(TierKind::Memory, "1Gi", None, None)]);
        let peers = NetworkPolicyPeers {
            namespace: "lakecache-system".into(),
            labels: BTreeMap::from([("app.kubernetes.io/name".into(), "lakecache".into())]),
            components: vec!["csi-node".into(), "operator".into()],
        };
        let c = build_with(&cn, "t", Some(&peers));
        let np = c.network_policy.unwrap();
        assert_eq!(
            np.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let spec = np.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap(),
            selector_labels("imagenet")
        );
        let rules = spec.ingress.unwrap();
        let data = &rules[0];
        assert_eq!(
            data.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(7700))
        );
        let from = &data.from.as_ref().unwrap()[0];
        assert_eq!(
            from.namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["kubernetes.io/metadata.name"],
            "lakecache-system"
        );
        let ps = from.pod_selector.as_ref().unwrap();
        assert_eq!(
            ps.match_labels.as_ref().unwrap()["app.kubernetes.io/name"],
            "lakecache"
        );
        assert_eq!(
            ps.match_expressions.as_ref().unwrap()[0].values.as_deref(),
            Some(&["csi-node".to_string(), "operator".to_string()][..])
        );
        // The admin port (probes, metrics) is open; no other rule lets anyone in.
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[1].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(7701))
        );
    }
}
