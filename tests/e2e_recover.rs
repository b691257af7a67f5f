//! A sender that is SIGKILLed (no handler runs, no rollback) at several phases: its
//! watchdog brings the service back on the source within a stated bound, exactly once and
//! with its state, and `migrate recover` reports the run. Real podman, runc, CRIU and
//! OpenSSH on the lab's hosts.
mod common;

use std::time::{Duration, Instant};

use common::*;

/// How long after the sender's death the service must run again on the source (the
/// user guide's "When the sender dies" states the same bound). It covers the rest of a
/// dump CRIU had started, the podman export read away, and `podman container restore`.
const BOUND: Duration = Duration::from_secs(10);

/// The thesis pair's sender on host a, watched line by line.
fn thesis_sender(extra: &[&str]) -> Sender {
    let mut args = vec!["--to", "root@10.77.0.12", "--data", "/srv/app"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["db", "web"]);
    Sender::start("a", &args)
}

/// Waits until the pair runs on a again; returns how long after `since` that was.
fn pair_back_on_a(since: Instant, limit: Duration) -> Duration {
    loop {
        if running("a") == vec!["db", "web"] {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "the pair does not run on a {:?} after the sender died: a={:?} (all: {:?}), b={:?}\nwatchdog logs:\n{}",
            limit,
            running("a"),
            all_containers("a"),
            all_containers("b"),
            watchdog_logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn watchdog_logs() -> String {
    on(
        "a",
        &[
            "sh",
            "-c",
            "tail -n 30 /var/lib/migrate/source-runs/*.watchdog.log",
        ],
    )
    .stdout
}

/// `migrate recover` on a, JSON records.
fn recover(args: &[&str]) -> Out {
    let b = bin();
    let mut a = vec![b.as_str(), "recover", "--format", "json"];
    a.extend_from_slice(args);
    on("a", &a)
}

/// The record `recover --list` prints for `run_id`, once its watchdog is done.
fn listed_when_done(run_id: &str) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let out = recover(&["--list", "--run", run_id]).ok();
        let rec: serde_json::Value = serde_json::from_str(
            out.stdout
                .lines()
                .next()
                .unwrap_or_else(|| panic!("no record for {run_id}\n{}", out.describe())),
        )
        .unwrap();
        if rec["watchdog"]
            .as_str()
            .is_some_and(|w| w.starts_with("done:"))
        {
            return rec;
        }
        assert!(Instant::now() < end, "the watchdog never finished: {rec}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Then `recover` itself reports the run (settled: nothing left to do) and forgets it.
fn recover_reports(run_id: &str, phase: &str, want_actions: &[&str]) {
    let rec = listed_when_done(run_id);
    eprintln!("--- the watchdog's log\n{}", watchdog_logs());
    assert_eq!(rec["phase"], phase, "{rec}");
    assert_eq!(rec["sender"], "gone", "{rec}");
    assert_eq!(rec["containers"], serde_json::json!(["db", "web"]), "{rec}");
    let out = recover(&["--run", run_id]).ok();
    eprintln!("--- recover\n{}", out.describe());
    let rec: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(rec["run_id"], run_id, "{}", out.describe());
    assert_eq!(rec["result"], "clean", "{}", out.describe());
    assert_eq!(rec["runs_on"], "source", "{}", out.describe());
    for a in want_actions {
        assert!(out.stderr.contains(a), "{a:?}\n{}", out.describe());
    }
    // Reported once: the journal is gone, a second look finds nothing.
    let again = recover(&["--run", run_id]).ok();
    assert!(again.stdout.trim().is_empty(), "{}", again.describe());
}

/// Makes every CRIU worker (`criu swrk`, what runc runs) on host a sleep 2.9 s first while
/// /tmp/criu.hold exists: `send` has frozen the container when runc starts, so the sleep
/// is time the container spends frozen by `send` itself.
fn hold_criu() -> OnHost {
    OnHost::apply(
        "a",
        "touch /tmp/criu.hold && cp /usr/local/sbin/criu /tmp/criu.real && cat > /tmp/criu.fake <<'FAKE'
#!/bin/sh
if [ \"$1\" = swrk ] && [ -e /tmp/criu.hold ]; then sleep 2.9; fi
exec /tmp/criu.real \"$@\"
FAKE
chmod +x /tmp/criu.fake && mount --bind /tmp/criu.fake /usr/local/sbin/criu",
        "rm -f /tmp/criu.hold; umount /usr/local/sbin/criu",
    )
}

/// The freezer state of the cgroup of process `pid` on a: "frozen" or "thawed".
fn freezer_state(pid: &str) -> String {
    on(
        "a",
        &[
            "sh",
            "-c",
            &format!(
                "g=$(sed -n 's/^0:://p' /proc/{pid}/cgroup); f=/sys/fs/cgroup$g/cgroup.freeze; \
                 v1=$(sed -n 's/^[0-9]*:freezer://p' /proc/{pid}/cgroup); \
                 if [ -n \"$v1\" ]; then s=$(cat /sys/fs/cgroup/freezer$v1/freezer.state); \
                 else s=$(cat $f); fi; case $s in FROZEN|1) echo frozen;; *) echo thawed;; esac"
            ),
        ],
    )
    .ok()
    .stdout
    .trim()
    .to_string()
}

#[test]
fn sender_killed_while_frozen_brings_the_service_back_on_the_source() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let before = counter("a");
    let db_pid = on(
        "a",
        &["podman", "inspect", "--format", "{{.State.Pid}}", "db"],
    )
    .ok()
    .stdout
    .trim()
    .to_string();
    let hold = hold_criu();
    let mut sender = thesis_sender(&[]);
    let run_id = sender.run_id();
    sender.wait_for("DOWN: checkpointing", Duration::from_secs(120));
    // runc has started CRIU (held, it has frozen nothing): `send` has frozen db.
    let end = Instant::now() + Duration::from_secs(30);
    while freezer_state(&db_pid) != "frozen" {
        assert!(
            Instant::now() < end,
            "db was never frozen:\n{}",
            sender.log.join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let died = sender.kill9();
    // Restores after this run CRIU without the hold.
    on("a", &["rm", "-f", "/tmp/criu.hold"]).ok();
    let took = pair_back_on_a(died, BOUND);
    eprintln!(
        "the pair ran again on a {:.2}s after the sender died",
        took.as_secs_f64()
    );
    drop(hold);
    assert!(
        all_containers("b").is_empty(),
        "left on b: {:?}",
        all_containers("b")
    );
    assert_pair_alive("a", 100, before);
    recover_reports(&run_id, "checkpointing", &["thawed", "restored db"]);
}

#[test]
fn sender_killed_after_the_dump_brings_the_service_back_on_the_source() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let before = counter("a");
    // 300 MB written after the pre-sync make the post-sync (after the dump) take a while.
    let mut sender = thesis_sender(&["--hook", SLOW_POSTSYNC_HOOK]);
    let run_id = sender.run_id();
    // Every dump is over (the containers' processes are gone), archives still streaming.
    sender.wait_for(
        "shipping archives and changed data",
        Duration::from_secs(180),
    );
    let died = sender.kill9();
    let took = pair_back_on_a(died, BOUND);
    eprintln!(
        "the pair ran again on a {:.2}s after the sender died",
        took.as_secs_f64()
    );
    assert!(
        all_containers("b").is_empty(),
        "left on b: {:?}",
        all_containers("b")
    );
    assert_pair_alive("a", 100, before);
    recover_reports(&run_id, "checkpointing", &["restored db", "restored web"]);
    on("a", &["rm", "-f", "/srv/app/www/big.bin"]).ok();
}

#[test]
fn sender_killed_before_the_freeze_leaves_the_service_untouched() {
    require_lab!();
    fresh_workload("a", 100);
    let ids: Vec<String> = ["db", "web"].iter().map(|c| identity("a", c)).collect();
    let _rx = Receiver::start("b", &[]);
    let before = counter("a");
    let mut sender = thesis_sender(&["--hook", "pre-freeze=sleep 21.5"]);
    let run_id = sender.run_id();
    sender.wait_for("pre-freeze hooks", Duration::from_secs(120));
    let end = Instant::now() + Duration::from_secs(30);
    while run("pgrep", &["-f", "^sleep 21.5$"]).code != Some(0) {
        assert!(Instant::now() < end, "the hook never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    sender.kill9();
    run("pkill", &["-f", "^sleep 21.5$"]);
    let rec = listed_when_done(&run_id);
    assert_eq!(rec["phase"], "prepared", "{rec}");
    let after: Vec<String> = ["db", "web"].iter().map(|c| identity("a", c)).collect();
    assert_eq!(ids, after, "the containers were touched");
    assert!(
        all_containers("b").is_empty(),
        "left on b: {:?}",
        all_containers("b")
    );
    assert_pair_alive("a", 100, before);
    recover_reports(&run_id, "prepared", &[]);
}

#[test]
fn sender_killed_after_ok_leaves_the_service_on_the_target_only() {
    require_lab!();
    fresh_workload("a", 100);
    let rx = Receiver::start("b", &[]);
    let before = counter("a");
    let mut sender = thesis_sender(&[]);
    let run_id = sender.run_id();
    // "OK" is out: the target restores; only its state may decide now.
    sender.wait_for("OK sent; target restoring", Duration::from_secs(180));
    sender.kill9();
    let (code, _) = rx.wait(Duration::from_secs(120));
    assert_eq!(code, Some(0), "the receiver did not restore");
    let rec = listed_when_done(&run_id);
    eprintln!("--- the watchdog's log\n{}", watchdog_logs());
    assert_eq!(rec["phase"], "ok_sent", "{rec}");
    assert_eq!(rec["watchdog"], "done:repaired", "{rec}");
    // The watchdog asked the target, found both running there and retired them here.
    assert!(
        all_containers("a").is_empty(),
        "split brain: a={:?} b={:?}",
        all_containers("a"),
        running("b")
    );
    assert_pair_alive("b", 100, before);
    let out = recover(&["--run", &run_id]).ok();
    eprintln!("--- recover\n{}", out.describe());
    let rec: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(rec["result"], "clean", "{}", out.describe());
    assert_eq!(rec["runs_on"], "target", "{}", out.describe());
    assert!(out.stderr.contains("removed db here"), "{}", out.describe());
}
