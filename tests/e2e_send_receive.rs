//! `migrate send` / `migrate receive` end to end on the lab: real podman, runc, CRIU,
//! rsync and OpenSSH between two network-namespace hosts.
mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);

fn to(host: &str) -> String {
    format!("root@{}", host_addr(host))
}

/// Moves the thesis pair from `from` to `dest` and checks everything arrived.
/// Moves the pair; returns the receiver's log.
fn migrate_pair(from: &str, dest: &str, rows_expected: u64) -> String {
    let rx = Receiver::start(dest, &[]);
    let before = counter(from);
    let target = to(dest);
    let out = send(
        from,
        &[
            "--to", &target, "--data", "/srv/app", "--label", "e2e", "db", "web",
        ],
    )
    .ok();
    let rec = out.record();
    assert_eq!(rec["outcome"], "ok", "{}", out.describe());
    assert_eq!(rec["label"], "e2e");
    let downtime: f64 = rec["downtime_s"].parse().unwrap();
    let migration: f64 = rec["migration_time_s"].parse().unwrap();
    assert!(downtime > 0.0 && downtime < migration, "{}", out.describe());
    assert!(rec["up_ts"] > rec["down_ts"]);
    // send froze the containers itself (the lab's hosts have a cgroup freezer), so CRIU
    // did not poll for the freeze.
    for c in ["db", "web"] {
        assert!(
            out.stderr
                .contains(&format!("checkpointed {c}: frozen in ")),
            "{}",
            out.describe()
        );
    }
    // The pre-synced data was written to disk on the target before the freeze.
    let flushed = out
        .stderr
        .find("the target wrote the pre-synced data to disk")
        .expect("the flush is logged");
    assert!(
        flushed
            < out
                .stderr
                .find("DOWN: checkpointing")
                .expect("DOWN is logged"),
        "{}",
        out.describe()
    );
    let log = rx.log();
    let (code, rx_out) = rx.wait(T);
    assert_eq!(code, Some(0), "receiver exit; stdout:\n{rx_out}");
    assert!(
        rx_out.contains(&rec["run_id"]),
        "receiver record names the run: {rx_out}"
    );
    assert_pair_alive(dest, rows_expected, before);
    assert!(
        all_containers(from).is_empty(),
        "left on {from}: {:?}",
        all_containers(from)
    );
    log
}

#[test]
fn thesis_pair_moves_a_to_b_and_back_with_state() {
    require_lab!();
    fresh_workload("a", 1000);
    // MariaDB's buffer pool is mostly zero-filled pages: the target leaves them out of
    // its archive, and the database restored without them still has its rows (checked
    // above) and moves back with them.
    let log = migrate_pair("a", "b", 1000);
    assert!(
        log.contains("db: ") && log.contains("MiB of zero pages left out of its archive"),
        "{log}"
    );
    migrate_pair("b", "a", 1000);
}

