//! `migrate check`, `--ship-image` and `--spawn-receiver` on the lab (real stack).
mod common;

use std::time::Duration;

use common::*;

fn check(args: &[&str]) -> Out {
    let b = bin();
    let mut cmd = vec![b.as_str(), "check", "--to", "root@10.77.0.12"];
    cmd.extend_from_slice(args);
    on("a", &cmd)
}

#[test]
fn check_passes_on_a_healthy_pair() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let out = check(&["--data", "/srv/app", "db", "web"]).ok();
    assert!(
        out.stdout.contains("a migration would start"),
        "{}",
        out.describe()
    );
    assert!(!out.stdout.contains("FAIL"), "{}", out.describe());
    for what in [
        "container db runs",
        "SSH to root@10.77.0.12 works",
        "receiver on 10.77.0.12:12345 answers",
        "clock offset",
    ] {
        assert!(
            out.stdout.contains(what),
            "missing {what:?}:\n{}",
            out.describe()
        );
    }
}

#[test]
fn check_names_each_problem_and_exits_2() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);

    let out = check(&["--data", "/srv/app", "db", "nosuch"]).expect_code(2);
    assert!(
        out.stdout
            .contains("FAIL source: container \"nosuch\" does not exist"),
        "{}",
        out.describe()
    );

    let out = on(
        "a",
        &[
            "sh",
            "-c",
            &format!(
                "rm -f /tmp/wrong_key*; ssh-keygen -q -t ed25519 -N '' -f /tmp/wrong_key && {} check --to root@10.77.0.12 --identity /tmp/wrong_key --data /srv/app db web",
                bin()
            ),
        ],
    )
    .expect_code(2);
    assert!(
        out.stdout.contains("key was not accepted"),
        "{}",
        out.describe()
    );

    let out = check(&["--data", "/srv/app/www", "db", "web"]).expect_code(2);
    assert!(
        out.stdout.contains("bind-mounts /srv/app/mysql")
            && out.stdout.contains("add --data /srv/app/mysql"),
        "{}",
        out.describe()
    );

    {
        // No CRIU on the target.
        let _gone = OnHost::apply(
            "b",
            "mount -t tmpfs none /usr/local/sbin",
            "umount /usr/local/sbin",
        );
        let out = check(&["--data", "/srv/app", "db", "web"]).expect_code(2);
        assert!(
            out.stdout.contains("FAIL target: CRIU is not installed"),
            "{}",
            out.describe()
        );
    }
    // ... and the same refusal from send, before anything is frozen.
    let ids = identity("a", "db");
    {
        let _gone = OnHost::apply(
            "b",
            "mount -t tmpfs none /usr/local/sbin",
            "umount /usr/local/sbin",
        );
        let out = send(
            "a",
            &["--to", "root@10.77.0.12", "--data", "/srv/app", "db", "web"],
        )
        .expect_code(2);
        assert!(
            out.stderr.contains("CRIU is not installed"),
            "{}",
            out.describe()
        );
    }
    assert_eq!(identity("a", "db"), ids, "db was touched");
}

#[test]
fn missing_image_is_refused_then_shipped_with_ship_image() {
    require_lab!();
    fresh_workload("a", 100);
    on(
        "b",
        &[
            "podman",
            "rmi",
            "--force",
            "localhost/migrate-busybox:latest",
        ],
    )
    .ok();
    let rx = Receiver::start("b", &[]);
    let out = check(&["--data", "/srv/app", "db", "web"]).expect_code(2);
    assert!(
        out.stdout
            .contains("image localhost/migrate-busybox:latest")
            && out.stdout.contains("--ship-image"),
        "{}",
        out.describe()
    );
    let out = send(
        "a",
        &["--to", "root@10.77.0.12", "--data", "/srv/app", "db", "web"],
    )
    .expect_code(2);
    assert!(out.stderr.contains("--ship-image"), "{}", out.describe());
    let before = counter("a");
    let out = send(
        "a",
        &[
            "--to",
            "root@10.77.0.12",
            "--data",
            "/srv/app",
            "--ship-image",
            "db",
            "web",
        ],
    )
    .ok();
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    rx.wait(Duration::from_secs(60));
    assert_pair_alive("b", 100, before);
    let id_a = on(
        "a",
        &[
            "podman",
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            "localhost/migrate-busybox:latest",
        ],
    )
    .ok();
    let id_b = on(
        "b",
        &[
            "podman",
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            "localhost/migrate-busybox:latest",
        ],
    )
    .ok();
    assert_eq!(id_a.stdout, id_b.stdout, "shipped image keeps its ID");
}

#[test]
fn spawn_receiver_migrates_with_one_command() {
    require_lab!();
    fresh_workload("a", 100);
    for h in ["a", "b"] {
        on(h, &["rm", "-rf", "/var/lib/migrate/bin"]).ok();
    }
    // Without the same migrate on the target, --spawn-receiver alone is refused...
    let out = send(
        "a",
        &[
            "--to",
            "root@10.77.0.12",
            "--data",
            "/srv/app",
            "--spawn-receiver",
            "db",
            "web",
        ],
    )
    .expect_code(2);
    assert!(
        out.stderr.contains("--install-receiver"),
        "{}",
        out.describe()
    );
    // ... --install-receiver copies this binary there, starts it, and migrates.
    let install_send = |from: &str, to: &str| {
        let b = bin();
        let dest = format!("root@{}", host_addr(to));
        on(
            from,
            &[
                &b,
                "send",
                "--to",
                &dest,
                "--data",
                "/srv/app",
                "--install-receiver",
                "db",
                "web",
            ],
        )
        .ok()
    };
    let before = counter("a");
    let out = install_send("a", "b");
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    assert_pair_alive("b", 100, before);
    // The spawned receiver handled its one migration and is gone.
    std::thread::sleep(Duration::from_millis(500));
    let left = run("pgrep", &["-f", "/var/lib/migrate/bin/migrate-.* receive"]);
    assert_ne!(
        left.code,
        Some(0),
        "spawned receiver still running: {}",
        left.stdout
    );
    // And the way back, installing on a this time.
    let before = counter("b");
    let out = install_send("b", "a");
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    assert_pair_alive("a", 100, before);
}

#[test]
fn dry_run_prints_the_plan_and_touches_nothing() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let ids = identity("a", "db");
    let out = send(
        "a",
        &[
            "--to",
            "root@10.77.0.12",
            "--data",
            "/srv/app",
            "--dry-run",
            "db",
            "web",
        ],
    )
    .ok();
    for what in [
        "pre-sync /srv/app",
        "checkpoint in parallel",
        "estimated downtime",
        "restores db, web",
    ] {
        assert!(
            out.stdout.contains(what),
            "missing {what:?}: {}",
            out.describe()
        );
    }
    assert_eq!(identity("a", "db"), ids);
    assert!(all_containers("b").is_empty());
}
