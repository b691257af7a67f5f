//! The service never runs twice, and a full disk on the target costs nothing: real
//! faults on the lab's target host (a podman that cannot remove, a file system that
//! fills during the stream), real podman, CRIU and OpenSSH.
mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);

fn to(host: &str) -> String {
    format!("root@{}", host_addr(host))
}

/// Kills a helper process when the test ends, however it ends.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// On `host`, every `podman rm` and `podman kill` fails, for the receiver and for SSH
/// commands alike (a wrapper bound over /usr/bin/podman in the host's mount namespace;
/// everything else goes to the real podman).
fn podman_that_cannot_remove(host: &'static str) -> OnHost {
    let script = "touch /tmp/podman.real && mount --bind /usr/bin/podman /tmp/podman.real \
         && cat > /tmp/podman.fake <<'FAKE'
#!/bin/sh
case \"$1\" in
  rm|kill) echo \"Error: injected podman $1 failure\" >&2; exit 125 ;;
esac
exec /tmp/podman.real \"$@\"
FAKE
chmod +x /tmp/podman.fake && mount --bind /tmp/podman.fake /usr/bin/podman";
    OnHost::apply(
        host,
        script,
        "umount /usr/bin/podman; umount /tmp/podman.real; rm -f /tmp/podman.real /tmp/podman.fake",
    )
}

#[test]
fn a_target_that_cannot_be_cleaned_stops_the_rollback_with_exit_3() {
    require_lab!();
    fresh_workload("a", 100);
    let before = counter("a");
    // Something else holds web's port on b: db restores there, web cannot. Then nothing
    // on b can be removed: db keeps running there.
    let _blocker = Guard(
        std::process::Command::new(repo().join("scripts/lab"))
            .args(["exec", "b", "busybox", "nc", "-l", "-p", "8080"])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let stuck = podman_that_cannot_remove("b");
    let rx = Receiver::start("b", &[]);
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(3);
    let (code, _) = rx.wait(T);
    assert_ne!(code, Some(0), "the receiver must not report success");
    assert_eq!(out.record()["outcome"], "failed", "{}", out.describe());
    // Never two copies: nothing runs on a, db runs on b, and the message says so.
    assert!(
        running("a").is_empty(),
        "{:?}\n{}",
        running("a"),
        out.describe()
    );
    assert_eq!(running("b"), vec!["db"], "{}", out.describe());
    for want in [
        "could not be made clean, so nothing was restored on this host",
        "On root@10.77.0.12: db runs (",
        "injected podman rm failure",
        "db, web stopped, checkpoints kept",
        "`podman rm --force db web`",
    ] {
        assert!(out.stderr.contains(want), "{want:?}\n{}", out.describe());
    }
    // The target's own report is passed on: what it could not remove.
    assert!(
        out.stderr.contains("NOT removed on lab-b"),
        "{}",
        out.describe()
    );
    // The fix it prints works: clean b, then the commands it gives for a, in its order;
    // the pair runs there with its state.
    drop(stuck);
    drop(_blocker);
    on("b", &["podman", "rm", "--force", "db", "web"]).ok();
    let here = out
        .stderr
        .split(" then here ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .filter(|line| line.ends_with("`."))
        .unwrap_or_else(|| panic!("no commands for the source at the end\n{}", out.describe()));
    let cmds: Vec<&str> = here.split('`').skip(1).step_by(2).collect();
    assert_eq!(cmds.len(), 2, "{here}");
    for cmd in cmds {
        on("a", &["sh", "-c", cmd]).ok();
    }
    assert!(all_containers("b").is_empty(), "{:?}", all_containers("b"));
    assert_pair_alive("a", 100, before);
}

#[test]
fn a_full_disk_on_the_target_during_the_stream_rolls_back_and_leaves_nothing() {
    require_lab!();
    fresh_workload("a", 100);
    let before = counter("a");
    // A file system of its own for the receiver's run folders: roomy for the checks
    // before the freeze (they estimate the archives from the containers' memory), shrunk
    // to 1 MiB by a target hook right before the freeze. The archives do not fit.
    let _full = OnHost::apply(
        "b",
        "mkdir -p /var/lib/migrate/runs && mount -t tmpfs -o size=1g,mode=700 migrate-e2e-full /var/lib/migrate/runs",
        "umount -l /var/lib/migrate/runs",
    );
    let rx = Receiver::start("b", &[]);
    let out = send(
        "a",
        &[
            "--to",
            &to("b"),
            "--data",
            "/srv/app",
            "--target-hook",
            "pre-freeze=mount -o remount,size=1m /var/lib/migrate/runs",
            "db",
            "web",
        ],
    )
    .expect_code(1);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    assert!(
        out.stderr.contains("No space left on device"),
        "the stream must have failed on the full disk\n{}",
        out.describe()
    );
    let (code, _) = rx.wait(T);
    assert_ne!(code, Some(0), "the receiver must not report success");
    // Nothing left on b: no container, no run folder, no partial archive.
    assert!(all_containers("b").is_empty(), "{:?}", all_containers("b"));
    let left = on(
        "b",
        &["sh", "-c", "cd /var/lib/migrate/runs && find . -mindepth 1"],
    )
    .ok();
    assert_eq!(left.stdout.trim(), "", "{}", left.describe());
    assert_pair_alive("a", 100, before);
}
