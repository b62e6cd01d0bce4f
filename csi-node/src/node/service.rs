//! The CSI Node service: each handler a few lines over [`Plugin`], which returns a
//! [`NodeError`](super::NodeError) that `Plugin::observed` counts, logs and turns into a
//! `Status`.

use std::collections::HashMap;
use std::sync::Arc;

use lakecache_proto::csi::v1 as csi;
use lakecache_proto::csi::v1::node_server::Node;
use lakecache_proto::csi::v1::node_service_capability::rpc::Type as RpcType;
use tonic::{Request, Response, Status};

use super::Plugin;
use crate::TOPOLOGY_KEY;

/// The CSI services, sharing one plugin.
#[derive(Clone)]
pub struct Services(pub Arc<Plugin>);

#[tonic::async_trait]
impl Node for Services {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodeStageVolume", &vid, self.0.stage(req))
            .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodeUnstageVolume", &vid, self.0.unstage(req))
            .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodePublishVolume", &vid, self.0.publish(req))
            .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodeUnpublishVolume", &vid, self.0.unpublish(req))
            .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodeGetVolumeStats", &vid, self.0.stats(req))
            .await
    }

    async fn node_expand_volume(
        &self,
        _req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "lakecache volumes are read-only caches and cannot be expanded",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let caps = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::VolumeCondition,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let node = &self.0.cfg.node_id;
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: node.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.clone())]),
            }),
        }))
    }
}
