//! The container engine: podman with CRIU underneath.
pub mod address;
pub mod cpu;
pub mod freezer;
pub mod lazy;
pub mod pod;
pub mod podman;
pub mod privileges;
pub mod runtime;
pub mod stack;
pub mod tcp;
pub mod units;