#[test]
fn json_records_and_receive_serve_mode() {
    require_lab!();
    fresh_workload("a", 100);
    let rx = Receiver::start("b", &["--serve", "--format", "json"]);
    let out = send(
        "a",
        &[
            "--to",
            &to("b"),
            "--data",
            "/srv/app",
            "--format",
            "json",
            "--keep-zero-pages",
            "db",
            "web",
        ],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(v["outcome"], "ok");
    // --keep-zero-pages: the archives are restored as podman wrote them.
    assert!(!rx.log().contains("zero pages left out"), "{}", rx.log());
    assert!(v["downtime_s"].as_f64().unwrap() > 0.0);
    // --serve: the receiver is still there for the next one.
    std::thread::sleep(Duration::from_millis(300));
    let mut rx = rx;
    assert!(
        rx.is_running(),
        "receiver with --serve exited after one migration"
    );
    let rx_a = Receiver::start("a", &[]);
    send(
        "b",
        &[
            "--to",
            &to("a"),
            "--data",
            "/srv/app",
            "--no-header",
            "db",
            "web",
        ],
    )
    .ok();
    drop(rx_a);
    assert_eq!(running("a"), vec!["db", "web"]);
    rx.kill();
}

#[test]
fn a_file_written_after_the_presync_arrives() {
    require_lab!();
    fresh_workload("a", 100);
    on("a", &["sh", "-c", "echo old > /srv/app/www/gone.txt"]).ok();
    // No `zstd` command on the target: the receiver's own binary decodes the stream.
    let _no_zstd = OnHost::apply(
        "b",
        "mount --bind /dev/null /usr/bin/zstd",
        "umount /usr/bin/zstd",
    );
    let rx = Receiver::start("b", &[]);
    // The pre-freeze hook runs after the pre-sync (and after the post-sync's rsync was
    // started, held before its file list) and before the freeze.
    let out = send(
        "a",
        &[
            "--to",
            &to("b"),
            "--data",
            "/srv/app",
            "--compress",
            "zstd",
            "--hook",
            "pre-freeze=echo written-late > /srv/app/www/late.txt && rm /srv/app/www/gone.txt",
            "--target-hook",
            "post-up=echo \"$MIGRATE_PHASE $MIGRATE_RUN_ID $MIGRATE_CONTAINERS\" > /srv/post-up.txt",
            "db",
            "web",
        ],
    )
    .ok();
    let rec = out.record();
    assert_eq!(rec["outcome"], "ok");
    rx.wait(T);
    // The target hook ran on the target, with the migration's facts.
    let hook = on("b", &["cat", "/srv/post-up.txt"]).ok();
    assert_eq!(
        hook.stdout.trim(),
        format!("post-up {} db web", rec["run_id"])
    );
    let late = on("b", &["cat", "/srv/app/www/late.txt"]).ok();
    assert_eq!(late.stdout.trim(), "written-late");
    // Deleted after the pre-sync: deleted on the target by the post-sync.
    on("b", &["sh", "-c", "! test -e /srv/app/www/gone.txt"]).ok();
    // zstd on the wire, decoded on the target without the `zstd` command.
    let wire: u64 = rec["frozen_bytes"].parse().unwrap();
    let plain: u64 = rec["archive_bytes"].parse().unwrap();
    assert!(wire < plain, "frozen_bytes {wire} >= archive_bytes {plain}");
    let dump: f64 = rec["dump_s"].parse().unwrap();
    let down: f64 = rec["downtime_s"].parse().unwrap();
    assert!(
        dump > 0.0 && dump < down,
        "dump_s {dump}, downtime_s {down}"
    );
    let page = lab(&["workload", "http", "b", "/late.txt"]).ok();
    assert!(page.stdout.contains("written-late"), "{}", page.describe());
}

/// Nothing was frozen: the containers run with the same identity as before.
fn assert_untouched(ids: &[(String, String)]) {
    for (name, id) in ids {
        assert_eq!(&identity("a", name), id, "{name} was touched");
    }
    assert_eq!(running("a"), vec!["db", "web"]);
}

fn identities() -> Vec<(String, String)> {
    ["db", "web"]
        .iter()
        .map(|n| (n.to_string(), identity("a", n)))
        .collect()
}

#[test]
fn refusals_exit_2_before_anything_is_frozen() {
    require_lab!();
    fresh_workload("a", 100);
    let ids = identities();

    // Unknown container.
    let rx = Receiver::start("b", &[]);
    let out = send(
        "a",
        &["--to", &to("b"), "--data", "/srv/app", "db", "nosuch"],
    )
    .expect_code(2);
    assert!(
        out.stderr.contains("\"nosuch\" does not exist"),
        "{}",
        out.describe()
    );
    assert_eq!(out.record()["outcome"], "refused");
    assert_untouched(&ids);
    drop(rx);

    // No receiver listening.
    kill_receivers();
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(2);
    assert!(
        out.stderr.contains("no receiver listening"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("migrate receive"),
        "says what to do: {}",
        out.describe()
    );
    assert_untouched(&ids);

    // Unreachable host.
    let out = send("a", &["--to", "root@10.77.0.99", "db", "web"]).expect_code(2);
    assert!(out.stderr.contains("cannot reach"), "{}", out.describe());
    assert_untouched(&ids);

    // Bad input is one line naming the flag.
    let out = send("a", &["--to", &to("b"), "--data", "relative/path", "db"]).expect_code(2);
    assert!(
        out.stderr.contains("--data relative/path"),
        "{}",
        out.describe()
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.describe());

    // A data folder that does not cover a bind mount missing on the target.
    let rx = Receiver::start("b", &[]);
    on("b", &["rm", "-rf", "/srv/app"]).ok();
    let out = send(
        "a",
        &["--to", &to("b"), "--data", "/srv/app/www", "db", "web"],
    )
    .expect_code(2);
    assert!(
        out.stderr.contains("/srv/app/mysql") && out.stderr.contains("--data"),
        "{}",
        out.describe()
    );
    assert_untouched(&ids);
    drop(rx);
}

#[test]
fn strangers_on_the_control_port_do_not_trigger_a_restore() {
    require_lab!();
    fresh_workload("a", 100);
    let mut rx = Receiver::start("b", &[]);
    // Plain bytes, the thesis's bare "OK", a forged hello followed by a forged (unsigned)
    // Ready, and a frame far larger than allowed.
    // A hello with a challenge for a run nobody set up over SSH, then a forged ready.
    let forged = r#"{"v":2,"seq":0,"msg":"{\"type\":\"hello\",\"protocol\":2,\"run_id\":\"evil\",\"sender_version\":\"x\",\"source_host\":\"x\",\"label\":\"\",\"challenge\":\"00112233445566778899aabbccddeeff\"}","mac":null}
{"v":2,"seq":1,"msg":"{\"type\":\"ready\",\"manifest\":{\"run_id\":\"evil\",\"containers\":[{\"name\":\"db\",\"archive\":\"../../x.tar\",\"size\":1,\"digest\":\"00\",\"image_id\":\"x\",\"file_locks\":false,\"tcp_established\":false}],\"data\":[],\"down_us\":0,\"clock_offset_us\":0}}","mac":"00"}
"#;
    let forged_file = format!("{}/forged.txt", env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(&forged_file, forged).unwrap();
    let port = "/dev/tcp/10.77.0.12/12345";
    let scripts = [
        format!("printf OK > {port}"),
        format!("cat {forged_file} > {port}; sleep 1"),
        format!("head -c 200000 /dev/zero | tr '\\0' x > {port}"),
    ];
    for s in &scripts {
        on("c", &["timeout", "10", "bash", "-c", s]);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.is_running(),
        "receiver exited on a stranger's bytes:\n{}",
        rx.log()
    );
    assert!(
        rx.log().contains("refused"),
        "refusals are logged:\n{}",
        rx.log()
    );
    assert!(
        all_containers("b").is_empty(),
        "something was restored on b"
    );
    // The next real migration still works with the same receiver.
    let before = counter("a");
    send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).ok();
    let (code, _) = rx.wait(T);
    assert_eq!(code, Some(0));
    assert_pair_alive("b", 100, before);
}

#[test]
fn checkpoint_failing_on_the_source_leaves_the_service_running() {
    require_lab!();
    fresh_workload("a", 100);
    let ids = identities();
    let broken = BrokenCriu::install("a");
    let rx = Receiver::start("b", &[]);
    let before = counter("a");
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(1);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    assert!(out.stderr.contains("checkpoint of"), "{}", out.describe());
    drop(broken);
    drop(rx);
    assert!(
        all_containers("b").is_empty(),
        "left on b: {:?}",
        all_containers("b")
    );
    assert_untouched(&ids);
    assert_pair_alive("a", 100, before);
}

/// Puts a wrapper over runc on a host: where `when` (a `case` pattern on runc's arguments)
/// matches, it fails (exit 1) instead of running the real runc or, with `real_first`,
/// after running it. podman's probe (`runc checkpoint --help`) is left alone.
struct BrokenRunc;

impl BrokenRunc {
    fn install(host: &'static str, when: &str, real_first: bool) -> OnHost {
        let body = if real_first {
            "/tmp/runc.real \"$@\"; echo 'injected runc failure after the real one' >&2; exit 1"
        } else {
            "echo 'injected runc failure' >&2; exit 1"
        };
        let script = format!(
            "cp /usr/sbin/runc /tmp/runc.real && cat > /tmp/runc.fake <<'FAKE'
#!/bin/sh
case \" $* \" in
  *' --help '*) ;;
  {when}) {body} ;;
esac
exec /tmp/runc.real \"$@\"
FAKE
chmod +x /tmp/runc.fake && mount --bind /tmp/runc.fake /usr/sbin/runc"
        );
        OnHost::apply(host, &script, "umount /usr/sbin/runc")
    }
}

