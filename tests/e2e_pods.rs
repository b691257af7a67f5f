//! A pod moved whole on the lab: `migrate send POD` re-creates the pod on the target,
//! restores its members into it with their memory, and removes it from the source.
mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);
const POD: &str = "pp";
const MEMBERS: [&str; 2] = ["pp-counter", "pp-front"];

fn to(host: &str) -> String {
    format!("root@{}", host_addr(host))
}

/// What the pod's published front answers on `host`: the hostname its CGI sees and the
/// count pp-counter keeps in memory, fetched over the pod's localhost.
fn front(host: &str) -> (String, u64) {
    let out = lab(&["pod", "http", host]).ok();
    let line = out.stdout.trim();
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_string()
    };
    let count = field("counter=")
        .parse()
        .unwrap_or_else(|_| panic!("counter: {}", out.describe()));
    (field("host="), count)
}

/// The pod's containers on `host` (any state), sorted.
fn pod_containers(host: &str) -> Vec<String> {
    let out = on(host, &["podman", "ps", "-a", "--format", "{{.Names}}"]).ok();
    let mut v: Vec<String> = out
        .stdout
        .lines()
        .filter(|n| n.starts_with("pp-"))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Neither host holds the pod or a receiver; then the pod runs on a. Both hosts have the
/// infra image (built from busybox: there is no registry).
fn fresh_pod() {
    assert_lab();
    kill_receivers();
    for h in ["a", "b"] {
        lab(&["pod", "down", h]).ok();
        lab(&["pod", "image", h]).ok();
        on(h, &["sh", "-c", "rm -rf /var/lib/migrate/runs"]).ok();
    }
    lab(&["pod", "up", "a"]).ok();
}

/// Moves the pod from `from` to `dest` and checks that it runs there with its state and
/// its options, and that nothing of it is left on `from`.
fn move_pod(from: &str, dest: &str) {
    let rx = Receiver::start(dest, &[]);
    let (_, before) = front(from);
    let out = send(from, &["--to", &to(dest), POD]).ok();
    let rec = out.record();
    assert_eq!(rec["outcome"], "ok", "{}", out.describe());
    assert!(
        out.stderr.contains("pod pp moves whole"),
        "{}",
        out.describe()
    );
    let log = rx.log();
    assert!(log.contains("pod pp created"), "{log}");
    let (code, rx_out) = rx.wait(T);
    assert_eq!(code, Some(0), "receiver exit; stdout:\n{rx_out}");
    assert_eq!(pod_containers(dest), MEMBERS, "members on {dest}");
    let (hostname, c1) = front(dest);
    assert_eq!(hostname, "pphost", "the pod's hostname on {dest}");
    assert!(
        c1 >= before,
        "counter on {dest} went back: {c1} < {before} (memory lost)"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (_, c2) = front(dest);
    assert!(c2 > c1, "counter on {dest} stopped: {c1} then {c2}");
    let labels = on(
        dest,
        &["podman", "pod", "inspect", "--format", "{{.Labels}}", POD],
    )
    .ok();
    assert!(labels.stdout.contains("app:pp"), "{}", labels.describe());
    on(from, &["podman", "pod", "exists", POD]).expect_code(1);
    assert!(
        pod_containers(from).is_empty(),
        "left on {from}: {:?}",
        pod_containers(from)
    );
}

#[test]
fn a_pod_moves_a_to_b_and_back_with_state() {
    require_lab!();
    fresh_pod();
    // Let the count grow past what a fresh start would show within a second.
    std::thread::sleep(Duration::from_secs(3));

    // One member alone is refused before the freeze, naming the one left behind.
    let before = identity("a", "pp-front");
    let out = send("a", &["--to", &to("b"), "pp-front"]).expect_code(2);
    assert!(
        out.stderr
            .contains("with pp-counter, which is not being moved: a pod moves whole"),
        "{}",
        out.describe()
    );
    assert_eq!(identity("a", "pp-front"), before, "pp-front was touched");

    move_pod("a", "b");
    move_pod("b", "a");
    lab(&["pod", "down", "a"]).ok();
}

#[test]
fn a_pod_the_target_cannot_create_comes_back_here_and_theirs_is_left_alone() {
    require_lab!();
    fresh_pod();
    std::thread::sleep(Duration::from_secs(3));
    let rx = Receiver::start("b", &[]);
    let (_, before) = front("a");
    // After the checks, somebody takes the pod's name on the target.
    let out = send(
        "a",
        &[
            "--to",
            &to("b"),
            "--target-hook",
            "pre-freeze=podman pod create --name pp --label owner=someone-else --infra-image localhost/migrate-pause:latest",
            POD,
        ],
    )
    .expect_code(1);
    let log = rx.log();
    assert!(log.contains("creating pod pp failed"), "{log}");
    let (code, _) = rx.wait(T);
    assert_eq!(code, Some(1), "receiver exit; log:\n{log}");
    // Back here, in the source's pod, with its memory.
    assert_eq!(pod_containers("a"), MEMBERS, "{}", out.describe());
    let (_, c1) = front("a");
    assert!(c1 >= before, "counter on a went back: {c1} < {before}");
    // Nothing of ours on b, and the other pod is still there.
    assert!(pod_containers("b").is_empty(), "{:?}", pod_containers("b"));
    let theirs = on(
        "b",
        &["podman", "pod", "inspect", "--format", "{{.Labels}}", POD],
    )
    .ok();
    assert!(
        theirs.stdout.contains("owner:someone-else"),
        "{}",
        theirs.describe()
    );
    lab(&["pod", "down", "b"]).ok();
    lab(&["pod", "down", "a"]).ok();
}

#[test]
fn a_pod_whose_sender_dies_after_ok_ends_on_the_target_only_pod_and_all() {
    require_lab!();
    fresh_pod();
    let rx = Receiver::start("b", &[]);
    let (_, before) = front("a");
    let mut sender = Sender::start("a", &["--to", &to("b"), POD]);
    // "OK" is out: the target restores; the sender's watchdog finishes the commit.
    sender.wait_for("OK sent; target restoring", T);
    sender.kill9();
    let (code, out) = rx.wait(T);
    assert_eq!(code, Some(0), "the receiver did not restore:\n{out}");
    // The watchdog asks the target, finds the pod's members there and retires the pod
    // here, its infra (which holds the published port) included.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while on("a", &["podman", "pod", "exists", POD]).code == Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "pod {POD} still on a: {:?}",
            pod_containers("a")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(pod_containers("a").is_empty(), "{:?}", pod_containers("a"));
    assert_eq!(pod_containers("b"), MEMBERS);
    let (_, after) = front("b");
    assert!(
        after >= before,
        "counter went back on b: {after} < {before}"
    );
    lab(&["pod", "down", "b"]).ok();
}

/// `scripts/lab dbpod ticks HOST`: (rows, largest value) of pd.ticks.
fn ticks(host: &str) -> (u64, u64) {
    let out = lab(&["dbpod", "ticks", host]).ok();
    let v: Vec<u64> = out
        .stdout
        .split_whitespace()
        .map(|w| w.parse().unwrap_or_else(|_| panic!("{}", out.describe())))
        .collect();
    assert_eq!(v.len(), 2, "{}", out.describe());
    (v[0], v[1])
}

/// Moves pod pd (a mariadb and the writer that inserts 1, 2, 3 … into it over the pod's
/// localhost) and checks that both carried on: no row lost (the table holds 1..N), the
/// writer went on from its number in memory (a restarted writer would collide on 1 and
/// stop adding rows), the database kept what it had.
fn move_db_pod(from: &str, dest: &str) {
    let rx = Receiver::start(dest, &[]);
    let (_, before) = ticks(from);
    let out = send(from, &["--to", &to(dest), "--data", "/srv/pd-db", "pd"]).ok();
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    let (code, rx_out) = rx.wait(T);
    assert_eq!(code, Some(0), "receiver exit; stdout:\n{rx_out}");
    on(from, &["podman", "pod", "exists", "pd"]).expect_code(1);
    let (n1, max1) = ticks(dest);
    assert!(
        max1 >= before,
        "rows on {dest} went back: {max1} < {before}"
    );
    assert_eq!(
        n1, max1,
        "rows missing on {dest}: {n1} rows, largest {max1}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (n2, max2) = ticks(dest);
    assert!(
        max2 > max1,
        "the writer stopped on {dest}: {max1} then {max2}"
    );
    assert_eq!(
        n2, max2,
        "rows missing on {dest}: {n2} rows, largest {max2}"
    );
}

/// Issue 19: a pod of two containers, one a database, moved a → b → a with its state:
/// the database's rows (its data moved with --data, its buffers with its memory) and
/// the writer's count in memory.
#[test]
fn a_pod_with_a_database_moves_a_to_b_and_back_with_state() {
    require_lab!();
    assert_lab();
    kill_receivers();
    for h in ["a", "b"] {
        lab(&["dbpod", "down", h]).ok();
        lab(&["pod", "image", h]).ok();
    }
    lab(&["dbpod", "up", "a"]).ok();
    std::thread::sleep(Duration::from_secs(2));
    move_db_pod("a", "b");
    move_db_pod("b", "a");
    for h in ["a", "b"] {
        lab(&["dbpod", "down", h]).ok();
    }
}
