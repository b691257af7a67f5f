//! One control connection: the sender's hello, the proof that this receiver holds the
//! run's secret, then the sender's frames until "OK" (restore and answer), an abort, or
//! silence.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::MutexGuard;

use super::{Ctx, Done, report, restore};
use crate::protocol::{
    Auth, Channel, Direction, Manifest, PROTOCOL_VERSION, ProtocolError, TargetOutcome, ToReceiver,
    ToSender, valid_run_id,
};
use crate::rundir::{self, PID_FILE, RESULT_FILE};
use crate::timing::now_us;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the sender may take from `Welcome` to its first authenticated frame (it
/// measures the clock offset at once).
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an authenticated sender may stay silent (pre-sync of big folders); a sender
/// whose host vanished is noticed sooner by TCP keepalive.
const IDLE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

type Control = Channel<BufReader<OwnedReadHalf>, OwnedWriteHalf>;

/// One control connection. Returns `Some` when it carried an authenticated migration
/// that ended (restored, failed, aborted, or dropped by the sender).
pub(super) async fn handle(sock: TcpStream, peer: SocketAddr, ctx: &Ctx) -> Option<Done> {
    let _ = sock.set_nodelay(true);
    let _ = crate::protocol::keepalive(&sock);
    let (r, w) = sock.into_split();
    let mut ch = Channel::new(BufReader::new(r), w, Direction::ToSender);
    let hello = read_hello(&mut ch, peer, ctx).await?;
    let mut session = Session::authenticate(ch, hello, peer, ctx).await?;
    let first = session.first_frame().await?;
    session.started();
    Some(session.converse(first).await)
}

/// What the sender's hello said.
struct Hello {
    protocol: u32,
    run_id: String,
    source_host: String,
    label: String,
    challenge: Option<String>,
}

async fn read_hello(ch: &mut Control, peer: SocketAddr, ctx: &Ctx) -> Option<Hello> {
    let refused = |why: String| {
        ctx.ui
            .warn(&format!("refused connection from {peer}: {why}"))
    };
    match tokio::time::timeout(HELLO_TIMEOUT, ch.recv::<ToReceiver>()).await {
        Ok(Ok(ToReceiver::Hello {
            protocol,
            run_id,
            source_host,
            label,
            challenge,
            ..
        })) => Some(Hello {
            protocol,
            run_id,
            source_host,
            label,
            challenge,
        }),
        Ok(Ok(_)) => {
            refused("it did not start with hello".into());
            None
        }
        Ok(Err(e)) => {
            refused(e.to_string());
            None
        }
        Err(_) => {
            refused(format!("no hello within {}s", HELLO_TIMEOUT.as_secs()));
            None
        }
    }
}

/// Says why on stderr and to the sender, then the connection closes.
async fn refuse(ch: &mut Control, peer: SocketAddr, ctx: &Ctx, reason: String) {
    ctx.ui
        .warn(&format!("refused connection from {peer}: {reason}"));
    let _ = ch.send(&ToSender::Refused { reason }).await;
}

fn welcome(ctx: &Ctx, nonce: &str, proof: Option<String>) -> ToSender {
    ToSender::Welcome {
        protocol: PROTOCOL_VERSION,
        receiver_version: env!("CARGO_PKG_VERSION").into(),
        hostname: ctx.hostname.clone(),
        nonce: nonce.to_string(),
        proof,
    }
}

/// An authenticated migration: this receiver proved that it holds the run's secret,
/// every frame from here on is signed with it, and the receiver is busy with this
/// migration until the session is dropped.
struct Session<'a> {
    ch: Control,
    peer: SocketAddr,
    ctx: &'a Ctx,
    run_id: String,
    source_host: String,
    label: String,
    /// The run folder.
    dir: PathBuf,
    _busy: MutexGuard<'a, ()>,
}

/// Why the frame loop stopped before "OK" or an abort: what `result.json` says.
struct Closing(String);

impl Closing {
    fn before_ok() -> Closing {
        Closing("the migration ended before \"OK\"; nothing was restored".into())
    }
}

