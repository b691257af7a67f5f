//! `migrate sink`: the target end of an archive upload, run over SSH by the sender with
//! the receiver's own binary. It writes stdin (zstd-decoded with `--zstd`) to
//! `PATH.part`, renames it to `PATH` when complete and leaves the archive's digest in
//! `PATH.digest`, so the receiver checks the archive without reading it again while the
//! service is down.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::exit::Exit;
use crate::progress::say;
use crate::zeropages::ZeroPages;

/// The version of the contract between a sender and `migrate sink`: the call
/// ([`SinkArgs::args`]) and the readiness lines ([`Readiness`]). A sink accepts the calls
/// of every version up to its own; a change that an older sink could misread gets a new
/// version, announced in the readiness lines, and the sender makes only the calls the
/// target's sink announced. A sink that announces no version speaks version 1.
pub const CONTRACT_VERSION: u32 = 1;

/// The subcommand, as the sender calls it.
pub const SUBCOMMAND: &str = "sink";
const ZSTD: &str = "zstd";
const DROP_ZERO_PAGES: &str = "drop-zero-pages";
const CHECK: &str = "check";

/// A call of `migrate sink` (internal: started by `migrate send` on the target). The
/// sender builds one and runs [`SinkArgs::args`]; the sink parses the same definitions.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SinkArgs {
    /// The stream is zstd-compressed: decode it on the way in.
    #[arg(long = ZSTD)]
    pub zstd: bool,
    /// Leave CRIU's zero-filled private anonymous pages out of the archive written
    /// (`crate::zeropages`); the digest still covers the stream as it came.
    #[arg(long = DROP_ZERO_PAGES)]
    pub drop_zero_pages: bool,
    /// Only say that the sink can run here (its readiness lines), then exit.
    #[arg(long = CHECK, conflicts_with = "path")]
    pub check: bool,
    /// The archive to write.
    #[arg(required_unless_present = "check")]
    pub path: Option<PathBuf>,
}

impl SinkArgs {
    /// The upload of one archive to `path` on the target.
    pub fn upload(path: &str, zstd: bool, drop_zero_pages: bool) -> SinkArgs {
        SinkArgs {
            zstd,
            drop_zero_pages,
            check: false,
            path: Some(PathBuf::from(path)),
        }
    }

    /// The question whether a sink can run there, answered by its [`Readiness`] lines.
    pub fn probe() -> SinkArgs {
        SinkArgs {
            zstd: false,
            drop_zero_pages: false,
            check: true,
            path: None,
        }
    }

    /// The arguments after the binary, starting with the subcommand.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![SUBCOMMAND.to_string()];
        for (on, flag) in [
            (self.zstd, ZSTD),
            (self.drop_zero_pages, DROP_ZERO_PAGES),
            (self.check, CHECK),
        ] {
            if on {
                a.push(format!("--{flag}"));
            }
        }
        if let Some(p) = &self.path {
            // A path that starts with a dash is still the path.
            a.push("--".to_string());
            a.push(p.display().to_string());
        }
        a
    }

    /// The call of `exe` with these arguments, one quoted word each, for a remote shell.
    pub fn shell_command(&self, exe: &str) -> String {
        std::iter::once(exe.to_string())
            .chain(self.args())
            .map(|w| crate::exec::shell_quote(&w))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What `migrate sink --check` prints: that it runs, what it can do, and its contract
/// version. Each line stands alone, so a sender of any version finds the ones it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub version: u32,
    /// It can leave CRIU's zero pages out (`--drop-zero-pages`).
    pub zero_pages: bool,
    /// Its receiver restores containers into a pod it creates (the manifest's `pod`).
    pub pods: bool,
    /// Its receiver guards and announces addresses that move (the manifest's `addresses`).
    pub addresses: bool,
    /// Its receiver restores lazily (the manifest's `lazy`: CRIU's lazy-pages daemon,
    /// the relay's target end).
    pub lazy: bool,
}

impl Readiness {
    /// This sink.
    pub fn ours() -> Readiness {
        Readiness {
            version: CONTRACT_VERSION,
            zero_pages: true,
            pods: true,
            addresses: true,
            lazy: true,
        }
    }

    pub fn lines(&self) -> String {
        let mut s = String::from("sink=ok\n");
        if self.zero_pages {
            s.push_str("sink_zero_pages=ok\n");
        }
        if self.pods {
            s.push_str("receiver_pods=ok\n");
        }
        if self.addresses {
            s.push_str("receiver_addresses=ok\n");
        }
        if self.lazy {
            s.push_str("receiver_lazy=ok\n");
        }
        s.push_str(&format!("sink_contract={}\n", self.version));
        s
    }

