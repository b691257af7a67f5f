//! The end of a migration against doubles: every outcome of the target (restored,
//! partial, failed, unknown) at every failure point (before the freeze, while frozen,
//! after "OK", during the commit). Each case checks what runs where afterwards, the exit,
//! and the order in which things were done. No root, no podman, no second host.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use anyhow::anyhow;
use tokio::time::Instant;

use super::finish::{self, End, Froze};
use super::seams::{Clock, Engine, Interrupts, Journal, Target};
use super::{Item, SendFailure};
use crate::engine::podman::{ContainerInfo, CriuOptions, PodmanError};
use crate::exit::Exit;
use crate::hooks::{HookError, When};
use crate::journal::Phase;
use crate::progress::Ui;
use crate::protocol::{ContainerEntry, LeftOnTarget, Manifest, TargetOutcome};
use crate::settle::{NotClean, Settled};
use crate::timing::Record;
use crate::transport::ssh::{Destination, SshError};

const NAMES: [&str; 2] = ["db", "web"];

/// Everything the doubles did, in order, across all of them.
type Log = Rc<RefCell<Vec<String>>>;

fn said(log: &Log, what: impl Into<String>) {
    log.borrow_mut().push(what.into());
}

/// A container on the source: running, stopped with its checkpoint kept, or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Here {
    Running,
    Kept,
    Gone,
}

struct FakeEngine {
    state: RefCell<BTreeMap<String, Here>>,
    /// Restoring from the kept checkpoint fails (the fallback fetches the archive back).
    in_place_fails: bool,
    /// Removing a container fails (the commit's last step).
    remove_fails: bool,
    log: Log,
}

fn refused(what: &str) -> PodmanError {
    PodmanError::Parse(format!("double: {what} refused"))
}

impl FakeEngine {
    fn new(log: &Log, each: Here) -> FakeEngine {
        let state = NAMES.iter().map(|n| (n.to_string(), each)).collect();
        FakeEngine {
            state: RefCell::new(state),
            in_place_fails: false,
            remove_fails: false,
            log: log.clone(),
        }
    }

    fn here(&self, name: &str) -> Here {
        self.state.borrow()[name]
    }
}

impl Engine for FakeEngine {
    async fn running(&self, name: &str) -> Result<bool, PodmanError> {
        Ok(self.here(name) == Here::Running)
    }

    async fn restore_in_place(&self, name: &str, _: CriuOptions) -> Result<(), PodmanError> {
        said(&self.log, format!("source: restore {name} in place"));
        if self.in_place_fails || self.here(name) != Here::Kept {
            return Err(refused("restore in place"));
        }
        self.state.borrow_mut().insert(name.into(), Here::Running);
        Ok(())
    }

    async fn restore_import(
        &self,
        archive: &Path,
        _: CriuOptions,
        _: Option<&str>,
    ) -> Result<(), PodmanError> {
        let name = archive.file_stem().unwrap().to_str().unwrap().to_string();
        said(&self.log, format!("source: import {name}"));
        if self.here(&name) != Here::Gone {
            return Err(refused("import over an existing container"));
        }
        self.state.borrow_mut().insert(name, Here::Running);
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), PodmanError> {
        said(&self.log, format!("source: remove {name}"));
        if self.remove_fails {
            return Err(refused("remove"));
        }
        self.state.borrow_mut().insert(name.into(), Here::Gone);
        Ok(())
    }

    async fn remove_pod(&self, name: &str) -> Result<(), PodmanError> {
        said(&self.log, format!("source: remove pod {name}"));
        Ok(())
    }
}

/// What the target does with "OK".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Restores everything and says so.
    Restored,
    /// Restores `db`, fails `web`, cannot remove `db`, and says so; SSH removes it.
    Partial,
    /// Restores nothing and says so.
    Failed,
    /// Restores everything, and the connection breaks before its answer arrives.
    Unknown,
}

struct FakeTarget {
    verdict: Verdict,
    /// Containers running there.
    running: RefCell<BTreeMap<String, bool>>,
    /// SSH cannot remove what the receiver left (the partial case, or what `settle` finds).
    stuck: bool,
    ok_sent: bool,
    dest: Destination,
    log: Log,
}

