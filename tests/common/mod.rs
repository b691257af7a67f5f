//! Helpers for end-to-end tests on the local lab (scripts/lab): real podman, runc, CRIU,
//! rsync and OpenSSH on network-namespace hosts. Every command's status, stdout and stderr
//! are printed when an expectation fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once, OnceLock, mpsc};
use std::time::{Duration, Instant};

pub const A: &str = "10.77.0.11";
pub const B: &str = "10.77.0.12";
pub const C: &str = "10.77.0.13";

/// Debian 13 hosts (podman 5.4, a root filesystem of their own; docs/design/debian13-host.md).
pub const LAB_T: &str = "10.77.0.16";
pub const LAB_U: &str = "10.77.0.17";

pub fn host_addr(h: &str) -> &'static str {
    match h {
        "a" => A,
        "b" => B,
        "c" => C,
        "d" => "10.77.0.14",
        "e" => "10.77.0.15",
        "t" => LAB_T,
        "u" => LAB_U,
        _ => panic!("unknown lab host {h}"),
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> String {
    env!("CARGO_BIN_EXE_migrate").to_string()
}

/// A finished command.
#[derive(Debug)]
pub struct Out {
    pub cmd: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nexit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        )
    }
    /// Panics (with everything) unless the command exited 0.
    pub fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "{}", self.describe());
        self
    }
    pub fn expect_code(self, code: i32) -> Out {
        assert_eq!(self.code, Some(code), "{}", self.describe());
        self
    }
    /// The record the command printed (CSV with header), as column → value.
    pub fn record(&self) -> std::collections::HashMap<String, String> {
        let mut rdr = csv::Reader::from_reader(self.stdout.as_bytes());
        let headers = rdr.headers().expect("csv header").clone();
        let row = rdr
            .records()
            .next()
            .unwrap_or_else(|| panic!("no record\n{}", self.describe()))
            .expect("csv row");
        headers
            .iter()
            .zip(row.iter())
            .map(|(h, v)| (h.to_string(), v.to_string()))
            .collect()
    }
}

pub fn run(program: &str, args: &[&str]) -> Out {
    let out = Command::new(program)
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Out {
        cmd: format!("{program} {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn lab(args: &[&str]) -> Out {
    run(repo().join("scripts/lab").to_str().unwrap(), args)
}

/// Runs a command on a lab host.
pub fn on(host: &str, cmd: &[&str]) -> Out {
    let mut a = vec!["exec", host];
    a.extend_from_slice(cmd);
    lab(&a)
}

/// Set by scripts/test: there a lab that cannot be used fails the lab tests instead of
/// skipping them, so a CI run never passes by skipping.
pub const REQUIRE_LAB_VAR: &str = "MIGRATE_REQUIRE_LAB";

/// Why this process cannot use the lab, or `None` when it can. Asked once per test binary
/// (`scripts/lab status` looks at every host).
pub fn lab_unavailable() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        if !rustix::process::geteuid().is_root() {
            return Some(
                "not root, and the lab's network namespaces and podman storage need root".into(),
            );
        }
        let st = lab(&["status"]);
        if st.code == Some(0) {
            return None;
        }
        // The hosts that are not fine, or scripts/lab's own complaint.
        let mut problems: Vec<&str> = st
            .stdout
            .lines()
            .filter(|l| l.starts_with("host ") && !l.ends_with(" healthy"))
            .chain(st.stderr.lines())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if problems.is_empty() {
            problems.push("no reason given");
        }
        Some(format!(
            "the lab is not up (`scripts/lab status` exited {}: {}; start it with `scripts/lab up`)",
            st.code.map_or("on a signal".to_string(), |c| c.to_string()),
            problems.join("; ")
        ))
    })
    .as_deref()
}

/// Lab tests this binary skipped, for the summary it prints as it exits.
static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The skipped lab tests and why, after the harness's own "test result" line (lines
/// printed while the tests run would land inside the harness's "test NAME ... ok").
extern "C" fn skipped_summary() {
    let mut names = SKIPPED.lock().map(|v| v.clone()).unwrap_or_default();
    names.sort();
    let mut text = format!(
        "{}: {} lab test(s) skipped, counted as passed above: {}. Run scripts/test as root to run them ({REQUIRE_LAB_VAR}=1 makes a lab that cannot be used fail them).\n",
        env!("CARGO_CRATE_NAME"),
        names.len(),
        lab_unavailable().unwrap_or("unknown")
    );
    for n in names {
        text.push_str(&format!("  skipped {n}\n"));
    }
    // After the results the harness may still hold in stdout's buffer.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
}

