//! Fanfare: a sharded, thread-per-core real-time event router for WebSocket clients.
//!
//! The modules follow an event's path: a client is accepted and its request read
//! ([`server`], [`http`]), rate-limited ([`limit`]) and authenticated ([`auth`]), upgraded
//! ([`ws`]) and served ([`conn`]); its events ([`protocol`]) are routed to the owning core
//! ([`route`]) of the per-core state ([`shard`]), which fans frames out to each subscriber's
//! bounded queue ([`outbound`]). Published events enter through [`publish`]. [`config`] and
//! [`metrics`] stand beside the path.

pub mod config;
pub mod server;
pub mod http;
pub mod limit;
pub mod auth;
pub mod ws;
pub mod conn;
pub mod protocol;
pub mod route;
pub mod shard;
pub mod outbound;
pub mod publish;
pub mod metrics;
