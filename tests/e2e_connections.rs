//! Busy services move with default flags (issue 15): the `ledger` workload
//! (testdata/workloads/ledger, `scripts/lab ledger`) is a server that acknowledges each
//! write only after its fsync, in /srv/ledger (moved with `--data`), behind published port
//! 8084. Its client runs on host c with two endpoints (a and b) and fails over between
//! them at once on any error. With a client opening a new connection per write (≥ 50 a
//! second) and with one holding a single connection (a write every 10 ms), `migrate send`
//! a → b exits 0, every acknowledged write is on b's disk, and the client's longest wait
//! between two acknowledgements is at most the record's downtime plus 1 s. Also: `--tcp
//! refuse` refuses an established connection before the freeze; and a hand-run `podman
//! container checkpoint` on the source behaves after a migration as before it.
//!
//! Run: `cargo nextest run -E 'test(connections)'` (needs `scripts/lab up`). Uses the
//! containers `ledger` and `conncheck` and port 8084 only: nothing the other suites use.
mod common;

use std::collections::HashSet;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// How long the client runs in the moves under load: steady traffic before the send
/// (`LEAD`), the migration (a few seconds on the lab), and traffic to b afterwards.
const CLIENT_S: u32 = 16;
const LEAD: Duration = Duration::from_secs(3);
/// Receiver control port of these tests (other suites use 12345 and 12350).
const CONTROL_PORT: u16 = 12351;

/// `migrate send` of `ledger` a → b with a receiver on b; `extra` before the name.
fn send_ledger(extra: &[&str]) -> Out {
    send_ledger_watched(extra).0
}

/// [`send_ledger`], also returning the receiver (its log, its exit).
fn send_ledger_watched(extra: &[&str]) -> (Out, Receiver) {
    let pattern = format!("{} receive --listen 10.77.0.1[0-9]:{CONTROL_PORT}", bin());
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &pattern])
        .status();
    let rx = Receiver::start_on("b", CONTROL_PORT, &[]);
    let to = format!("root@{B}");
    let port = CONTROL_PORT.to_string();
    let mut args = vec![
        "--to",
        to.as_str(),
        "--control-port",
        port.as_str(),
        "--data",
        "/srv/ledger",
    ];
    args.extend_from_slice(extra);
    args.push("ledger");
    (send("a", &args), rx)
}

/// Removes the test's containers and data on a and b, before and after (even on failure).
struct Clean;

impl Clean {
    fn new() -> Clean {
        assert_lab();
        Clean.wipe();
        Clean
    }
    fn wipe(&self) {
        for h in ["a", "b"] {
            lab(&["ledger", "down", h]);
            on(
                h,
                &["podman", "rm", "-f", "-t", "0", "--ignore", "conncheck"],
            );
        }
    }
}

impl Drop for Clean {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// The client's summary (client.py's JSON).
struct Summary {
    raw: String,
    v: serde_json::Value,
}

impl Summary {
    fn f(&self, k: &str) -> f64 {
        self.v[k]
            .as_f64()
            .unwrap_or_else(|| panic!("no number {k} in the client's summary: {}", self.raw))
    }
    fn on_host(&self, addr: &str) -> u64 {
        self.v["acked_by_host"][addr].as_u64().unwrap()
    }
    /// Acknowledged write IDs, as the server logs them.
    fn acked_ids(&self) -> Vec<String> {
        let tag = self.v["tag"].as_str().unwrap();
        self.v["acked_seqs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{tag}-{}", s.as_u64().unwrap()))
            .collect()
    }
    /// Short form for messages (without the list of numbers).
    fn brief(&self) -> String {
        let mut v = self.v.clone();
        v.as_object_mut().unwrap().remove("acked_seqs");
        v.to_string()
    }
}

/// Starts the ledger client on c (endpoints a, then b).
fn start_client(mode: &str, seconds: u32) -> Child {
    start_client_with(mode, seconds, &[])
}