/// The process podman runs as the container's PID 1 (host PID).
fn pid_of(host: &str, name: &str) -> String {
    on(
        host,
        &["podman", "inspect", "--format", "{{.State.Pid}}", name],
    )
    .ok()
    .stdout
    .trim()
    .to_string()
}

#[test]
fn checkpoint_refused_at_its_start_leaves_the_same_processes_running() {
    require_lab!();
    fresh_workload("a", 100);
    let ids = identities();
    let pids: Vec<String> = ["db", "web"].iter().map(|n| pid_of("a", n)).collect();
    // runc refuses the checkpoint as it starts: send has just frozen the cgroup (it
    // freezes the moment podman starts the runtime's checkpoint), CRIU never ran.
    let broken = BrokenRunc::install("a", "*' checkpoint '*", false);
    let rx = Receiver::start("b", &[]);
    let before = counter("a");
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(1);
    drop(broken);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    assert!(
        out.stderr.contains("injected runc failure"),
        "{}",
        out.describe()
    );
    drop(rx);
    assert!(all_containers("b").is_empty(), "left on b");
    // Thawed, not restored: the same containers with the same processes.
    assert_untouched(&ids);
    let after: Vec<String> = ["db", "web"].iter().map(|n| pid_of("a", n)).collect();
    assert_eq!(after, pids, "PID 1 of db, web changed");
    assert_pair_alive("a", 100, before);
}