/// Whether the test named `test` may use the lab. When it may not, it fails the test if
/// [`REQUIRE_LAB_VAR`] is set, and otherwise returns false and lists the test as skipped
/// on stderr when the binary exits (past the harness's capture, so a plain `cargo test`
/// shows it). Called through [`require_lab!`].
pub fn lab_or_skip(test: &str) -> bool {
    let Some(why) = lab_unavailable() else {
        return true;
    };
    assert!(
        std::env::var_os(REQUIRE_LAB_VAR).is_none_or(|v| v.is_empty() || v == "0"),
        "{test}: {REQUIRE_LAB_VAR} is set and the lab cannot be used: {why}"
    );
    static SUMMARY: Once = Once::new();
    SUMMARY.call_once(|| {
        // SAFETY: registers a plain function to run once at exit; it only reads a mutex
        // and an initialised OnceLock and writes to stderr, and never unwinds.
        #[allow(unsafe_code)]
        let registered = unsafe { libc::atexit(skipped_summary) } == 0;
        assert!(registered, "atexit failed");
    });
    SKIPPED.lock().unwrap().push(test.to_string());
    false
}

/// The first line of every test that uses the lab: returns from the test (which then
/// counts as passed, and is listed as skipped on stderr) when the lab cannot be used
/// here, unless scripts/test runs it (see [`REQUIRE_LAB_VAR`]).
macro_rules! require_lab {
    () => {
        if !$crate::common::lab_or_skip({
            fn here() {}
            ::std::any::type_name_of_val(&here).trim_end_matches("::here")
        }) {
            return;
        }
    };
}
pub(crate) use require_lab;

/// Panics, with the reason, when the lab cannot be used: for helpers that assume a test
/// began with [`require_lab!`].
pub fn assert_lab() {
    if let Some(why) = lab_unavailable() {
        panic!("the lab cannot be used: {why}; start the test with require_lab!()");
    }
}

/// Both hosts empty, then the thesis pair on `host` with `rows` rows. Also stops any
/// receiver a previous test left behind.
pub fn fresh_workload(host: &str, rows: u32) {
    assert_lab();
    kill_receivers();
    fresh_workload_on(&["a", "b"], host, rows);
}

/// `hosts` empty of the thesis pair (and of run folders), then the pair on `host` with
/// `rows` rows. Leaves receivers alone: for suites with their own hosts and port.
pub fn fresh_workload_on(hosts: &[&str], host: &str, rows: u32) {
    assert_lab();
    for h in hosts {
        lab(&["workload", "down", h]).ok();
        on(h, &["sh", "-c", "rm -rf /var/lib/migrate/runs"]).ok();
    }
    lab(&["workload", "up", host, "--rows", &rows.to_string()]).ok();
}

pub fn rows(host: &str) -> u64 {
    let out = lab(&["workload", "rows", host]).ok();
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("rows: {}", out.describe()))
}

pub fn counter(host: &str) -> u64 {
    let out = lab(&["workload", "counter", host]).ok();
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter: {}", out.describe()))
}

/// The containers these tests move; other suites may run other containers on the lab.
const PAIR: [&str; 2] = ["db", "web"];

