//! What a lost terminal does to `migrate send` on the lab: its stderr gone mid-migration,
//! SIGHUP, and Ctrl-C sent to its whole process group, twice, while the service is
//! frozen. Real podman, runc, CRIU, rsync and OpenSSH between two lab hosts.
mod common;

use std::io::{BufRead, BufReader};

use common::*;

fn signal_group(pgid: u32, sig: &str) {
    run("kill", &[sig, "--", &format!("-{pgid}")]).ok();
}

#[test]
fn stderr_closed_mid_migration_neither_panics_nor_loses_the_service() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let before = counter("a");
    let mut sender = start_slow_send(false);
    // Read up to the freeze, then close the read end: every later line hits EPIPE.
    let err = sender.stderr.take().unwrap();
    let mut lines = BufReader::new(err).lines();
    let mut log = Vec::new();
    for line in lines.by_ref().map_while(Result::ok) {
        eprintln!("[sender] {line}");
        let frozen = line.contains("DOWN: checkpointing");
        log.push(line);
        if frozen {
            break;
        }
    }
    drop(lines);
    let (code, stdout) = finish(&mut sender);
    assert!(
        log.iter().any(|l| l.contains("DOWN: checkpointing")),
        "never saw the freeze:\n{}",
        log.join("\n")
    );
    // A panic exits 101; 0 is migrated, 1 rolled back.
    match code {
        Some(0) => {
            assert!(stdout.contains(",ok,"), "{stdout}");
            assert_pair_only_on("b", "a", before);
        }
        Some(1) => {
            assert!(stdout.contains(",rolled_back,"), "{stdout}");
            assert_pair_only_on("a", "b", before);
        }
        other => panic!(
            "the sender ended {other:?} once its stderr was gone; stdout:\n{stdout}\nstderr before:\n{}",
            log.join("\n")
        ),
    }
    // Leave the pair on a, as the other tests expect it.
    fresh_workload("a", 100);
}

#[test]
fn sighup_while_frozen_rolls_back_to_the_source() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let before = counter("a");
    let mut sender = start_slow_send(false);
    let pid = sender.id();
    let mut signalled = false;
    let log = follow(&mut sender, |line| {
        if !signalled && line.contains("shipping archives and changed data") {
            run("kill", &["-HUP", &pid.to_string()]).ok();
            signalled = true;
        }
    });
    let (code, stdout) = finish(&mut sender);
    assert!(signalled, "never saw the frozen phase:\n{}", log.join("\n"));
    assert!(
        log.iter()
            .any(|l| l.contains("SIGHUP received; in progress: shipping archives")),
        "{}",
        log.join("\n")
    );
    assert_rolled_back(code, &stdout, &log, before);
    on("a", &["rm", "-f", "/srv/app/www/big.bin"]).ok();
}

#[test]
fn ctrl_c_to_the_process_group_while_frozen_rolls_back_and_a_second_waits_for_it() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let before = counter("a");
    let mut sender = start_slow_send(true);
    let pgid = sender.id();
    let mut first = false;
    let mut second = false;
    let mut group_while_frozen = String::new();
    let log = follow(&mut sender, |line| {
        if !first && line.contains("shipping archives and changed data") {
            // podman, rsync and the ssh clients run now: none of them is in the group a
            // terminal's Ctrl-C reaches, only migrate itself.
            group_while_frozen = run("pgrep", &["-g", &pgid.to_string()]).stdout;
            signal_group(pgid, "-INT");
            first = true;
        }
        if first && !second && line.contains("rolling back: restoring db on this host") {
            // podman is restoring db: a second Ctrl-C must not cut that short.
            signal_group(pgid, "-INT");
            second = true;
        }
    });
    let (code, stdout) = finish(&mut sender);
    assert!(first, "never saw the frozen phase:\n{}", log.join("\n"));
    assert!(second, "never saw the rollback:\n{}", log.join("\n"));
    assert_eq!(
        group_while_frozen.split_whitespace().collect::<Vec<_>>(),
        vec![pgid.to_string()],
        "processes in the sender's process group while frozen (only the sender belongs there)"
    );
    assert!(
        log.iter().any(|l| l.contains(
            "SIGINT received again; in progress: rolling back: restoring db on this host"
        )),
        "{}",
        log.join("\n")
    );
    assert!(
        !log.iter().any(|l| l.contains("killed by signal")),
        "{}",
        log.join("\n")
    );
    assert_rolled_back(code, &stdout, &log, before);
    on("a", &["rm", "-f", "/srv/app/www/big.bin"]).ok();
}
