//! The container engine: podman with CRIU underneath.
pub mod podman;
pub mod freezer;