/// [`start_client`] with more of the client's options.
fn start_client_with(mode: &str, seconds: u32, extra: &[&str]) -> Child {
    Command::new(repo().join("scripts/lab"))
        .args([
            "ledger",
            "client",
            mode,
            "--from",
            "a",
            "--to",
            "b",
            "--seconds",
            &seconds.to_string(),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the ledger client")
}

fn finish_client(mut child: Child) -> Summary {
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "ledger client: {st}\n--- stdout\n{out}\n--- stderr\n{err}"
    );
    let v = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("client summary is not JSON ({e}): {out}\n{err}"));
    Summary { raw: out, v }
}

/// The write IDs on a host's disk.
fn logged(host: &str) -> HashSet<String> {
    lab(&["ledger", "log", host])
        .ok()
        .stdout
        .lines()
        .map(str::to_string)
        .collect()
}

/// Moves the ledger a → b under a client in `mode`, then checks what the issue asks.
fn move_under_load(mode: &str) -> Summary {
    let _clean = Clean::new();
    lab(&["ledger", "up", "a"]).ok();
    let client = start_client(mode, CLIENT_S);
    std::thread::sleep(LEAD);
    let out = send_ledger(&[]);
    let s = finish_client(client);
    let out = out.ok();
    let rec = out.record();
    assert_eq!(rec["outcome"], "ok", "{}", out.describe());
    let downtime: f64 = rec["downtime_s"].parse().unwrap();

    // The client wrote to a before and to b after, at the rate asked.
    let (on_a, on_b) = (s.on_host(A), s.on_host(B));
    assert!(
        on_a >= 50 && on_b >= 50,
        "acknowledged on a: {on_a}, on b: {on_b}: {}",
        s.brief()
    );
    // None lost: every acknowledged write is on the target's disk.
    let disk = logged("b");
    let acked = s.acked_ids();
    let lost: Vec<&String> = acked.iter().filter(|id| !disk.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are not in b's /srv/ledger/ledger.log, e.g. {:?}\n{}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)],
        s.brief()
    );
    let gap = s.f("max_gap_s");
    eprintln!(
        "{mode}: {} acknowledged ({on_a} on a, {on_b} on b), 0 lost, {} connections ({}/s), longest gap {gap:.3} s, downtime {downtime:.3} s; errors {}",
        acked.len(),
        s.v["connections"],
        s.v["connections_per_s"],
        s.v["errors"]
    );
    assert!(
        gap <= downtime + 1.0,
        "longest gap between acknowledged writes {gap:.3} s > downtime {downtime:.3} s + 1 s\nclient: {}\n{}",
        s.brief(),
        out.describe()
    );
    s
}

#[test]
fn connections_a_new_connection_per_write_moves_without_loss() {
    require_lab!();
    let s = move_under_load("per-request");
    let rate = s.f("connections_per_s");
    assert!(rate >= 50.0, "{rate} connections a second: {}", s.brief());
}

#[test]
fn connections_one_long_lived_connection_moves_without_loss() {
    require_lab!();
    let s = move_under_load("stream");
    // One connection to a, then reconnected to b: a handful, not one per write.
    let conns = s.f("connections");
    assert!(
        (2.0..=20.0).contains(&conns),
        "{conns} connections: {}",
        s.brief()
    );
}

