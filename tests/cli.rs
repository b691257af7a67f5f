//! Mistakes in the arguments are refused before anything runs: exit status 2 (refused),
//! nothing on stdout (it holds only records), and one line on stderr that names the
//! problem and what to do. These run the real binary as any user, without the lab; the
//! only network they touch is the loopback.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `Exit::Refused`: bad input, nothing changed.
const REFUSED: i32 = 2;

/// A place for one case: the working folder of the command, and the folders and files
/// the case names.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::create_dir(dir.path().join("data/inner")).unwrap();
        std::fs::write(dir.path().join("file"), "x").unwrap();
        Scene { dir }
    }

    /// A path inside the scene, as text.
    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_str().unwrap().to_string()
    }

    /// The work folder every command is pointed to (MIGRATE_WORKDIR): a refusal must not
    /// create it.
    fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Runs migrate with `args` here, with nothing on stdin and no MIGRATE_* setting but
    /// the work folder.
    fn run(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_migrate"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MIGRATE_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .args(args)
            .env("MIGRATE_WORKDIR", self.workdir())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run migrate");
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `args` are refused: status 2, stdout empty, one line on stderr that starts with
    /// `migrate SUB: error:` and contains every one of `wants`; nothing was created.
    fn refused(&self, args: &[&str], wants: &[&str]) {
        let run = self.run(args);
        let shown = run.describe();
        assert_eq!(run.code, Some(REFUSED), "exit status\n{shown}");
        assert!(run.stdout.is_empty(), "stdout holds only records\n{shown}");
        assert_eq!(run.stderr.lines().count(), 1, "one line\n{shown}");
        let prefix = format!("migrate {}: error: ", args[0]);
        assert!(run.stderr.starts_with(&prefix), "{prefix:?}\n{shown}");
        for want in wants {
            assert!(run.stderr.contains(want), "lacks {want:?}\n{shown}");
        }
        assert!(
            !self.workdir().exists(),
            "a refusal created the work folder\n{shown}"
        );
    }
}

/// A finished run of migrate.
struct Run {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "command: migrate {}\nexit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

/// A target nobody listens on: were a refusal to let a send through, its SSH connection
/// would fail at once, on the loopback.
const TO: &str = "root@127.0.0.1";
const NO_SSH: [&str; 2] = ["--ssh-port", "9"];

/// `send --to TO --ssh-port 9` followed by `rest`.
fn send<'a>(rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["send", "--to", TO, NO_SSH[0], NO_SSH[1]];
    v.extend_from_slice(rest);
    v
}

#[test]
fn send_without_a_target_or_containers_is_refused() {
    let s = Scene::new();
    s.refused(
        &["send", "db"],
        &["--to", "not provided", "migrate send --help"],
    );
    s.refused(
        &["send", "--to", TO],
        &["<CONTAINER>", "not provided", "migrate send --help"],
    );
}

#[test]
fn send_with_a_target_that_is_not_a_host_is_refused() {
    let s = Scene::new();
    s.refused(
        &["send", "--to", "127.0.0.1:22", "db"],
        &["--to \"127.0.0.1:22\"", "put the SSH port in --ssh-port"],
    );
    // An option smuggled to ssh as the host name.
    s.refused(
        &["send", "--to=-oProxyCommand=true", "db"],
        &["not a host name or address", "--to [USER@]HOST"],
    );
    s.refused(
        &["send", "--to", "@127.0.0.1", "db"],
        &["user name is empty", "--to USER@HOST"],
    );
    s.refused(
        &["send", "--to", TO, "--ssh-port", "0", "db"],
        &["--ssh-port 0", "give the target's SSH port"],
    );
    s.refused(
        &["send", "--to", TO, "--to", "root@127.0.0.2", "db"],
        &["--to", "cannot be used multiple times"],
    );
}