#[test]
fn podman_failing_after_the_dump_brings_the_same_containers_back() {
    require_lab!();
    fresh_workload("a", 100);
    let ids: Vec<String> = ["db", "web"]
        .iter()
        .map(|n| {
            on("a", &["podman", "inspect", "--format", "{{.Id}}", n])
                .ok()
                .stdout
                .trim()
                .to_string()
        })
        .collect();
    // runc dumps (CRIU stops the processes), then reports a failure: podman fails with
    // the containers Exited, as when it refuses to export a container with dependencies.
    let broken = BrokenRunc::install("a", "*' checkpoint '*", true);
    let rx = Receiver::start("b", &[]);
    let before = counter("a");
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(1);
    drop(broken);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    assert!(
        out.stderr
            .contains("restored here from the checkpoint podman kept"),
        "{}",
        out.describe()
    );
    drop(rx);
    assert!(all_containers("b").is_empty(), "left on b");
    for (n, id) in ["db", "web"].iter().zip(&ids) {
        let now = on("a", &["podman", "inspect", "--format", "{{.Id}}", n]).ok();
        assert_eq!(now.stdout.trim(), id, "{n} is another container now");
    }
    // Restored from its dump: the state carried on.
    assert_pair_alive("a", 100, before);
}

#[test]
fn a_container_sharing_namespaces_is_refused_before_the_freeze() {
    require_lab!();
    kill_receivers();
    let img = "localhost/migrate-busybox:latest";
    let _cleanup = OnHost::apply(
        "a",
        &format!(
            "podman rm -f -t 0 nsapp nsbase >/dev/null 2>&1; \
             podman run -d --name nsbase {img} sleep 100000 >/dev/null && \
             podman run -d --name nsapp --network container:nsbase {img} sleep 100000 >/dev/null"
        ),
        "podman rm -f -t 0 nsapp; podman rm -f -t 0 nsbase",
    );
    let id = |n: &str| identity("a", n);
    let before = (id("nsbase"), id("nsapp"), pid_of("a", "nsapp"));
    let _rx = Receiver::start("b", &[]);
    for (moved, says) in [
        (
            &["nsapp"][..],
            "nsapp shares the network namespace of nsbase, which is not being moved",
        ),
        (
            &["nsbase", "nsapp"][..],
            "nsapp shares the network namespace of nsbase:",
        ),
        (&["nsbase"][..], "nsapp depends on nsbase"),
    ] {
        let mut a = vec!["--to", "root@10.77.0.12"];
        a.extend_from_slice(moved);
        let out = send("a", &a).expect_code(2);
        assert_eq!(out.record()["outcome"], "refused", "{}", out.describe());
        assert!(out.stderr.contains(says), "{}", out.describe());
        if moved.contains(&"nsapp") {
            assert!(
                out.stderr
                    .contains("cannot export checkpoints of containers with dependencies"),
                "{}",
                out.describe()
            );
        }
        assert!(!out.stderr.contains("DOWN"), "{}", out.describe());
        assert_eq!(
            (id("nsbase"), id("nsapp"), pid_of("a", "nsapp")),
            before,
            "touched by {moved:?}"
        );
    }
    // `migrate check` reports it too.
    let b = bin();
    let out = on("a", &[&b, "check", "--to", "root@10.77.0.12", "nsapp"]).expect_code(2);
    assert!(
        out.stderr
            .contains("nsapp shares the network namespace of nsbase")
            || out
                .stdout
                .contains("nsapp shares the network namespace of nsbase"),
        "{}",
        out.describe()
    );
    let listing = on("b", &["podman", "ps", "-a", "--format", "{{.Names}}"]).ok();
    assert!(!listing.stdout.contains("nsapp"), "{}", listing.describe());
}

