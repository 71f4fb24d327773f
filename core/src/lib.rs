//! The Sluice wire contract and the helpers every service shares.
//!
//! Everything a user can see on the bus lives here: the event envelope, the subject and
//! stream names, and the stream settings. Services depend on this crate, never on each
//! other, so the contract has exactly one definition.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bus;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod nats;
pub mod pipeline;
pub mod repo_pipelines;
pub mod roles;
pub mod run;
pub mod shutdown;
pub mod streams;
pub mod subjects;
pub mod telemetry;
pub mod yaml;

pub use envelope::{Event, PayloadRef, Provider};
pub use error::{Error, Result};