fn pair_names(listing: &str) -> Vec<String> {
    let mut v: Vec<String> = listing
        .lines()
        .filter(|n| PAIR.contains(n))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Which of the thesis pair run on a host.
pub fn running(host: &str) -> Vec<String> {
    pair_names(
        &on(host, &["podman", "ps", "--format", "{{.Names}}"])
            .ok()
            .stdout,
    )
}

/// Which of the thesis pair exist on a host (any state).
pub fn all_containers(host: &str) -> Vec<String> {
    pair_names(
        &on(host, &["podman", "ps", "-a", "--format", "{{.Names}}"])
            .ok()
            .stdout,
    )
}

/// Container id and start time: unchanged when nothing froze or restarted it.
pub fn identity(host: &str, name: &str) -> String {
    on(
        host,
        &[
            "podman",
            "inspect",
            "--format",
            "{{.Id}} {{.State.StartedAt}} {{.State.Checkpointed}}",
            name,
        ],
    )
    .ok()
    .stdout
    .trim()
    .to_string()
}

/// The thesis pair runs on `host` with its state: all rows, web answers, the counter
/// moved on from `before` and is still counting.
pub fn assert_pair_alive(host: &str, want_rows: u64, before: u64) {
    assert_eq!(running(host), vec!["db", "web"], "containers on {host}");
    assert_eq!(rows(host), want_rows, "rows on {host}");
    let c1 = counter(host);
    assert!(
        c1 >= before,
        "counter on {host} went back: {c1} < {before} (state lost)"
    );
    std::thread::sleep(Duration::from_millis(400));
    let c2 = counter(host);
    assert!(c2 > c1, "counter on {host} stopped: {c1} then {c2}");
    let page = lab(&["workload", "http", host]).ok();
    assert!(
        page.stdout.contains("migrate thesis workload"),
        "{}",
        page.describe()
    );
}

/// `migrate send` on `host`.
pub fn send(host: &str, args: &[&str]) -> Out {
    let b = bin();
    let mut cmd = vec![b.as_str(), "send"];
    cmd.extend_from_slice(args);
    on(host, &cmd)
}

/// A pre-freeze hook that writes 300 MB into the thesis pair's data folder after the
/// pre-sync, so the post-sync (while frozen, after the dumps) takes a while.
pub const SLOW_POSTSYNC_HOOK: &str =
    "pre-freeze=head -c 300000000 /dev/urandom > /srv/app/www/big.bin";

/// `migrate send` of the thesis pair from a to b with [`SLOW_POSTSYNC_HOOK`], stderr and
/// stdout piped; with `own_group` the sender leads a process group of its own, as a
/// shell job does.
pub fn start_slow_send(own_group: bool) -> Child {
    use std::os::unix::process::CommandExt;
    // SIGHUP as on a terminal, even when the test runs under nohup (which would make the
    // sender keep ignoring it, as it should there).
    let mut cmd = Command::new("env");
    cmd.arg("--default-signal=HUP")
        .arg(repo().join("scripts/lab"));
    cmd.args([
        "exec",
        "a",
        &bin(),
        "send",
        "--to",
        "root@10.77.0.12",
        "--data",
        "/srv/app",
        "--hook",
        SLOW_POSTSYNC_HOOK,
        "db",
        "web",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if own_group {
        cmd.process_group(0);
    }
    cmd.spawn().expect("start the sender")
}

/// A sender's stderr, line by line, each shown to `on_line` as it comes; returns them all.
pub fn follow(sender: &mut Child, mut on_line: impl FnMut(&str)) -> Vec<String> {
    let err = BufReader::new(sender.stderr.take().unwrap());
    let mut log = Vec::new();
    for line in err.lines().map_while(Result::ok) {
        eprintln!("[sender] {line}");
        on_line(&line);
        log.push(line);
    }
    log
}

/// Waits for a sender; returns its exit code and stdout.
pub fn finish(sender: &mut Child) -> (Option<i32>, String) {
    let status = sender.wait().unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut sender.stdout.take().unwrap(), &mut stdout).unwrap();
    (status.code(), stdout)
}

/// The thesis pair runs on `host` with its state (100 rows, a counter past `before`),
/// and nothing of it is left on `other`.
pub fn assert_pair_only_on(host: &str, other: &str, before: u64) {
    assert!(
        all_containers(other).is_empty(),
        "left on {other}: {:?}",
        all_containers(other)
    );
    assert_pair_alive(host, 100, before);
}

/// Rolled back: exit 1, the record says so, nothing on b, the pair runs on a with its
/// state.
pub fn assert_rolled_back(code: Option<i32>, stdout: &str, log: &[String], before: u64) {
    assert_eq!(code, Some(1), "{}\n{stdout}", log.join("\n"));
    assert!(stdout.contains(",rolled_back,"), "{stdout}");
    assert_pair_only_on("a", "b", before);
}

/// Stops receivers the tests of this suite started (on a or b, control port 12345).
pub fn kill_receivers() {
    let pattern = format!("{} receive --listen 10.77.0.1[12]:12345", bin());
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &pattern])
        .status();
    std::thread::sleep(Duration::from_millis(200));
}

/// A `migrate receive` running on a lab host, its stderr collected line by line.
pub struct Receiver {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Receiver {
    /// A receiver on the suite's usual control port, 12345.
    pub fn start(host: &str, args: &[&str]) -> Receiver {
        Receiver::start_on(host, 12345, args)
    }