#[test]
fn restore_failing_on_the_target_rolls_back_to_the_source() {
    require_lab!();
    fresh_workload("a", 100);
    let broken = BrokenCriu::install("b");
    let rx = Receiver::start("b", &[]);
    let before = counter("a");
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(1);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    let (code, _) = rx.wait(T);
    assert_ne!(code, Some(0), "receiver must not report success");
    drop(broken);
    assert!(
        all_containers("b").is_empty(),
        "half-restored on b: {:?}",
        all_containers("b")
    );
    assert_pair_alive("a", 100, before);
}

#[test]
fn a_name_taken_on_the_target_after_the_checks_is_left_alone_and_rolled_back() {
    require_lab!();
    fresh_workload("a", 100);
    // Somebody creates a container named web on b after send's checks passed (here: a
    // target hook just before the freeze). podman refuses that restore; the stranger
    // stays as it was, db (restored) is removed again, the pair runs on a.
    let _cleanup = OnHost::apply("b", "true", "podman rm -f web");
    let rx = Receiver::start("b", &[]);
    let before = counter("a");
    let out = send(
        "a",
        &[
            "--to",
            &to("b"),
            "--data",
            "/srv/app",
            "--target-hook",
            "pre-freeze=podman create --name web localhost/migrate-busybox:latest sleep 600",
            "db",
            "web",
        ],
    )
    .expect_code(1);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    assert!(
        out.stderr
            .contains("a container named web already exists on"),
        "{}",
        out.describe()
    );
    rx.wait(T);
    let stranger = on(
        "b",
        &["podman", "ps", "-a", "--format", "{{.Names}} {{.Command}}"],
    )
    .ok();
    // Other tests' containers may be there too; of the pair only the stranger is.
    let pair: Vec<&str> = stranger
        .stdout
        .lines()
        .filter(|l| l.starts_with("web ") || l.starts_with("db "))
        .collect();
    assert_eq!(pair, ["web sleep 600"], "{}", stranger.describe());
    assert_pair_alive("a", 100, before);
}

#[test]
fn rollback_fetches_the_archive_back_when_the_kept_checkpoint_is_gone() {
    require_lab!();
    fresh_workload("a", 100);
    // CRIU fails on b, and when it does it first removes the checkpoints podman keeps on
    // a: the in-place restore there cannot work, only the archive on b can bring the
    // pair back.
    let broken = BrokenCriu::install_with(
        "b",
        "HOME=/root ssh -o BatchMode=yes root@10.77.0.11 'rm -f /var/lib/containers/storage/overlay-containers/*/userdata/checkpoint/inventory.img'",
    );
    let rx = Receiver::start("b", &[]);
    let before = counter("a");
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(1);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    assert!(
        out.stderr.contains("fetched back from the target"),
        "{}",
        out.describe()
    );
    // What came back is the archive as the target wrote it, without db's zero pages: the
    // pair restored from it on a must still have its state (checked below).
    let log = rx.log();
    assert!(
        log.contains("db: ") && log.contains("zero pages left out"),
        "{log}"
    );
    rx.wait(T);
    drop(broken);
    assert!(
        all_containers("b").is_empty(),
        "left on b: {:?}",
        all_containers("b")
    );
    // The run folder on b, archives included, is gone once the rollback worked.
    let run_id = out.record()["run_id"].clone();
    on(
        "b",
        &[
            "sh",
            "-c",
            &format!("! test -e /var/lib/migrate/runs/{run_id}"),
        ],
    )
    .ok();
    assert_pair_alive("a", 100, before);
}

