//! Fanfare: a sharded, thread-per-core real-time event router for WebSocket clients.
//!
//! The modules follow an event's path: a client is accepted and its request read
//! ([`server`], [`http`]), rate-limited ([`limit`]) and authenticated ([`auth`]), upgraded
//! ([`ws`]) and served ([`conn`]); its events ([`protocol`]) are routed to the owning core
//! ([`route`]) of the per-core state ([`shard`]), which fans frames out to each subscriber's
//! bounded queue ([`handle`]). Published events enter through [`publish`]. Presence rules live
//! in [`presence`]; with Redis, [`broker`] carries events and presence between instances.
//! [`config`] and [`metrics`] stand beside the path.

pub mod auth;
pub mod broker;
pub mod client;
pub mod config;
pub mod conn;
pub mod deadline;
pub mod handle;
pub mod http;
pub mod limit;
pub mod mesh;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod publish;
pub mod rooms;
pub mod route;
pub mod server;
pub mod shard;
pub mod ws;