#[test]
fn connections_tcp_refuse_fails_before_the_freeze() {
    require_lab!();
    let _clean = Clean::new();
    lab(&["ledger", "up", "a"]).ok();
    let before = identity("a", "ledger");
    // A patient client: on this loaded machine an fsync may take over the usual 0.5 s,
    // and a client that gave up then would reconnect for reasons of its own.
    let client = start_client_with("stream", 8, &["--timeout", "5"]);
    std::thread::sleep(LEAD);
    let out = send_ledger(&["--tcp", "refuse"]).expect_code(2);
    // Refused before the freeze: nothing was ever frozen.
    assert!(!out.stderr.contains("DOWN"), "{}", out.describe());
    assert!(
        out.stderr.contains("established") && out.stderr.contains("--tcp close"),
        "{}",
        out.describe()
    );
    let s = finish_client(client);
    // Untouched: the same container, never frozen (no DOWN above), its one connection kept
    // throughout. (How long the client once waited is no proof either way: a loaded
    // disk's fsync stalled it 1.2 s in a run that never froze anything.)
    assert_eq!(identity("a", "ledger"), before, "{}", out.describe());
    let on_b = on("b", &["podman", "container", "exists", "ledger"]);
    assert_eq!(on_b.code, Some(1), "{}", on_b.describe());
    assert_eq!(s.f("connections"), 1.0, "{}", s.brief());
    assert_eq!(s.on_host(B), 0, "{}", s.brief());
}

