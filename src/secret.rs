//! Randomness for per-migration secrets, nonces and ids (the kernel's CSPRNG).

use std::io::Read;

/// Fills `buf` from /dev/urandom.
pub fn fill_random(buf: &mut [u8]) {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("/dev/urandom must be readable");
}

/// A fresh random value as lower-case hex, `bytes` long before encoding.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    fill_random(&mut buf);
    hex::encode(buf)
}