    /// Finds a sink's readiness among other output; `None` when no sink said it runs.
    pub fn parse(out: &str) -> Option<Readiness> {
        let mut lines = out.lines().map(str::trim);
        if !lines.clone().any(|l| l == "sink=ok") {
            return None;
        }
        let version = lines
            .clone()
            .find_map(|l| l.strip_prefix("sink_contract="))
            .map_or(Some(1), |v| v.parse().ok())?;
        Some(Readiness {
            version,
            zero_pages: lines.clone().any(|l| l == "sink_zero_pages=ok"),
            pods: lines.clone().any(|l| l == "receiver_pods=ok"),
            addresses: lines.clone().any(|l| l == "receiver_addresses=ok"),
            lazy: lines.any(|l| l == "receiver_lazy=ok"),
        })
    }
}

/// The file next to `archive` that holds its digest ([`crate::digest`], hex).
pub fn digest_path(archive: &Path) -> PathBuf {
    let mut p = archive.as_os_str().to_owned();
    p.push(".digest");
    PathBuf::from(p)
}

pub fn run(args: SinkArgs) -> u8 {
    if args.check {
        // What this sink can do, for a sender of another version to see.
        let said = write!(std::io::stdout(), "{}", Readiness::ours().lines());
        return if said.is_ok() { Exit::Ok } else { Exit::Failed }.code();
    }
    let path = args.path.expect("clap requires PATH");
    let stdin = std::io::stdin().lock();
    let res = if args.zstd {
        zstd::stream::read::Decoder::new(stdin)
            .context("starting the zstd decoder")
            .and_then(|d| write_archive(d, &path, args.drop_zero_pages))
    } else {
        write_archive(stdin, &path, args.drop_zero_pages)
    };
    match res {
        Ok(_) => Exit::Ok.code(),
        Err(e) => {
            say!("migrate sink: error: {e:#}");
            Exit::Failed.code()
        }
    }
}

/// What the digest file says: the digest and size of the stream as it came, the bytes of
/// zero pages left out, and the size of the file written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub digest: String,
    pub bytes: u64,
    pub dropped: u64,
    pub written: u64,
}

impl Received {
    pub fn line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.digest, self.bytes, self.dropped, self.written
        )
    }

    /// Reads a digest file's line; one with only a digest (an older sink) has no sizes.
    pub fn parse(line: &str) -> Option<(String, Option<Sizes>)> {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w[..] {
            [d] => Some((d.to_owned(), None)),
            [d, b, x, f] => Some((
                d.to_owned(),
                Some(Sizes {
                    received: b.parse().ok()?,
                    dropped: x.parse().ok()?,
                    written: f.parse().ok()?,
                }),
            )),
            _ => None,
        }
    }
}

/// The sizes a digest file states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub received: u64,
    pub dropped: u64,
    pub written: u64,
}

/// Copies `input` to `path` (by way of `path.part`), without CRIU's zero pages when
/// `drop_zero_pages`, and writes its digest file.
pub fn write_archive(input: impl Read, path: &Path, drop_zero_pages: bool) -> Result<Received> {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let res = write_via(input, path, &part, drop_zero_pages);
    if res.is_err() {
        // A full disk or a broken stream leaves nothing half-written behind.
        let _ = std::fs::remove_file(&part);
    }
    res
}

