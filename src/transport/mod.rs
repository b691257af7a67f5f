//! How bytes and commands reach the other host.
pub mod relay;
pub mod ssh;