impl FakeTarget {
    fn new(log: &Log, verdict: Verdict) -> FakeTarget {
        FakeTarget {
            verdict,
            running: RefCell::default(),
            stuck: false,
            ok_sent: false,
            dest: Destination {
                user: Some("root".into()),
                host: "10.77.0.12".into(),
                port: None,
                identity: None,
            },
            log: log.clone(),
        }
    }

    fn runs(&self, name: &str) -> bool {
        self.running.borrow().get(name).copied().unwrap_or(false)
    }

    fn verdict_of(&self, restored: bool) -> TargetOutcome {
        TargetOutcome {
            restored,
            error: (!restored).then(|| "double: restore of web failed".to_string()),
            ready_us: 1_000_000,
            up_us: restored.then_some(1_500_000),
            ..TargetOutcome::default()
        }
    }
}

impl Target for FakeTarget {
    async fn send_ok(&mut self, _: &Manifest) -> anyhow::Result<()> {
        said(&self.log, "target: OK received");
        self.ok_sent = true;
        match self.verdict {
            Verdict::Restored | Verdict::Unknown => {
                for n in NAMES {
                    self.running.borrow_mut().insert(n.into(), true);
                }
            }
            Verdict::Partial => {
                self.running.borrow_mut().insert("db".into(), true);
            }
            Verdict::Failed => {}
        }
        Ok(())
    }

    async fn outcome(&mut self) -> anyhow::Result<TargetOutcome> {
        match self.verdict {
            Verdict::Restored => Ok(self.verdict_of(true)),
            Verdict::Failed => Ok(self.verdict_of(false)),
            Verdict::Partial => Ok(TargetOutcome {
                left_on_target: vec![LeftOnTarget {
                    name: "db".into(),
                    state: "running".into(),
                    error: "double: podman rm failed".into(),
                }],
                ..self.verdict_of(false)
            }),
            Verdict::Unknown => Err(anyhow!("double: connection reset")),
        }
    }

    async fn abort(&mut self, reason: &str, frozen: bool) {
        said(
            &self.log,
            format!("target: abort ({reason}, frozen {frozen})"),
        );
    }

    async fn clean(&self, names: &[String], _: &Ui) -> Result<(), NotClean> {
        said(&self.log, format!("target: clean {}", names.join(" ")));
        if self.stuck {
            return Err(not_clean(names));
        }
        for n in names {
            self.running.borrow_mut().remove(n);
        }
        Ok(())
    }

    async fn settle(&self, _: &[String], _: Instant, _: &Ui) -> Result<Settled, SshError> {
        said(&self.log, "target: settle over SSH");
        let all = NAMES.iter().all(|n| self.runs(n));
        let none = NAMES.iter().all(|n| !self.runs(n));
        let names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
        Ok(match (all, none, self.stuck) {
            (true, _, _) => Settled::Restored(self.verdict_of(true)),
            (_, true, _) => Settled::Clean(self.verdict_of(false)),
            (_, _, false) => {
                // Half restored: settle stops and removes it there.
                self.running.borrow_mut().clear();
                Settled::Clean(self.verdict_of(false))
            }
            (_, _, true) => Settled::NotClean(not_clean(&names), None),
        })
    }

    async fn fetch_archive(&self, archive: &str, _: &Path) -> Result<(), SshError> {
        said(&self.log, format!("target: fetch {archive}"));
        Ok(())
    }

    async fn forget_run(&self) {
        said(&self.log, "target: run folder removed");
    }

    async fn release(&self) {
        said(&self.log, "target: released");
    }

    async fn hooks(&self, when: When) -> Result<(), HookError> {
        said(&self.log, format!("hooks: {when:?}"));
        Ok(())
    }

    fn dest(&self) -> &Destination {
        &self.dest
    }

    fn run_dir(&self) -> &str {
        "/var/lib/migrate/runs/r1"
    }
}

fn not_clean(names: &[String]) -> NotClean {
    NotClean {
        containers: names
            .iter()
            .map(|n| LeftOnTarget {
                name: n.clone(),
                state: "unknown".into(),
                error: "double: cannot remove".into(),
            })
            .collect(),
        processes: vec![],
    }
}

struct FixedClock;

impl Clock for FixedClock {
    fn now_us(&self) -> i64 {
        2_000_000
    }
}

struct FakeJournal(Log);

impl Journal for FakeJournal {
    fn phase(&mut self, phase: Phase) -> anyhow::Result<()> {
        said(&self.0, format!("journal: {phase:?}"));
        Ok(())
    }
}

