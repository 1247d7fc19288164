//! Sinew's wire contract, shared by the sidecar and the control plane:
//!
//! - [`v1`]: the gRPC services and messages generated from `proto/sinew/mesh/v1/*.proto`;
//! - [`policy`]: the policy documents (`kind: Service`, ...), their defaults and validation;
//! - [`limits`]: the sizes both ends of the control-plane protocol agree on.
#![forbid(unsafe_code)]

pub mod duration;
pub mod limits;
#[cfg(feature = "logging")]
pub mod logging;
pub mod policy;

/// Generated from `proto/sinew/mesh/v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("sinew.mesh.v1");
}

/// The standard gRPC health-checking protocol (`grpc.health.v1`, `Check` only), which the
/// sidecar calls on its app with `--health-grpc`.
pub mod health {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("grpc.health.v1");
}
