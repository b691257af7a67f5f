//! Moving data folders to the target.
pub mod rsync;