/// No signal ever arrives.
struct Quiet;

impl Interrupts for Quiet {
    fn count(&self) -> u64 {
        0
    }

    async fn changed(&mut self) {
        std::future::pending::<()>().await
    }
}

fn item(name: &str, dir: &Path) -> Item {
    Item {
        info: ContainerInfo {
            id: format!("{name}-id"),
            name: name.into(),
            image_id: "i".into(),
            image_name: String::new(),
            status: "running".into(),
            running: true,
            pid: 1,
            mounts: vec![],
            joins: vec![],
            shares: vec![],
            dependencies: vec![],
            pod: String::new(),
            networks: Vec::new(),
            published: false,
        },
        opts: CriuOptions::default(),
        archive_name: format!("{name}.tar"),
        local_archive: dir.join(format!("{name}.tar")),
        fifo: dir.join(format!("{name}.fifo")),
        stream_zstd: false,
        sink: None,
        drop_zero_pages: false,
        after: vec![],
        addresses: vec![],
        freezer: None,
        lazy: None,
    }
}

fn manifest(items: &[Item]) -> Manifest {
    Manifest {
        run_id: "r1".into(),
        containers: items
            .iter()
            .map(|it| ContainerEntry {
                name: it.info.name.clone(),
                archive: it.archive_name.clone(),
                size: 1,
                digest: "d".into(),
                image_id: "i".into(),
                file_locks: false,
                tcp_established: false,
                tcp_close: true,
                after: vec![],
                addresses: vec![],
                lazy: None,
            })
            .collect(),
        data: vec![],
        down_us: 0,
        clock_offset_us: 0,
        pod: None,
    }
}

/// Where a migration fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// A check, the pre-sync or a pre-freeze hook: nothing is frozen.
    BeforeFreeze,
    /// A checkpoint or the shipping fails: both containers are checkpointed and stopped.
    Frozen,
    /// Nothing fails on the source after "OK": the target's verdict decides.
    AfterOk,
    /// The target restored; removing the containers here fails.
    DuringCommit,
}

struct Case {
    log: Log,
    engine: FakeEngine,
    target: FakeTarget,
    result: Result<(), SendFailure>,
    record: Record,
}

