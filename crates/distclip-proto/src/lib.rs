//! Generated gRPC code for distclip (package `distclip.v1`): the coordinator's control plane
//! and the workers' data plane. The `.proto` sources live in `proto/distclip/v1/`. [`tls`] holds
//! the transport security both planes share, [`auth`] the run token's header.

#![allow(missing_docs)]

/// Everything generated from `proto/distclip/v1/*.proto`.
pub mod v1 {
    tonic::include_proto!("distclip.v1");
}

pub mod auth;
pub mod tls;
