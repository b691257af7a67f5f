//! The container engine: podman with CRIU underneath.
pub mod freezer;
pub mod podman;
pub mod stack;
pub mod tcp;
