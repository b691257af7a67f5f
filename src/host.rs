//! Facts about the host this process runs on.

/// This host's name, for records and messages.
pub fn hostname() -> String {
    std::env::var("MIGRATE_HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into())
}