#[test]
fn partial_restore_is_removed_on_the_target_and_rolled_back() {
    require_lab!();
    fresh_workload("a", 100);
    // Something else holds web's port on b: db restores, web cannot.
    let mut blocker = Guard(
        std::process::Command::new(repo().join("scripts/lab"))
            .args(["exec", "b", "busybox", "nc", "-l", "-p", "8080"])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let rx = Receiver::start("b", &[]);
    let before = counter("a");
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(1);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    rx.wait(T);
    blocker.kill();
    assert!(
        all_containers("b").is_empty(),
        "left on b: {:?}",
        all_containers("b")
    );
    assert_pair_alive("a", 100, before);
}

/// Kills a helper process when the test ends, however it ends.
struct Guard(std::process::Child);

impl Guard {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn receiver_killed_after_ok_leaves_exactly_one_copy() {
    require_lab!();
    fresh_workload("a", 100);
    let mut rx = Receiver::start("b", &[]);
    let before = counter("a");
    let target = to("b");
    let sender = std::thread::spawn(move || {
        send("a", &["--to", &target, "--data", "/srv/app", "db", "web"])
    });
    rx.wait_for_line("OK received", Duration::from_secs(60));
    // SIGKILL: no chance to clean up or answer.
    rx.kill();
    let out = sender.join().unwrap();
    let code = out.code;
    assert!(code == Some(0) || code == Some(1), "{}", out.describe());
    let on_a = running("a");
    let on_b = running("b");
    if code == Some(0) {
        assert!(
            all_containers("a").is_empty(),
            "split brain: a={on_a:?} b={on_b:?}"
        );
        assert_port_free("a", 8080);
        assert_pair_alive("b", 100, before);
    } else {
        assert_eq!(out.record()["outcome"], "rolled_back");
        assert!(
            all_containers("b").is_empty(),
            "split brain: a={on_a:?} b={on_b:?}"
        );
        // No leftover of a half-done restore (a conmon) holds web's port.
        assert_port_free("b", 8080);
        assert_pair_alive("a", 100, before);
    }
}

fn assert_port_free(host: &str, port: u16) {
    on(
        host,
        &[
            "sh",
            "-c",
            &format!("! ss -Hltn 'sport = :{port}' | grep -q ."),
        ],
    )
    .ok();
}

#[test]
fn sigterm_before_the_freeze_leaves_everything_running() {
    require_lab!();
    fresh_workload("a", 100);
    let ids = identities();
    let _rx = Receiver::start("b", &[]);
    let target = to("b");
    let sender = std::thread::spawn(move || {
        send(
            "a",
            &[
                "--to",
                &target,
                "--data",
                "/srv/app",
                "--hook",
                "pre-freeze=sleep 20.5",
                "db",
                "web",
            ],
        )
    });
    // Wait for the hook to be running, then SIGTERM the sender.
    let pattern = format!("{} send", bin());
    let mut found = false;
    for _ in 0..200 {
        if run("pgrep", &["-f", "^sleep 20.5$"]).code == Some(0) {
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(found, "the pre-freeze hook never started");
    run("pkill", &["-TERM", "-f", &pattern]);
    let out = sender.join().unwrap().expect_code(2);
    assert!(
        out.stderr.contains("nothing was frozen"),
        "{}",
        out.describe()
    );
    assert_untouched(&ids);
}

#[test]
fn sigterm_while_frozen_rolls_back_to_the_source() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let before = counter("a");
    // 300 MB written after the pre-sync make the post-sync (while frozen) take a while.
    let mut sender = start_slow_send(false);
    let pid = sender.id();
    let mut signalled = false;
    let log = follow(&mut sender, |line| {
        if !signalled && line.contains("shipping archives and changed data") {
            run("kill", &["-TERM", &pid.to_string()]);
            signalled = true;
        }
    });
    let (code, stdout) = finish(&mut sender);
    assert!(signalled, "never saw the frozen phase:\n{}", log.join("\n"));
    assert_rolled_back(code, &stdout, &log, before);
    on("a", &["rm", "-f", "/srv/app/www/big.bin"]).ok();
}
