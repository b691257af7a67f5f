//! `migrate`: live migration of Podman containers between hosts with CRIU over SSH.
//!
//! The binary (`src/main.rs`) only parses the command line and dispatches; everything
//! lives here so that tests and the benchmark tools can use the same types (the record,
//! the protocol, the plan).
#![deny(unsafe_code)]

pub mod check;
pub mod cli;
pub mod digest;
pub mod drain;
pub mod engine;
pub mod exec;
pub mod exit;
pub mod hooks;
pub mod host;
pub mod journal;
pub mod plan;
pub mod preflight;
pub mod probe;
pub mod progress;
pub mod protocol;
pub mod receive;
pub mod recover;
pub mod rundir;
pub mod secret;
pub mod send;
pub mod settle;
pub mod signals;
pub mod sink;
pub mod sync;
pub mod timing;
pub mod transport;
pub mod watchdog;
pub mod wire;
pub mod zeropages;