/// `podman container checkpoint` by hand on a of a fresh busybox container holding an
/// established connection (its own, over loopback): exit code, CRIU's refusal in
/// dump.log, and whether /etc/criu/runc.conf exists.
fn hand_checkpoint() -> (Option<i32>, bool, bool) {
    on(
        "a",
        &[
            "podman",
            "run",
            "-d",
            "--name",
            "conncheck",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=4096:4096",
            "localhost/migrate-busybox:latest",
            "sh",
            "-c",
            // Both ends keep their input open: busybox nc closes its side at EOF.
            "sleep 3600 | nc -l -p 9000 >/dev/null & sleep 0.3; sleep 3600 | nc 127.0.0.1 9000 >/dev/null",
        ],
    )
    .ok();
    // Wait until the connection is established (state 01 in /proc/net/tcp or tcp6: nc
    // listens on ::).
    let mut established = false;
    for _ in 0..50 {
        let t = on(
            "a",
            &[
                "podman",
                "exec",
                "conncheck",
                "cat",
                "/proc/net/tcp",
                "/proc/net/tcp6",
            ],
        )
        .ok();
        if t.stdout
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some("01"))
        {
            established = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(established, "conncheck never had an established connection");
    let cp = on("a", &["podman", "container", "checkpoint", "conncheck"]);
    let id = on(
        "a",
        &["podman", "inspect", "--format", "{{.Id}}", "conncheck"],
    )
    .ok()
    .stdout
    .trim()
    .to_string();
    let log = on(
        "a",
        &[
            "sh",
            "-c",
            &format!("cat /var/lib/containers/storage/overlay-containers/{id}/userdata/dump.log"),
        ],
    );
    eprintln!("hand checkpoint: {}", cp.describe());
    let refused = log
        .stdout
        .contains("Connected TCP socket, consider using --tcp-established");
    let conf = on("a", &["test", "-e", "/etc/criu/runc.conf"]).code == Some(0);
    on("a", &["podman", "rm", "-f", "-t", "0", "conncheck"]).ok();
    (cp.code, refused, conf)
}

#[test]
fn connections_hand_checkpoint_after_a_migration_behaves_as_before() {
    require_lab!();
    let _clean = Clean::new();
    let before = hand_checkpoint();
    assert!(
        before.0 != Some(0) && before.1 && !before.2,
        "before any migration: exit {:?}, CRIU refused the connection: {}, /etc/criu/runc.conf: {}",
        before.0,
        before.1,
        before.2
    );
    lab(&["ledger", "up", "a"]).ok();
    // A long-lived client, so the migration dumps (and closes) a connection.
    let client = start_client("stream", 8);
    std::thread::sleep(LEAD);
    let out = send_ledger(&[]).ok();
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    finish_client(client);
    let after = hand_checkpoint();
    assert_eq!(after, before, "hand checkpoint before vs after a migration");
}

/// The ledger's own address in the moving-address tests (macvlan network mlab-mv).
const OWN_ADDRESS: &str = "10.77.0.201";

/// Removes the macvlan network (and the ledger on it) from a and b, before and after.
struct CleanAddress(Clean);

impl CleanAddress {
    fn new() -> CleanAddress {
        let c = CleanAddress(Clean::new());
        c.wipe();
        c
    }
    fn wipe(&self) {
        for h in ["a", "b"] {
            lab(&["macvlan", "down", h]);
        }
    }
}

/// The macvlan network on a and b, and the ledger on a with its own address there.
fn own_address_ledger_on_a() -> CleanAddress {
    let clean = CleanAddress::new();
    lab(&["macvlan", "up", "a"]).ok();
    lab(&["macvlan", "up", "b"]).ok();
    lab(&["ledger", "up", "a", "--address", OWN_ADDRESS]).ok();
    clean
}

impl Drop for CleanAddress {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// Issue 19: a ledger with an address of its own on a macvlan network that a and b both
/// have moves a → b with `--tcp established` while the client on c holds ONE connection
/// to that address: the connection carries on (no reconnect, no error, writes
/// acknowledged in order before and after the freeze on it), every acknowledged write is
/// on b's disk, the target's guard is gone afterwards and the address was announced.
#[test]
fn connections_an_own_address_moves_and_the_open_connection_carries_on() {
    require_lab!();
    let _clean = own_address_ledger_on_a();
    // `check` says the address moves and the target is ready for it.
    let v = report(&check(&[
        "--install-receiver",
        "--tcp",
        "established",
        "--data",
        "/srv/ledger",
        "ledger",
    ]));
    let codes: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert!(
        codes.contains(&"address_moves") && codes.contains(&"address_network_ready"),
        "{v}"
    );

    let (client, out, rx) = send_under_own_address_client();
    let s = finish_client(client);
    let out = out.ok();
    let rec = out.record();
    assert_eq!(rec["outcome"], "ok", "{}", out.describe());
    rx.wait_for_line(&format!("announced {OWN_ADDRESS}"), Duration::from_secs(30));
    let rx_log = rx.log();
    let (code, _) = rx.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{rx_log}");
    let downtime: f64 = rec["downtime_s"].parse().unwrap();

    // One connection, never an error: the move was invisible to it but for the wait.
    assert_eq!(s.f("connections"), 1.0, "{}\n{rx_log}", s.brief());
    assert_eq!(s.v["errors"], serde_json::json!({}), "{}", s.brief());
    // Its longest wait is the freeze: acknowledged on that connection up to the freeze,
    // and again once the restored process runs (CRIU resumes it a little before podman's
    // restore returns, which is up_ts), in order (the client checks the order).
    let ts = |k: &str| {
        chrono::DateTime::parse_from_rfc3339(&rec[k])
            .unwrap()
            .timestamp_micros() as f64
            / 1e6
    };
    let (from, to_) = (s.f("max_gap_from"), s.f("max_gap_to"));
    assert!(
        from <= ts("down_ts") + 0.05 && to_ >= ts("down_ts") + 0.1,
        "the longest gap {from}..{to_} is not the freeze at {} (up {}): {}",
        rec["down_ts"],
        rec["up_ts"],
        s.brief()
    );
    let gap = s.f("max_gap_s");
    assert!(
        gap <= downtime + 2.0,
        "longest gap {gap:.3} s > downtime {downtime:.3} s + 2 s: {}",
        s.brief()
    );
    assert!(s.f("acked") >= 200.0, "{}", s.brief());
    let disk = logged("b");
    let acked = s.acked_ids();
    let lost = acked.iter().filter(|id| !disk.contains(*id)).count();
    assert_eq!(lost, 0, "acknowledged writes missing on b: {}", s.brief());
    eprintln!(
        "own address: {} acknowledged on one connection, 0 lost, longest gap {gap:.3} s, downtime {downtime:.3} s",
        acked.len()
    );
    assert_no_guard("b");
    let inspect = on(
        "b",
        &[
            "podman",
            "inspect",
            "ledger",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.MacAddress}}{{end}}",
        ],
    )
    .ok();
    assert_eq!(
        inspect.stdout.trim(),
        format!("{OWN_ADDRESS} 02:77:00:00:00:c9")
    );
}

