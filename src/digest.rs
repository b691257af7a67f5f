//! The checksum of an archive: BLAKE3, lower-case hex. The sender hashes the archive as
//! podman writes it, the target's sink as it writes the file; both run while the service
//! is down, so the hash is the fastest well-kept one (BLAKE3 runs several times faster
//! than SHA-256 with SHA-NI here).

use std::io::Read;
use std::path::Path;

/// What the record and error messages call the checksum.
pub const NAME: &str = "BLAKE3";

/// Length of a digest in hex.
pub const HEX_LEN: usize = 64;

/// A running checksum.
#[derive(Default)]
pub struct Digest(blake3::Hasher);

impl Digest {
    pub fn new() -> Digest {
        Digest::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn hex(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// The digest of `bytes`.
pub fn of_bytes(bytes: &[u8]) -> String {
    let mut d = Digest::new();
    d.update(bytes);
    d.hex()
}

/// The digest of a file, read in 1 MiB blocks.
pub fn of_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut d = Digest::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    Ok(d.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_value_and_file_equals_bytes() {
        // BLAKE3 of the empty input (the specification's test vector).
        assert_eq!(
            of_bytes(b""),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        assert_eq!(of_file(&p).unwrap(), of_bytes(&data));
        assert_eq!(of_bytes(&data).len(), HEX_LEN);
        assert_ne!(of_bytes(&data), of_bytes(&data[1..]));
    }
}