#[test]
fn send_with_a_bad_data_folder_is_refused() {
    let s = Scene::new();
    let data = s.path("data");
    let inner = s.path("data/inner");
    let missing = s.path("missing");
    let file = s.path("file");
    let dotdot = s.path("data/../data");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("data", vec!["--data data", "must be an absolute path"]),
        ("/", vec!["--data /", "name the application's data folder"]),
        (
            "/etc",
            vec![
                "--data /etc",
                "system folder",
                "name the application's own folder",
            ],
        ),
        (
            &missing,
            vec![&missing, "no such folder", "existing data folder"],
        ),
        (&file, vec![&file, "not a directory", "name the folder"]),
        (&dotdot, vec![&dotdot, "must not contain `..`"]),
    ];
    for (d, wants) in cases {
        s.refused(&send(&["--data", d, "db"]), &wants);
    }
    s.refused(
        &send(&["--data", &data, "--data", &inner, "db"]),
        &["overlap", "name each folder once"],
    );
    // The sender's own work folder is not data.
    s.refused(
        &send(&["--workdir", &data, "--data", &inner, "db"]),
        &[
            "overlaps migrate's work folder",
            "name the application's own folder",
        ],
    );
}

#[test]
fn send_with_relative_or_odd_work_folders_is_refused() {
    let s = Scene::new();
    s.refused(
        &send(&["--workdir", "work", "db"]),
        &["--workdir work", "absolute path"],
    );
    s.refused(
        &send(&["--target-workdir", "runs", "db"]),
        &["--target-workdir runs", "absolute path"],
    );
    s.refused(
        &send(&["--target-workdir", "/var/lib/migrate/../x", "db"]),
        &["--target-workdir", "without `..`"],
    );
}

#[test]
fn send_with_bad_flag_values_is_refused() {
    let s = Scene::new();
    let missing_key = s.path("no-key");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            send(&["--tcp", "bogus", "db"]),
            vec![
                "'bogus'",
                "--tcp",
                "possible values: close, established, refuse",
            ],
        ),
        (
            send(&["--tcp", "close", "--tcp-established", "db"]),
            vec!["--tcp", "--tcp-established", "cannot be used with"],
        ),
        (
            send(&["--compress", "lz4", "db"]),
            vec!["'lz4'", "--compress", "possible values"],
        ),
        (send(&["--format", "xml", "db"]), vec!["'xml'", "--format"]),
        (
            send(&["--control-port", "0", "db"]),
            vec!["--control-port 0", "migrate receive --listen"],
        ),
        (
            send(&["--control-port", "70000", "db"]),
            vec!["'70000'", "--control-port", "0..=65535"],
        ),
        (
            send(&["--identity", &missing_key, "db"]),
            vec![&missing_key, "no such file", "SSH private key"],
        ),
        (
            send(&["--hook", "echo hi", "db"]),
            vec!["--hook", "WHEN=COMMAND", "pre-freeze, post-up or rollback"],
        ),
        (
            send(&["--target-hook", "later=echo hi", "db"]),
            vec![
                "--target-hook",
                "\"later\"",
                "pre-freeze, post-up or rollback",
            ],
        ),
        (
            send(&["--hook-timeout", "0", "db"]),
            vec!["--hook-timeout 0", "seconds a hook may run"],
        ),
        (
            send(&["--bogus", "db"]),
            vec!["'--bogus'", "migrate send --help"],
        ),
    ];
    for (args, wants) in cases {
        s.refused(&args, &wants);
    }
}

#[test]
fn send_with_bad_container_names_is_refused() {
    let s = Scene::new();
    s.refused(
        &send(&["db/../x"]),
        &["\"db/../x\"", "not a valid container name", "podman ps"],
    );
    s.refused(
        &send(&["db", "web", "db"]),
        &["\"db\" is named twice", "name each container once"],
    );
}

#[test]
fn check_refuses_what_send_refuses() {
    let s = Scene::new();
    s.refused(&["check", "db"], &["--to", "not provided"]);
    s.refused(
        &["check", "--to", TO, "--data", "rel", "db"],
        &["--data rel", "absolute path"],
    );
    s.refused(
        &["check", "--to", TO, "--tcp", "sometimes", "db"],
        &["'sometimes'", "--tcp"],
    );
    s.refused(
        &["check", "--to", TO, "db", "db"],
        &["named twice", "name each container once"],
    );
}