    /// A receiver listening on HOST's address and `port`.
    pub fn start_on(host: &str, port: u16, args: &[&str]) -> Receiver {
        let b = bin();
        let listen = format!("{}:{port}", host_addr(host));
        let mut a = vec![
            "exec",
            host,
            b.as_str(),
            "receive",
            "--listen",
            listen.as_str(),
        ];
        a.extend_from_slice(args);
        let mut child = Command::new(repo().join("scripts/lab"))
            .args(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start receiver");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[receiver] {line}");
                l.lock().unwrap().push(line);
            }
        });
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        let r = Receiver {
            child,
            lines,
            stdout: Some(stdout),
        };
        r.wait_for_line("listening on", Duration::from_secs(10));
        r
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("receiver never said {needle:?}; its log:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the receiver to exit; returns its exit code and stdout.
    pub fn wait(mut self, timeout: Duration) -> (Option<i32>, String) {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let out = self.stdout.take().unwrap().join().unwrap();
                return (st.code(), out);
            }
            assert!(
                Instant::now() < end,
                "receiver did not exit; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` on a lab host now and `undo` there when dropped (a change to a host that
/// must not outlive the test, even a failing one).
pub struct OnHost {
    host: &'static str,
    undo: &'static str,
}

impl OnHost {
    pub fn apply(host: &'static str, cmd: &str, undo: &'static str) -> OnHost {
        on(host, &["sh", "-c", cmd]).ok();
        OnHost { host, undo }
    }
}

impl Drop for OnHost {
    fn drop(&mut self) {
        on(self.host, &["sh", "-c", self.undo]);
    }
}

/// A `migrate send` on a lab host whose stderr lines arrive on a channel, so a test can
/// act at a given moment of the run (and kill it there).
pub struct Sender {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub log: Vec<String>,
}

impl Sender {
    /// Starts `migrate send ARGS…` on `host`.
    pub fn start(host: &str, send_args: &[&str]) -> Sender {
        let b = bin();
        let mut args = vec!["exec", host, b.as_str(), "send"];
        args.extend_from_slice(send_args);
        let mut child = Command::new(repo().join("scripts/lab"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                eprintln!("[sender] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Sender {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("the sender never said {needle:?}:\n{}", self.log.join("\n"));
    }

    /// The run id from the sender's "run ID: journal …" line.
    pub fn run_id(&mut self) -> String {
        let l = self.wait_for(
            "journal /var/lib/migrate/source-runs/",
            Duration::from_secs(60),
        );
        let after = l.split("run ").nth(1).expect("run id");
        after.split(':').next().unwrap().to_string()
    }

    /// Waits (up to `timeout`) for the sender to end, reading the rest of its stderr;
    /// returns its exit code.
    pub fn wait_end(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        loop {
            while let Ok(l) = self.lines.try_recv() {
                self.log.push(l);
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                while let Ok(l) = self.lines.try_recv() {
                    self.log.push(l);
                }
                return st.code();
            }
            assert!(
                Instant::now() < end,
                "the sender did not end within {timeout:?}:\n{}",
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: the sender gets no chance to do anything.
    pub fn kill9(&mut self) -> Instant {
        // `lab exec` execs the sender: this pid is migrate's own.
        run("kill", &["-KILL", &self.child.id().to_string()]).ok();
        let at = Instant::now();
        let st = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(9),
            "{st:?}"
        );
        at
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `migrate check --format json` on a towards b; the exit status is left to the caller.
pub fn check(args: &[&str]) -> Out {
    check_from("a", "b", args)
}

/// `migrate check --format json` on `from` towards root@`dest`.
pub fn check_from(from: &str, dest: &str, args: &[&str]) -> Out {
    let b = bin();
    let target = format!("root@{}", host_addr(dest));
    let mut cmd = vec![b.as_str(), "check", "--format", "json", "--to", &target];
    cmd.extend_from_slice(args);
    on(from, &cmd)
}

/// The one JSON document `check --format json` printed: stdout holds it alone, on one
/// line, and its verdict agrees with the exit status.
pub fn report(out: &Out) -> serde_json::Value {
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout is not one line:\n{}",
        out.describe()
    );
    let v: serde_json::Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", out.describe()));
    let verdict = match out.code {
        Some(0) => "ready",
        _ => "refused",
    };
    assert_eq!(v["verdict"], verdict, "{}", out.describe());
    assert_eq!(v["format_version"], 1, "{}", out.describe());
    v
}

/// Makes CRIU on a host fail whenever it is asked to work (swrk: what runc uses for
/// checkpoint and restore), while `criu check` still passes: a CRIU that fails only when
/// it matters.
pub struct BrokenCriu;

impl BrokenCriu {
    pub fn install(host: &'static str) -> OnHost {
        Self::install_with(host, "")
    }

    /// The same, running `first` (a shell command) just before each injected failure.
    pub fn install_with(host: &'static str, first: &str) -> OnHost {
        let script = format!(
            "cp /usr/local/sbin/criu /tmp/criu.real && cat > /tmp/criu.fake <<'FAKE'
#!/bin/sh
if [ \"$1\" = swrk ]; then {first}
  echo 'injected CRIU failure' >&2; exit 1
fi
exec /tmp/criu.real \"$@\"
FAKE
chmod +x /tmp/criu.fake && mount --bind /tmp/criu.fake /usr/local/sbin/criu"
        );
        OnHost::apply(host, &script, "umount /usr/local/sbin/criu")
    }
}

/// The count pod pp's front answers on `host` (`scripts/lab pod http`).
pub fn pod_count(host: &str) -> u64 {
    let out = lab(&["pod", "http", host]).ok();
    out.stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("counter="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("pod counter: {}", out.describe()))
}