impl Case {
    fn events(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    fn index(&self, event: &str) -> Option<usize> {
        self.log.borrow().iter().position(|e| e == event)
    }

    fn exit(&self) -> Exit {
        match &self.result {
            Ok(()) => Exit::Ok,
            Err(f) => f.exit,
        }
    }

    fn running_here(&self) -> Vec<&str> {
        NAMES
            .into_iter()
            .filter(|n| self.engine.here(n) == Here::Running)
            .collect()
    }

    fn running_there(&self) -> Vec<&str> {
        NAMES.into_iter().filter(|n| self.target.runs(n)).collect()
    }

    /// The rule of the tool: never two running copies; after a migration or a rollback,
    /// every container runs on exactly one host.
    fn assert_one_copy(&self, what: &str) {
        for n in NAMES {
            let here = self.engine.here(n) == Here::Running;
            let there = self.target.runs(n);
            assert!(!(here && there), "{what}: {n} runs on both hosts");
            if self.exit() != Exit::Failed {
                assert!(
                    here || there,
                    "{what}: {n} runs nowhere: {:?}",
                    self.events()
                );
            }
        }
    }
}

/// `finish::conclude` against the doubles; the journal writes into the engine's log.
async fn conclude(
    engine: &FakeEngine,
    target: &mut FakeTarget,
    froze: Froze,
    items: &[Item],
    dir: &Path,
    post_up_hooks: bool,
    record: &mut Record,
) -> Result<(), SendFailure> {
    let ui = Ui::new("send");
    let mut end = End {
        engine,
        target,
        clock: &FixedClock,
        ui: &ui,
        items,
        local_dir: dir,
        offset_us: 0,
        post_up_hooks,
        pod: None,
    };
    let mut journal = FakeJournal(engine.log.clone());
    let r = finish::conclude(&mut end, froze, &mut journal, &mut Quiet, record).await;
    ui.finish();
    r
}

fn shipped(items: &[Item]) -> Froze {
    Froze::Shipped {
        manifest: manifest(items),
        checkpointed: items.to_vec(),
    }
}

async fn run_case(point: Point, verdict: Verdict) -> Case {
    let log: Log = Rc::default();
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<Item> = NAMES.iter().map(|n| item(n, dir.path())).collect();
    let before = if point == Point::BeforeFreeze {
        Here::Running
    } else {
        Here::Kept
    };
    let mut engine = FakeEngine::new(&log, before);
    engine.remove_fails = point == Point::DuringCommit;
    let mut target = FakeTarget::new(&log, verdict);
    let mut record = Record::default();
    let result = match point {
        Point::BeforeFreeze => {
            Err(finish::refuse(&mut target, "pre-freeze hook failed", anyhow!("double")).await)
        }
        Point::Frozen | Point::AfterOk | Point::DuringCommit => {
            let froze = if point == Point::Frozen {
                Froze::Failed {
                    checkpointed: items.clone(),
                    error: anyhow!("double: shipping failed"),
                }
            } else {
                shipped(&items)
            };
            let dir = dir.path();
            conclude(&engine, &mut target, froze, &items, dir, true, &mut record).await
        }
    };
    Case {
        log,
        engine,
        target,
        result,
        record,
    }
}

const VERDICTS: [Verdict; 4] = [
    Verdict::Restored,
    Verdict::Partial,
    Verdict::Failed,
    Verdict::Unknown,
];

#[tokio::test]
async fn before_the_freeze_nothing_is_touched_whatever_the_target_would_do() {
    for verdict in VERDICTS {
        let c = run_case(Point::BeforeFreeze, verdict).await;
        let what = format!("before the freeze, target {verdict:?}");
        assert_eq!(c.exit(), Exit::Refused, "{what}");
        assert_eq!(c.running_here(), NAMES, "{what}");
        assert!(c.running_there().is_empty(), "{what}");
        assert!(!c.target.ok_sent, "{what}: OK was sent");
        assert_eq!(
            c.events(),
            ["target: abort (pre-freeze hook failed, frozen false)"],
            "{what}"
        );
        c.assert_one_copy(&what);
    }
}

#[tokio::test]
async fn while_frozen_the_target_gets_no_ok_and_the_source_takes_the_service_back() {
    for verdict in VERDICTS {
        let c = run_case(Point::Frozen, verdict).await;
        let what = format!("frozen, target {verdict:?}");
        assert_eq!(c.exit(), Exit::RolledBack, "{what}: {:?}", c.events());
        assert!(!c.target.ok_sent, "{what}: OK was sent");
        assert_eq!(c.running_here(), NAMES, "{what}");
        assert!(c.running_there().is_empty(), "{what}");
        // The receiver is told first, then the containers come back, then the archives go.
        let abort = c.index("target: abort (failed while frozen, frozen true)");
        let restore = c.index("source: restore db in place");
        let forget = c.index("target: run folder removed");
        assert!(
            abort < restore && restore < forget,
            "{what}: {:?}",
            c.events()
        );
        assert!(c.index("hooks: Rollback").is_some(), "{what}");
        assert!(c.index("journal: OkSent").is_none(), "{what}");
        c.assert_one_copy(&what);
    }
}

#[tokio::test]
async fn after_ok_the_targets_verdict_decides_where_the_service_runs() {
    for verdict in VERDICTS {
        let c = run_case(Point::AfterOk, verdict).await;
        let what = format!("after OK, target {verdict:?}");
        // The journal says OK before it leaves: a watchdog then asks, never guesses.
        assert!(
            c.index("journal: OkSent") < c.index("target: OK received"),
            "{what}: {:?}",
            c.events()
        );
        match verdict {
            Verdict::Restored | Verdict::Unknown => {
                assert_eq!(c.exit(), Exit::Ok, "{what}: {:?}", c.events());
                assert_eq!(c.running_there(), NAMES, "{what}");
                assert!(
                    NAMES.iter().all(|n| c.engine.here(n) == Here::Gone),
                    "{what}"
                );
                // Traffic moves (post-up hooks) before the source retires its copies.
                let hooks = c.index("hooks: PostUp");
                assert!(hooks < c.index("source: remove db"), "{what}");
                assert!(c.index("journal: Committing") < hooks, "{what}");
                assert_eq!(c.record.up_us, Some(1_500_000), "{what}");
            }
            Verdict::Partial | Verdict::Failed => {
                assert_eq!(c.exit(), Exit::RolledBack, "{what}: {:?}", c.events());
                assert_eq!(c.running_here(), NAMES, "{what}");
                assert!(c.index("journal: RollingBack").is_some(), "{what}");
                assert!(c.index("source: remove db").is_none(), "{what}");
            }
        }
        if verdict == Verdict::Partial {
            // What the receiver left is removed before anything is restored here.
            assert!(
                c.index("target: clean db") < c.index("source: restore db in place"),
                "{what}: {:?}",
                c.events()
            );
        }
        if verdict == Verdict::Unknown {
            assert!(c.index("target: settle over SSH").is_some(), "{what}");
        }
        c.assert_one_copy(&what);
    }
}

#[tokio::test]
async fn a_commit_that_cannot_remove_the_source_copies_leaves_them_stopped() {
    for verdict in VERDICTS {
        let c = run_case(Point::DuringCommit, verdict).await;
        let what = format!("during the commit, target {verdict:?}");
        match verdict {
            Verdict::Restored | Verdict::Unknown => {
                // The migration succeeded; the stopped copies here are only litter.
                assert_eq!(c.exit(), Exit::Ok, "{what}");
                assert_eq!(c.running_there(), NAMES, "{what}");
                assert!(c.running_here().is_empty(), "{what}");
                assert!(
                    NAMES.iter().all(|n| c.engine.here(n) == Here::Kept),
                    "{what}"
                );
                assert!(c.index("target: released").is_some(), "{what}");
            }
            Verdict::Partial | Verdict::Failed => {
                // The commit is never reached: nothing is removed here.
                assert_eq!(c.exit(), Exit::RolledBack, "{what}");
                assert!(c.index("source: remove db").is_none(), "{what}");
                assert_eq!(c.running_here(), NAMES, "{what}");
            }
        }
        c.assert_one_copy(&what);
    }
}

#[tokio::test]
async fn a_target_that_cannot_be_cleaned_is_never_joined_by_a_second_copy() {
    for verdict in [Verdict::Partial, Verdict::Unknown] {
        let log: Log = Rc::default();
        let dir = tempfile::tempdir().unwrap();
        let items: Vec<Item> = NAMES.iter().map(|n| item(n, dir.path())).collect();
        let engine = FakeEngine::new(&log, Here::Kept);
        let mut target = FakeTarget::new(&log, verdict);
        target.stuck = true;
        if verdict == Verdict::Unknown {
            // Only half of it came up there before the connection broke.
            target.verdict = Verdict::Partial;
        }
        let mut record = Record::default();
        let froze = shipped(&items);
        let r = conclude(
            &engine,
            &mut target,
            froze,
            &items,
            dir.path(),
            false,
            &mut record,
        )
        .await;
        let f = r.expect_err("a target that cannot be cleaned is a failure");
        assert_eq!(f.exit, Exit::Failed, "{verdict:?}");
        // Nothing is restored here while a copy may run there; the message says how.
        assert!(
            NAMES.iter().all(|n| engine.here(n) == Here::Kept),
            "{verdict:?}"
        );
        assert!(
            !log.borrow()
                .iter()
                .any(|e| e.starts_with("source: restore")),
            "{verdict:?}: {:?}",
            log.borrow()
        );
        let text = format!("{:#}", f.error);
        assert!(text.contains("podman container restore --keep"), "{text}");
    }
}

#[tokio::test]
async fn a_rollback_without_the_kept_checkpoint_fetches_the_archive_back() {
    let log: Log = Rc::default();
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<Item> = NAMES.iter().map(|n| item(n, dir.path())).collect();
    let mut engine = FakeEngine::new(&log, Here::Kept);
    engine.in_place_fails = true;
    let mut target = FakeTarget::new(&log, Verdict::Failed);
    let froze = shipped(&items);
    let mut record = Record::default();
    let r = conclude(
        &engine,
        &mut target,
        froze,
        &items,
        dir.path(),
        false,
        &mut record,
    )
    .await;
    assert_eq!(r.expect_err("rolled back").exit, Exit::RolledBack);
    let events = log.borrow().clone();
    let at = |e: &str| events.iter().position(|x| x == e).unwrap_or(usize::MAX);
    // Fetched, then the stale container removed, then imported.
    assert!(
        at("target: fetch db.tar") < at("source: remove db"),
        "{events:?}"
    );
    assert!(
        at("source: remove db") < at("source: import db"),
        "{events:?}"
    );
    assert!(NAMES.iter().all(|n| engine.here(n) == Here::Running));
}