#[test]
fn receive_with_a_bad_address_or_work_folder_is_refused() {
    let s = Scene::new();
    s.refused(
        &["receive", "--listen", "localhost"],
        &["'localhost'", "--listen <ADDR:PORT>"],
    );
    s.refused(
        &["receive", "--workdir", "rx"],
        &["'rx'", "--workdir", "absolute path"],
    );
    s.refused(
        &["receive", "--idle-timeout", "soon"],
        &["'soon'", "--idle-timeout"],
    );
    // A work folder that cannot be made (a file is in the way). --idle-timeout keeps a
    // receiver that wrongly starts from waiting long.
    let under_file = s.path("file/rx");
    s.refused(
        &[
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--idle-timeout",
            "1",
            "--workdir",
            &under_file,
        ],
        &["cannot create work folder", "pass a writable --workdir"],
    );
}

#[test]
fn receive_refuses_a_work_folder_others_could_write_to() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scene::new();
    let rx = s.dir.path().join("rx");
    std::fs::create_dir_all(rx.join("runs")).unwrap();
    std::fs::set_permissions(rx.join("runs"), std::fs::Permissions::from_mode(0o777)).unwrap();
    s.refused(
        &[
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--idle-timeout",
            "1",
            "--workdir",
            rx.to_str().unwrap(),
        ],
        &["not private", "chmod 700"],
    );
}

#[test]
fn receive_refuses_a_port_another_program_holds() {
    let s = Scene::new();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the loopback");
    let taken = holder.local_addr().unwrap().to_string();
    let rx = s.path("rx");
    s.refused(
        &[
            "receive",
            "--listen",
            &taken,
            "--idle-timeout",
            "1",
            "--workdir",
            &rx,
        ],
        &[
            &format!("cannot listen on {taken}"),
            "pick another --listen",
        ],
    );
}

#[test]
fn probe_without_an_end_or_with_a_bad_target_is_refused() {
    let s = Scene::new();
    s.refused(
        &["probe", "tcp://127.0.0.1:9"],
        &["give --count N or --duration TIME"],
    );
    s.refused(
        &["probe", "--count", "1", "ftp://127.0.0.1"],
        &[
            "\"ftp://127.0.0.1\"",
            "use http://HOST[:PORT][/PATH] or tcp://HOST:PORT",
        ],
    );
    s.refused(
        &[
            "probe",
            "--count",
            "1",
            "--interval",
            "5x",
            "tcp://127.0.0.1:9",
        ],
        &["'5x'", "--interval", "use ms, s, m or h"],
    );
    s.refused(&["probe", "--count", "1"], &["<TARGET>", "not provided"]);
}

#[test]
fn recover_with_an_unreadable_work_folder_is_refused() {
    let s = Scene::new();
    let file = s.path("file");
    s.refused(
        &["recover", "--workdir", &file],
        &["cannot read the run journals", "--workdir `send` used"],
    );
    s.refused(
        &["recover", "--format", "yaml"],
        &["'yaml'", "possible values: csv, json"],
    );
}

#[test]
fn an_unknown_command_is_refused_and_help_still_goes_to_stdout() {
    let s = Scene::new();
    let run = s.run(&["frobnicate"]);
    assert_eq!(run.code, Some(REFUSED), "{}", run.describe());
    assert!(run.stdout.is_empty(), "{}", run.describe());
    assert_eq!(
        run.stderr.trim_end(),
        "migrate: error: unrecognized subcommand 'frobnicate'; see `migrate --help`",
        "{}",
        run.describe()
    );
    // Asked-for help is a result: stdout, status 0.
    let run = s.run(&["send", "--help"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(
        run.stdout.contains("Usage: migrate send"),
        "{}",
        run.describe()
    );
    let run = s.run(&["--version"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(run.stdout.starts_with("migrate "), "{}", run.describe());
    assert!(!s.workdir().exists());
}
