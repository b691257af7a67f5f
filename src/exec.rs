//! Running local programs: every failure says what ran, how it ended and what it printed.

use std::fmt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

/// How many lines of a failed program's stderr go into an error message.
const STDERR_TAIL_LINES: usize = 12;

/// A program that did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program could not be started at all (missing binary, permissions).
    #[error("could not run `{cmd}`: {io}")]
    Spawn { cmd: String, io: std::io::Error },
    /// The program ran and failed.
    #[error("`{cmd}` {status}{}", stderr_suffix(.stderr))]
    Failed {
        cmd: String,
        status: StatusText,
        stderr: String,
    },
    /// The program ran past its deadline and was killed.
    #[error("`{cmd}` did not finish within {}s and was killed", .after.as_secs())]
    Timeout { cmd: String, after: Duration },
}

impl ExecError {
    /// The stderr the program printed, if it ran.
    pub fn stderr(&self) -> &str {
        match self {
            ExecError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// Exit status in words: "exited with status 3" or "was killed by signal 9".
#[derive(Debug, Clone)]
pub struct StatusText(pub String);

impl fmt::Display for StatusText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ExitStatus> for StatusText {
    fn from(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => StatusText(format!("exited with status {code}")),
            (None, Some(sig)) => StatusText(format!("was killed by signal {sig}")),
            _ => StatusText("ended abnormally".into()),
        }
    }
}

fn stderr_suffix(stderr: &str) -> String {
    let tail = tail_lines(stderr, STDERR_TAIL_LINES);
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

/// The last `n` non-empty lines of `text`, joined with " | " so an error stays on one line.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join(" | ")
}

/// Quotes one word for a POSIX shell (used for display and for remote command lines).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A command line as a user could paste it.
pub fn display_command(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_string())
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a finished program printed.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args…` to the end (or until `timeout`), capturing stdout and stderr.
/// A non-zero exit is an error carrying the command line, status and stderr.
pub async fn run(program: &str, args: &[String], timeout: Duration) -> Result<Output, ExecError> {
    spawn(program, args)?.finish(timeout).await
}

/// A program started by [`spawn`]; killed when dropped unfinished.
#[derive(Debug)]
pub struct Running {
    cmd: String,
    child: tokio::process::Child,
    /// stderr read early by [`Running::wait_for_stderr_line`], marker line removed.
    early_stderr: Vec<u8>,
}

/// Starts `program args…` with stdout and stderr captured; [`Running::finish`] waits.
/// The program leads a process group of its own: a Ctrl-C at the terminal (sent to
/// `migrate`'s group) does not reach it; `migrate` decides when it stops.
pub fn spawn(program: &str, args: &[String]) -> Result<Running, ExecError> {
    spawn_with(program, args, Stdio::null())
}

/// [`run`] with `input` on the program's stdin.
pub async fn run_with_input(
    program: &str,
    args: &[String],
    input: &[u8],
    timeout: Duration,
) -> Result<Output, ExecError> {
    use tokio::io::AsyncWriteExt;
    let mut running = spawn_with(program, args, Stdio::piped())?;
    if let Some(mut stdin) = running.child.stdin.take() {
        // A program that exits without reading says why in its status and stderr.
        let _ = stdin.write_all(input).await;
    }
    running.finish(timeout).await
}

fn spawn_with(program: &str, args: &[String], stdin: Stdio) -> Result<Running, ExecError> {
    let cmd = display_command(program, args);
    let child = Command::new(program)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ExecError::Spawn {
            cmd: cmd.clone(),
            io: source,
        })?;
    Ok(Running {
        cmd,
        child,
        early_stderr: Vec::new(),
    })
}

impl Running {
    /// The process ID, while the program runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The exit status when the program has ended, without waiting.
    pub fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the program prints the line `marker` on stderr. Whatever else it
    /// printed stays part of its stderr; the marker line does not. An error when the
    /// program closes stderr (ends) first, or when `timeout` passes.
    pub async fn wait_for_stderr_line(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> Result<(), ExecError> {
        let Some(err) = self.child.stderr.as_mut() else {
            return Err(ExecError::Spawn {
                cmd: self.cmd.clone(),
                io: std::io::Error::other("stderr is not captured"),
            });
        };
        let found = tokio::time::timeout(
            timeout,
            read_until_line(err, marker, &mut self.early_stderr, usize::MAX),
        )
        .await;
        match found {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => {
                // Ended before saying it: its status and stderr say why.
                let cmd = self.cmd.clone();
                let status = self.child.wait().await.map_err(|source| ExecError::Spawn {
                    cmd: cmd.clone(),
                    io: source,
                })?;
                Err(ExecError::Failed {
                    cmd,
                    status: status.into(),
                    stderr: String::from_utf8_lossy(&self.early_stderr).into_owned(),
                })
            }
            Ok(Err(source)) => Err(ExecError::Spawn {
                cmd: self.cmd.clone(),
                io: source,
            }),
            Err(_) => Err(ExecError::Timeout {
                cmd: format!("{} (starting)", self.cmd),
                after: timeout,
            }),
        }
    }

    /// Waits for the end (or `timeout`); a non-zero exit is an error carrying the
    /// command line, status and stderr.
    pub async fn finish(self, timeout: Duration) -> Result<Output, ExecError> {
        let Running {
            cmd,
            child,
            mut early_stderr,
        } = self;
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(res) => res.map_err(|source| ExecError::Spawn {
                cmd: cmd.clone(),
                io: source,
            })?,
            Err(_) => {
                return Err(ExecError::Timeout {
                    cmd,
                    after: timeout,
                });
            }
        };
        let output = Output {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: {
                early_stderr.extend_from_slice(&out.stderr);
                String::from_utf8_lossy(&early_stderr).into_owned()
            },
        };
        if out.status.success() {
            Ok(output)
        } else {
            Err(ExecError::Failed {
                cmd,
                status: out.status.into(),
                stderr: output.stderr,
            })
        }
    }
}

/// Reads `r` until the line `marker` has come. What came stays in `seen`, without the
/// marker line. False when `r` ends first, or when more than `limit` bytes came without
/// it (a remote rc file printing on and on).
pub async fn read_until_line<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    marker: &str,
    seen: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let line = format!("{marker}\n");
    let mut buf = [0u8; 4096];
    loop {
        if let Some(i) = seen.windows(line.len()).position(|w| w == line.as_bytes()) {
            seen.drain(i..i + line.len());
            return Ok(true);
        }
        if seen.len() > limit {
            return Ok(false);
        }
        match r.read(&mut buf).await? {
            0 => return Ok(false),
            n => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// Builds an argument vector from string slices.
pub fn args<I, S>(items: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    items.into_iter().map(Into::into).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_plain_words_and_escapes_the_rest() {
        assert_eq!(shell_quote("podman"), "podman");
        assert_eq!(shell_quote("/var/lib/migrate"), "/var/lib/migrate");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn tail_keeps_last_lines_on_one_line() {
        assert_eq!(tail_lines("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail_lines("", 3), "");
    }

    #[tokio::test]
    async fn a_marker_line_is_found_after_noise_and_removed() {
        let mut seen = Vec::new();
        let mut r: &[u8] = b"Welcome!\nmigrate-x-ready\nrest";
        assert!(
            read_until_line(&mut r, "migrate-x-ready", &mut seen, 1 << 16)
                .await
                .unwrap()
        );
        assert_eq!(seen, b"Welcome!\nrest");
        // Ends without it; or too much noise before it.
        let mut r: &[u8] = b"migrate-x-ready-not\n";
        assert!(
            !read_until_line(&mut r, "migrate-x-ready", &mut Vec::new(), 1 << 16)
                .await
                .unwrap()
        );
        let noise = vec![b'x'; 10_000];
        let mut r: &[u8] = &noise;
        assert!(
            !read_until_line(&mut r, "m", &mut Vec::new(), 100)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn failure_names_command_status_and_stderr() {
        let err = run(
            "sh",
            &args(["-c", "echo boom >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("exited with status 3"), "{text}");
        assert!(text.contains("boom"), "{text}");
    }

    #[tokio::test]
    async fn timeout_kills() {
        let err = run("sleep", &args(["5"]), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run("no-such-program-xyz", &[], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Spawn { .. }), "{err}");
        // Said once, also in anyhow's full chain.
        let chain = format!("{:#}", anyhow::Error::new(err).context("checking"));
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
    }
}
