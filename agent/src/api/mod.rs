//! The HTTP API: every route the agent serves, on one listener behind one
//! bearer token (all but `/healthz`).
//!
//! - [`http`] — the server (connection cap, timeouts, memory bound,
//!   shutdown), `POST /v1/events`, `GET /v1/status` and `GET /healthz`.
//! - [`admin`] — the operator's routes: `/metrics` and the dead letters.
//! - [`state`] — `/v1/state`: merged state values, local writes and the
//!   change stream.
//!
//! The routes call the services' public handles ([`crate::ingest::Ingest`],
//! [`crate::state::StateHandle`], [`crate::store::Store`]); what an event
//! turns into is the services' business, not the API's.

pub mod admin;
pub mod http;
pub mod state;
