//! tollgate: an API gateway on Cloudflare Pingora.
//!
//! A request goes through [`proxy::Gateway`]: the path is normalized and
//! routed ([`router`]), a target of the route's upstream is chosen
//! ([`upstream`]), and the outcome is recorded ([`observe`]). The running
//! configuration is an immutable [`snapshot::Snapshot`] compiled from one
//! YAML file ([`config`]) and swapped atomically on SIGHUP ([`reload`]).

pub mod admin;
pub mod auth;
pub mod config;
pub mod downstream;
pub mod error;
pub mod explain;
pub mod limit;
pub mod memory;
pub mod observe;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod upstream;
