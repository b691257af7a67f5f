//! What the sender shipped into the run folder, checked against its manifest before
//! anything is restored from it.

use std::path::Path;

use anyhow::{Context, bail};

use crate::progress::Ui;
use crate::protocol::Manifest;
use crate::sink::{Received, Sizes};

/// Checks every archive of `manifest` in `dir`: present, of the size the sender streamed,
/// with the digest the manifest names (the one `migrate sink` computed while writing it,
/// else read from the file).
pub(super) async fn verify_archives(
    manifest: &Manifest,
    run_id: &str,
    dir: &Path,
    ui: &Ui,
) -> anyhow::Result<()> {
    manifest.validate(run_id)?;
    for c in &manifest.containers {
        let path = dir.join(&c.archive);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("archive {} of {} is missing", path.display(), c.name))?
            .len();
        // Written by `migrate sink` from the very bytes it received: no second read. Its
        // sizes are those of the stream; the file may be smaller by the zero pages it left
        // out. Without a sink's file (or from an older sink) the file is the stream.
        let sink = std::fs::read_to_string(crate::sink::digest_path(&path))
            .ok()
            .and_then(|line| Received::parse(&line));
        let sizes = sink.as_ref().and_then(|(_, s)| *s).unwrap_or(Sizes {
            received: size,
            dropped: 0,
            written: size,
        });
        if sizes.received != c.size {
            bail!(
                "archive {} is {} bytes, the manifest says {}",
                path.display(),
                sizes.received,
                c.size
            );
        }
        if sizes.written != size {
            bail!(
                "archive {} is {size} bytes on disk, its sink wrote {}",
                path.display(),
                sizes.written
            );
        }
        let digest = match sink {
            Some((digest, _)) => digest,
            None => {
                let p = path.clone();
                tokio::task::spawn_blocking(move || crate::digest::of_file(&p)).await??
            }
        };
        if digest != c.digest {
            bail!(
                "archive {} does not match its {} digest in the manifest",
                path.display(),
                crate::digest::NAME
            );
        }
        if sizes.dropped > 0 {
            ui.info(&format!(
                "{}: {} MiB of zero pages left out of its archive ({} MiB to restore)",
                c.name,
                sizes.dropped >> 20,
                size >> 20
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ContainerEntry;

    fn manifest(dir: &Path, data: &[u8], digest: &str) -> Manifest {
        std::fs::write(dir.join("db.tar"), data).unwrap();
        Manifest {
            run_id: "r1".into(),
            containers: vec![ContainerEntry {
                name: "db".into(),
                archive: "db.tar".into(),
                size: data.len() as u64,
                digest: digest.into(),
                image_id: "i".into(),
                file_locks: false,
                tcp_established: false,
                tcp_close: true,
                after: vec![],
                addresses: vec![],
                lazy: None,
            }],
            data: vec![],
            down_us: 0,
            clock_offset_us: 0,
            pod: None,
        }
    }

    #[tokio::test]
    async fn archives_are_checked_by_the_sinks_digest_or_by_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"archive bytes".to_vec();
        let good = crate::digest::of_bytes(&data);
        let ui = Ui::new("receive");
        // No digest file: the archive is read and hashed.
        let m = manifest(dir.path(), &data, &good);
        verify_archives(&m, "r1", dir.path(), &ui).await.unwrap();
        let bad = manifest(dir.path(), &data, &"0".repeat(64));
        assert!(verify_archives(&bad, "r1", dir.path(), &ui).await.is_err());
        // The digest `migrate sink` left decides; a wrong one is refused even though the
        // archive itself would match.
        let digest = crate::sink::digest_path(&dir.path().join("db.tar"));
        std::fs::write(&digest, format!("{}\n", "f".repeat(64))).unwrap();
        let err = verify_archives(&m, "r1", dir.path(), &ui)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("BLAKE3"), "{err:#}");
        std::fs::write(&digest, format!("{good}\n")).unwrap();
        verify_archives(&m, "r1", dir.path(), &ui).await.unwrap();
        // A wrong size is refused before any hash.
        let mut short = m.clone();
        short.containers[0].size += 1;
        assert!(
            verify_archives(&short, "r1", dir.path(), &ui)
                .await
                .is_err()
        );
        // A sink that left zero pages out: the stream's size counts, not the file's.
        let mut bigger = m.clone();
        bigger.containers[0].size = 8192 + data.len() as u64;
        assert!(
            verify_archives(&bigger, "r1", dir.path(), &ui)
                .await
                .is_err()
        );
        let n = data.len();
        std::fs::write(&digest, format!("{good} {} 8192 {n}\n", 8192 + n)).unwrap();
        verify_archives(&bigger, "r1", dir.path(), &ui)
            .await
            .unwrap();
        std::fs::write(&digest, format!("{good} {} 8192 {n}\n", 4096 + n)).unwrap();
        assert!(
            verify_archives(&bigger, "r1", dir.path(), &ui)
                .await
                .is_err()
        );
        // The file on disk must be what the sink wrote.
        std::fs::write(&digest, format!("{good} {} 8192 {}\n", 8192 + n, n + 1)).unwrap();
        let err = verify_archives(&bigger, "r1", dir.path(), &ui)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("its sink wrote"), "{err:#}");
    }
}
