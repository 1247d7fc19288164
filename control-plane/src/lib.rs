//! Sinew's control plane: the registry of instances, the policy, the mesh CA, and the push of
//! versioned, scoped updates to every sidecar over one gRPC stream each.
//!
//! Where things are:
//!
//! - [`server`]: start ([`serve`]) and stop; the binary's [`run`].
//! - [`config`], [`flags`]: configuration, validated once.
//! - [`mesh`]: the shared state and the one place a change happens.
//! - [`registry`], [`sync`], [`snapshot`], [`view`], [`policies`]: the pure bookkeeping
//!   (leases, nonces, what each sidecar sees, what a policy change does), tested without I/O.
//! - [`sidecar_api`], [`session`]: the sidecar side of the protocol; [`admin_api`]: `sinewctl`'s.
//! - [`store`], [`ca`], [`tokens`], [`policy_files`], [`http`], [`metrics`]: the edges;
//!   [`listen`]: the ports' connection limits.
#![forbid(unsafe_code)]

pub mod admin_api;
pub mod ca;
pub mod clock;
pub mod config;
pub mod flags;
pub mod http;
pub mod listen;
pub mod mesh;
pub mod metrics;
pub mod policies;
pub mod policy_files;
pub mod registry;
pub mod server;
pub mod session;
pub mod sidecar_api;
pub mod snapshot;
pub mod store;
pub mod sync;
pub mod tokens;
pub mod view;

pub use config::Config;
pub use server::{RunningControl, run, serve};