impl<'a> Session<'a> {
    /// Checks the hello, then proves that this receiver holds the run's secret. `None`
    /// when the connection is refused, or was only `check` looking (no challenge).
    async fn authenticate(
        mut ch: Control,
        hello: Hello,
        peer: SocketAddr,
        ctx: &'a Ctx,
    ) -> Option<Session<'a>> {
        let Hello {
            protocol,
            run_id,
            source_host,
            label,
            challenge,
        } = hello;
        if protocol != PROTOCOL_VERSION || !valid_run_id(&run_id) {
            let reason = format!(
                "protocol {protocol} / run id {run_id:?} not accepted (this receiver speaks protocol {PROTOCOL_VERSION})"
            );
            refuse(&mut ch, peer, ctx, reason).await;
            return None;
        }
        let nonce = crate::protocol::fresh_nonce();
        let Some(challenge) = challenge else {
            // `check` only looks: say who answers, then close.
            let _ = ch.send(&welcome(ctx, &nonce, None)).await;
            return None;
        };
        if !crate::protocol::valid_nonce(&challenge) {
            refuse(&mut ch, peer, ctx, "malformed challenge".into()).await;
            return None;
        }
        let Ok(busy) = ctx.busy.try_lock() else {
            refuse(&mut ch, peer, ctx, "busy with another migration".into()).await;
            return None;
        };
        // The secret was placed over SSH before the sender connected: proving that we hold
        // it is what tells the sender that it talks to the receiver SSH vouches for.
        let dir = rundir::run_dir(&ctx.workdir, &run_id);
        let secret = match rundir::read_secret(&dir) {
            Ok(s) => s,
            Err(e) => {
                let reason = format!(
                    "no usable secret for run {run_id} in this receiver's work folder {} ({e}); if the receiver runs with another --workdir, pass that as send's --target-workdir",
                    ctx.workdir.display()
                );
                refuse(&mut ch, peer, ctx, reason).await;
                return None;
            }
        };
        let auth = Auth::new(secret, &challenge, &nonce);
        ch.send(&welcome(ctx, &nonce, Some(auth.proof())))
            .await
            .ok()?;
        ch.authenticate(auth);
        Some(Session {
            ch,
            peer,
            ctx,
            run_id,
            source_host,
            label,
            dir,
            _busy: busy,
        })
    }

    /// The sender's first signed frame: until it comes, nothing is acted on.
    async fn first_frame(&mut self) -> Option<ToReceiver> {
        let (peer, run_id) = (self.peer, &self.run_id);
        match tokio::time::timeout(FIRST_FRAME_TIMEOUT, self.ch.recv::<ToReceiver>()).await {
            Ok(Ok(m)) => Some(m),
            Ok(Err(e)) => {
                self.ctx.ui.warn(&format!(
                    "refused message from {peer} for run {run_id}: {e}; not acted on"
                ));
                None
            }
            Err(_) => {
                self.ctx.ui.warn(&format!(
                    "{peer} said nothing for run {run_id} within {}s of the welcome; closing",
                    FIRST_FRAME_TIMEOUT.as_secs()
                ));
                None
            }
        }
    }

    /// The migration is on: the pid file tells a sender that loses us whom to stop.
    fn started(&self) {
        if let Err(e) = rundir::write_pid(&self.dir) {
            self.ctx.ui.warn(&format!(
                "cannot write {PID_FILE} in {}: {e}",
                self.dir.display()
            ));
        }
        self.ctx.ui.info(&format!(
            "migration {} from {} ({}) authenticated",
            self.run_id, self.source_host, self.peer
        ));
    }

    /// The frame loop, from the first signed frame to the end of the migration.
    async fn converse(mut self, first: ToReceiver) -> Done {
        let mut msg = first;
        let closing = loop {
            let got_us = now_us();
            match msg {
                ToReceiver::TimeProbe { t0 } => {
                    let t2 = now_us();
                    let reply = ToSender::TimeReply { t0, t1: got_us, t2 };
                    if self.ch.send(&reply).await.is_err() {
                        break Closing::before_ok();
                    }
                }
                ToReceiver::Abort { reason, frozen } => return self.aborted(&reason, frozen),
                ToReceiver::Ready { manifest } => return self.ready(manifest, got_us).await,
                ToReceiver::Hello { .. } => {
                    self.ctx.ui.warn(&format!(
                        "migration {}: unexpected second hello; closing",
                        self.run_id
                    ));
                    break Closing::before_ok();
                }
            }
            msg = match self.next_frame().await {
                Ok(m) => m,
                Err(closing) => break closing,
            };
        };
        self.closed(closing)
    }

    async fn next_frame(&mut self) -> Result<ToReceiver, Closing> {
        let run_id = &self.run_id;
        let ui = &self.ctx.ui;
        match tokio::time::timeout(IDLE_TIMEOUT, self.ch.recv::<ToReceiver>()).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(ProtocolError::Closed)) => {
                ui.warn(&format!(
                    "sender of {run_id} went away before OK; nothing was restored"
                ));
                Err(Closing::before_ok())
            }
            Ok(Err(e)) => {
                ui.warn(&format!("migration {run_id}: {e}; not acted on, closing"));
                Err(Closing(format!("the receiver refused a message: {e}")))
            }
            Err(_) => {
                ui.warn(&format!(
                    "migration {run_id}: sender silent for {}h; closing",
                    IDLE_TIMEOUT.as_secs() / 3600
                ));
                Err(Closing::before_ok())
            }
        }
    }

    /// The sender gave up before "OK".
    fn aborted(&self, reason: &str, frozen: bool) -> Done {
        self.ctx.ui.warn(&format!(
            "sender aborted migration {}: {reason}",
            self.run_id
        ));
        if frozen {
            // The sender rolls back and may fetch an archive back; it removes the run
            // folder when done.
            rundir::remove_secret(&self.dir);
            Done::NotRestored
        } else {
            rundir::remove_archives(&self.dir);
            Done::Ended
        }
    }

    /// "OK": verify, restore, and tell the sender (on the connection, and in
    /// `result.json` for a sender that lost it).
    async fn ready(mut self, manifest: Manifest, got_us: i64) -> Done {
        self.ctx.ui.info("OK received: verifying and restoring");
        let mut lazies = Vec::new();
        let outcome = restore::restore(
            &manifest,
            &self.run_id,
            &self.dir,
            got_us,
            self.ctx,
            &mut lazies,
        )
        .await;
        report::leave_result(&self.dir, &outcome, &self.ctx.ui);
        if let Err(e) = self.ch.send(&ToSender::Outcome(outcome.clone())).await {
            self.ctx.ui.warn(&format!(
                "could not tell the sender the outcome ({e}); it will read {RESULT_FILE} over SSH"
            ));
        }
        let window = match lazies.is_empty() {
            true => None,
            false => Some(super::lazy::watch(lazies, &self.ctx.ui).await),
        };
        let from = report::Origin {
            run_id: &self.run_id,
            label: &self.label,
            source: &self.source_host,
        };
        report::print_record(self.ctx, &from, &manifest, &outcome, window.as_ref());
        if window.as_ref().is_some_and(|w| w.error.is_some()) {
            return Done::NotRestored;
        }
        if outcome.restored {
            Done::Restored
        } else {
            Done::NotRestored
        }
    }

    /// The connection ended before "OK" or an abort.
    fn closed(self, closing: Closing) -> Done {
        // A sender that lost us after "OK" reads this over SSH: nothing was restored here.
        let outcome = TargetOutcome {
            restored: false,
            error: Some(closing.0),
            ready_us: now_us(),
            ..Default::default()
        };
        let _ = rundir::write_result(&self.dir, &outcome);
        rundir::remove_archives(&self.dir);
        Done::Ended
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use tokio::sync::Mutex;

    use super::*;
    use crate::progress::Ui;
    use crate::timing::Format;

    const SECRET: &str = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";

    fn ctx(workdir: &Path) -> Arc<Ctx> {
        Arc::new(Ctx {
            workdir: workdir.to_path_buf(),
            hostname: "target".into(),
            busy: Mutex::new(()),
            ui: Arc::new(Ui::new("receive")),
            format: Format::Csv,
            header_done: AtomicBool::new(true),
        })
    }

    /// A work folder with run `r1`'s private folder, its secret and an archive.
    fn workdir() -> (tempfile::TempDir, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let w = tempfile::tempdir().unwrap();
        let dir = rundir::run_dir(w.path(), "r1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        rundir::create_new_private(&dir.join(rundir::SECRET_FILE))
            .and_then(|mut f| std::io::Write::write_all(&mut f, SECRET.as_bytes()))
            .unwrap();
        std::fs::write(dir.join("db.tar"), b"memory").unwrap();
        (w, dir)
    }

    /// Serves one connection with `handle`; returns the sender's end and the result.
    async fn connect(ctx: Arc<Ctx>) -> (Control, tokio::task::JoinHandle<Option<Done>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (sock, peer) = listener.accept().await.unwrap();
            handle(sock, peer, &ctx).await
        });
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        (
            Channel::new(BufReader::new(r), w, Direction::ToReceiver),
            served,
        )
    }

    fn hello(run_id: &str, challenge: Option<&str>) -> ToReceiver {
        ToReceiver::Hello {
            protocol: PROTOCOL_VERSION,
            run_id: run_id.into(),
            sender_version: "t".into(),
            source_host: "source".into(),
            label: String::new(),
            challenge: challenge.map(str::to_string),
        }
    }

    /// Says hello with a challenge and checks the receiver's proof of the secret.
    async fn authenticated(ch: &mut Control) {
        let challenge = crate::protocol::fresh_nonce();
        ch.send(&hello("r1", Some(&challenge))).await.unwrap();
        let welcome: ToSender = ch.recv().await.unwrap();
        let ToSender::Welcome {
            nonce,
            proof: Some(proof),
            ..
        } = welcome
        else {
            panic!("{welcome:?}")
        };
        let auth = Auth::new(hex::decode(SECRET).unwrap(), &challenge, &nonce);
        assert!(auth.check_proof(&proof));
        ch.authenticate(auth);
    }

    #[tokio::test]
    async fn a_look_without_challenge_is_welcomed_and_starts_nothing() {
        let (w, _dir) = workdir();
        let (mut ch, served) = connect(ctx(w.path())).await;
        ch.send(&hello("r1", None)).await.unwrap();
        let welcome: ToSender = ch.recv().await.unwrap();
        assert!(
            matches!(&welcome, ToSender::Welcome { proof: None, hostname, .. } if hostname == "target"),
            "{welcome:?}"
        );
        assert_eq!(served.await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_run_without_its_secret_here_is_refused() {
        let (w, _dir) = workdir();
        let (mut ch, served) = connect(ctx(w.path())).await;
        ch.send(&hello("r2", Some(&crate::protocol::fresh_nonce())))
            .await
            .unwrap();
        let answer: ToSender = ch.recv().await.unwrap();
        assert!(
            matches!(&answer, ToSender::Refused { reason } if reason.contains("no usable secret for run r2")),
            "{answer:?}"
        );
        assert_eq!(served.await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_abort_before_the_freeze_ends_the_run_and_removes_its_archives() {
        let (w, dir) = workdir();
        let (mut ch, served) = connect(ctx(w.path())).await;
        authenticated(&mut ch).await;
        ch.send(&ToReceiver::TimeProbe { t0: 7 }).await.unwrap();
        let reply: ToSender = ch.recv().await.unwrap();
        assert!(
            matches!(reply, ToSender::TimeReply { t0: 7, .. }),
            "{reply:?}"
        );
        ch.send(&ToReceiver::Abort {
            reason: "test".into(),
            frozen: false,
        })
        .await
        .unwrap();
        assert_eq!(served.await.unwrap(), Some(Done::Ended));
        let pid = std::fs::read_to_string(dir.join(PID_FILE)).unwrap();
        assert_eq!(pid, std::process::id().to_string());
        assert!(!dir.join("db.tar").exists());
        assert!(!dir.join(rundir::SECRET_FILE).exists());
    }

    #[tokio::test]
    async fn an_abort_after_the_freeze_keeps_the_archives_for_the_rollback() {
        let (w, dir) = workdir();
        let (mut ch, served) = connect(ctx(w.path())).await;
        authenticated(&mut ch).await;
        ch.send(&ToReceiver::Abort {
            reason: "test".into(),
            frozen: true,
        })
        .await
        .unwrap();
        assert_eq!(served.await.unwrap(), Some(Done::NotRestored));
        assert!(dir.join("db.tar").exists());
        assert!(!dir.join(rundir::SECRET_FILE).exists());
    }

    #[tokio::test]
    async fn a_sender_that_goes_away_leaves_a_result_that_nothing_was_restored() {
        let (w, dir) = workdir();
        let (mut ch, served) = connect(ctx(w.path())).await;
        authenticated(&mut ch).await;
        ch.send(&ToReceiver::TimeProbe { t0: 1 }).await.unwrap();
        let _: ToSender = ch.recv().await.unwrap();
        drop(ch);
        assert_eq!(served.await.unwrap(), Some(Done::Ended));
        let result: TargetOutcome =
            serde_json::from_slice(&std::fs::read(dir.join(RESULT_FILE)).unwrap()).unwrap();
        assert!(!result.restored);
        assert!(
            result.error.as_deref().unwrap().contains("before \"OK\""),
            "{result:?}"
        );
        assert!(!dir.join("db.tar").exists());
    }
}