fn write_via(
    mut input: impl Read,
    path: &Path,
    part: &Path,
    drop_zero_pages: bool,
) -> Result<Received> {
    // A part left by an earlier attempt is removed (unlink never follows a symlink), and
    // the new one is created new: never through a symlink, never readable by others.
    let _ = std::fs::remove_file(part);
    let created = crate::rundir::create_new_private(part)
        .with_context(|| format!("cannot create {}", part.display()))?;
    let file = BufWriter::with_capacity(1 << 20, created);
    let mut out = ZeroPages::new(file, drop_zero_pages);
    let mut hasher = crate::digest::Digest::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the archive stream"),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        total += n as u64;
    }
    let (_, summary) = out
        .finish()
        .with_context(|| format!("writing {}", part.display()))?;
    let received = Received {
        digest: hasher.hex(),
        bytes: total,
        dropped: summary.dropped_bytes(),
        written: summary.written,
    };
    let digest = digest_path(path);
    let (dir, name) = match (digest.parent(), digest.file_name()) {
        (Some(d), Some(n)) => (d, n.to_string_lossy()),
        _ => anyhow::bail!("{}: not a file path", digest.display()),
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    crate::rundir::write_private(dir, &name, format!("{}\n", received.line()).as_bytes())
        .with_context(|| format!("writing {}", digest.display()))?;
    std::fs::rename(part, path)
        .with_context(|| format!("renaming {} to {}", part.display(), path.display()))?;
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the sink parses from a call the sender built.
    fn parsed(call: &SinkArgs) -> SinkArgs {
        use clap::Parser;
        let argv = std::iter::once("migrate".to_string()).chain(call.args());
        match crate::cli::Cli::try_parse_from(argv) {
            Ok(crate::cli::Cli {
                command: crate::cli::Command::Sink(a),
            }) => a,
            other => panic!("{:?} parsed as {other:?}", call.args()),
        }
    }

    #[test]
    fn the_sink_parses_every_call_the_sender_builds() {
        for zstd in [false, true] {
            for drop in [false, true] {
                let call = SinkArgs::upload("/var/lib/migrate/runs/r1/db.tar", zstd, drop);
                assert_eq!(parsed(&call), call);
            }
        }
        let odd = SinkArgs::upload("-odd dir/it's.tar", true, false);
        assert_eq!(parsed(&odd), odd);
        assert_eq!(parsed(&SinkArgs::probe()), SinkArgs::probe());
        assert_eq!(
            SinkArgs::upload("/r/db.tar", true, true).args(),
            ["sink", "--zstd", "--drop-zero-pages", "--", "/r/db.tar"]
        );
        assert_eq!(
            SinkArgs::upload("/r/a b.tar", false, false).shell_command("/usr/bin/migrate"),
            "/usr/bin/migrate sink -- '/r/a b.tar'"
        );
    }

    #[test]
    fn readiness_is_read_back_and_older_sinks_are_understood() {
        let ours = Readiness::ours();
        assert_eq!(ours.version, CONTRACT_VERSION);
        let among = format!("podman=4.3.1\n{}zstd=yes\n", ours.lines());
        assert_eq!(Readiness::parse(&among), Some(ours));
        assert!(ours.pods, "this build's receiver restores into pods");
        // One from before pods: it says so by leaving the line out.
        let before_pods = "sink=ok\nsink_zero_pages=ok\nsink_contract=1\n";
        assert_eq!(Readiness::parse(before_pods).map(|r| r.pods), Some(false));
        assert!(
            ours.addresses,
            "this build's receiver guards moving addresses"
        );
        assert!(ours.lazy, "this build's receiver restores lazily");
        // A sink from before the contract had a version.
        assert_eq!(
            Readiness::parse("sink=ok\nsink_zero_pages=ok\n"),
            Some(Readiness {
                version: 1,
                zero_pages: true,
                pods: false,
                addresses: false,
                lazy: false
            })
        );
        assert_eq!(
            Readiness::parse("sink=ok\n"),
            Some(Readiness {
                version: 1,
                zero_pages: false,
                pods: false,
                addresses: false,
                lazy: false
            })
        );
        // No sink ran, or one that says something unreadable: not used.
        assert_eq!(Readiness::parse("podman=4.3.1\nsink_zero_pages=ok\n"), None);
        assert_eq!(Readiness::parse("sink=ok\nsink_contract=x\n"), None);
        assert_eq!(Readiness::parse(""), None);
    }

    #[test]
    fn writes_the_archive_and_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.tar");
        let data = vec![7u8; 3 << 20];
        let compressed = zstd::encode_all(&data[..], 1).unwrap();
        let got = write_archive(
            zstd::stream::read::Decoder::new(&compressed[..]).unwrap(),
            &path,
            true,
        )
        .unwrap();
        // Not a tar: written as it came, whatever the filter.
        assert_eq!(got.bytes, data.len() as u64);
        assert_eq!(got.dropped, 0);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(!dir.path().join("db.tar.part").exists());
        let want = crate::digest::of_bytes(&data);
        let line = std::fs::read_to_string(digest_path(&path)).unwrap();
        let n = data.len() as u64;
        assert_eq!(
            Received::parse(&line),
            Some((
                want,
                Some(Sizes {
                    received: n,
                    dropped: 0,
                    written: n
                })
            ))
        );
        assert_eq!(Received::parse("abc"), Some(("abc".into(), None)));
        assert_eq!(Received::parse("abc 1"), None);
        assert_eq!(Received::parse("abc 1 2 x"), None);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_broken_stream_leaves_no_archive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.tar");
        let garbage = vec![1u8; 4096];
        let r = zstd::stream::read::Decoder::new(&garbage[..])
            .map_err(anyhow::Error::from)
            .and_then(|d| write_archive(d, &path, false));
        assert!(r.is_err());
        assert!(!path.exists());
        assert!(!digest_path(&path).exists());
        assert!(!dir.path().join("db.tar.part").exists());
    }

    #[test]
    fn a_planted_symlink_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let path = dir.path().join("db.tar");
        std::os::unix::fs::symlink(&victim, dir.path().join("db.tar.part")).unwrap();
        std::os::unix::fs::symlink(&victim, digest_path(&path)).unwrap();
        write_archive(&b"archive"[..], &path, false).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read(&path).unwrap(), b"archive");
        let meta = std::fs::symlink_metadata(digest_path(&path)).unwrap();
        assert!(meta.is_file());
    }
}