/// Starts a client holding ONE connection to the ledger's own address on c, then (after
/// `LEAD`) `migrate send --tcp established` a → b with a receiver on b. The client's
/// connection waits out the move (as a real client does) rather than failing over: its
/// timeout is longer than any downtime seen here.
fn send_under_own_address_client() -> (Child, Out, Receiver) {
    let client = start_client_with(
        "stream",
        CLIENT_S,
        &[
            "--address",
            OWN_ADDRESS,
            "--interval-ms",
            "20",
            "--timeout",
            "8",
        ],
    );
    std::thread::sleep(LEAD);
    let (out, rx) = send_ledger_watched(&["--tcp", "established"]);
    (client, out, rx)
}

/// No nft table of a guard is left on `host`.
fn assert_no_guard(host: &str) {
    let tables = on(host, &["nft", "list", "tables"]).ok();
    assert!(
        !tables.stdout.contains("migrate_guard"),
        "{}",
        tables.describe()
    );
}

/// Issue 19: the same, with the restore failing on b (CRIU broken there): the ledger is
/// restored on a, its address guarded and announced there too, and the client's one
/// connection carries on through the rollback; every acknowledged write is on a's disk.
#[test]
fn connections_an_own_address_rolled_back_keeps_the_open_connection() {
    require_lab!();
    let _clean = own_address_ledger_on_a();
    let broken = BrokenCriu::install("b");
    let (client, out, rx) = send_under_own_address_client();
    let s = finish_client(client);
    let out = out.expect_code(1);
    drop(broken);
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    let _ = rx.wait(Duration::from_secs(60));
    assert!(
        out.stderr.contains(&format!("announced {OWN_ADDRESS}")),
        "{}",
        out.describe()
    );
    assert_eq!(s.f("connections"), 1.0, "{}\n{}", s.brief(), out.describe());
    assert_eq!(s.v["errors"], serde_json::json!({}), "{}", s.brief());
    assert!(s.f("acked") >= 200.0, "{}", s.brief());
    let disk = logged("a");
    let lost = s
        .acked_ids()
        .iter()
        .filter(|id| !disk.contains(*id))
        .count();
    assert_eq!(lost, 0, "acknowledged writes missing on a: {}", s.brief());
    assert_no_guard("a");
    assert_no_guard("b");
    let on_b = on("b", &["podman", "container", "exists", "ledger"]);
    assert_eq!(on_b.code, Some(1), "{}", on_b.describe());
    eprintln!(
        "own address, rolled back: {} acknowledged on one connection, 0 lost, longest gap {:.3} s",
        s.f("acked"),
        s.f("max_gap_s")
    );
}

/// Issue 19: without the network on the target, a container with its own address is
/// refused before anything is frozen, naming the network and how to create it.
#[test]
fn connections_an_own_address_without_its_network_on_the_target_is_refused() {
    require_lab!();
    let _clean = CleanAddress::new();
    lab(&["macvlan", "up", "a"]).ok();
    lab(&["ledger", "up", "a", "--address", OWN_ADDRESS]).ok();
    let before = identity("a", "ledger");
    let out = send_ledger(&["--tcp", "established"]).expect_code(2);
    let rec = out.record();
    assert!(
        rec["error"].contains("network mlab-mv") && rec["error"].contains("does not exist there"),
        "{}",
        out.describe()
    );
    assert_eq!(identity("a", "ledger"), before, "{}", out.describe());
    let on_b = on("b", &["podman", "container", "exists", "ledger"]);
    assert_eq!(on_b.code, Some(1), "{}", on_b.describe());
}
