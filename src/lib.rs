//! Fanfare: a sharded, thread-per-core real-time event router for WebSocket clients.
//!
//! The modules follow an event's path: a client is accepted and its request read
//! ([`server`], [`http`]), rate-limited ([`limit`]) and authenticated ([`auth`]), upgraded
//! ([`ws`]) and carried by its transport ([`conn`], or [`session`] over SSE and long-poll
//! where WebSockets are blocked); the client rules ([`client`]) handle each
//! event ([`protocol`]) and route it to the owning core ([`route`]) over the [`mesh`], where
//! [`rooms`] fan frames out to each subscriber's bounded queue ([`handle`]); [`shard`] is each
//! core's glue. Published events enter through [`publish`]. Presence rules live in
//! [`presence`]; with Redis, [`broker`] carries events and presence between instances.
//! [`config`], [`metrics`] and [`deadline`] stand beside the path.

pub mod auth;
pub mod broker;
pub mod client;
pub mod config;
pub mod conn;
pub mod deadline;
pub mod demo;
pub mod handle;
pub mod history;
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
pub mod session;
pub mod shard;
pub mod watchdog;
pub mod ws;
