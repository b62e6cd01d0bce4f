//! The CSI Identity service.

use std::collections::HashMap;

use lakecache_proto::csi::v1 as csi;
use lakecache_proto::csi::v1::identity_server::Identity;
use tonic::{Request, Response, Status};

use super::Services;
use crate::CSI_DRIVER;

#[tonic::async_trait]
impl Identity for Services {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: CSI_DRIVER.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // Node-only: no CONTROLLER_SERVICE.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = match self.0.can_mount().await {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(%why, "probe: not ready");
                false
            }
        };
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
