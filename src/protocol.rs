//! The control protocol between `migrate send` and `migrate receive`.
//!
//! One TCP connection per migration. Frames are single JSON lines of at most
//! [`MAX_FRAME`] bytes. Before it connects, the sender has placed a per-migration secret
//! in the run folder on the target over SSH (the only channel that authenticates the
//! target host). The first two frames (`Hello` with the sender's random challenge,
//! `Welcome` with the receiver's nonce) are plain, but `Welcome` carries a proof, a MAC
//! over both with that secret: a listener that is not the receiver SSH vouches for (a
//! stranger squatting on the port) cannot make one, and the sender tells it nothing more.
//! Every later frame in either direction carries an HMAC-SHA256 over the direction, both
//! nonces, a sequence number and the message text. A frame whose MAC does not verify is
//! refused and never acted upon.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version; bumped on any incompatible change. Fields are never reused.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest frame either side accepts, newline included.
pub const MAX_FRAME: usize = 64 * 1024;
/// Most containers one migration may carry.
pub const MAX_CONTAINERS: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// What can go wrong on the control connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("control connection closed by the peer")]
    Closed,
    #[error("control frame larger than {MAX_FRAME} bytes")]
    TooLarge,
    #[error("malformed control frame: {0}")]
    Malformed(String),
    #[error("control frame failed authentication")]
    BadMac,
    #[error("control frame out of sequence (expected {expected}, got {got})")]
    Sequence { expected: u64, got: u64 },
    #[error("peer speaks control protocol {0}, this build speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("invalid manifest: {0}")]
    Manifest(String),
}

/// Who sent a frame; part of the MAC so a frame cannot be reflected back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToReceiver,
    ToSender,
}

impl Direction {
    fn tag(self) -> &'static [u8] {
        match self {
            Direction::ToReceiver => b"migrate/v1/to-receiver",
            Direction::ToSender => b"migrate/v1/to-sender",
        }
    }
}

/// Messages from the sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToReceiver {
    /// Opens a migration (unauthenticated).
    Hello {
        protocol: u32,
        run_id: String,
        sender_version: String,
        source_host: String,
        label: String,
        /// The sender's random challenge (hex). With it the receiver must prove that it
        /// holds this run's secret; without it (`check`) it only says who it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        challenge: Option<String>,
    },
    /// One round of the clock-offset exchange; `t0` is the sender's clock in µs.
    TimeProbe { t0: i64 },
    /// "OK": everything is on the target; restore it.
    Ready { manifest: Manifest },
    /// The sender gave up before "OK"; the receiver cleans up. `frozen` tells whether
    /// the containers had been checkpointed (and were then rolled back on the source).
    Abort { reason: String, frozen: bool },
}

/// Messages from the receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToSender {
    /// Answer to `Hello`: who answers, the nonce to MAC with, and (when challenged) the
    /// proof that this receiver holds the run's secret. Nothing in it decides an action:
    /// paths and programs on the target are learnt over SSH.
    Welcome {
        protocol: u32,
        receiver_version: String,
        hostname: String,
        nonce: String,
        /// [`Auth::proof`] of the challenge and the nonce.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<String>,
    },
    /// The receiver will not take this migration.
    Refused { reason: String },
    /// Clock-offset answer: `t1` received, `t2` sent, both receiver clock in µs.
    TimeReply { t0: i64, t1: i64, t2: i64 },
    /// The final word on a migration.
    Outcome(TargetOutcome),
}

/// What the target did with a `Ready`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetOutcome {
    /// True when every container runs on the target.
    pub restored: bool,
    /// Why not, when `restored` is false.
    pub error: Option<String>,
    /// Receiver clock (µs since the epoch) when `Ready` arrived.
    pub ready_us: i64,
    /// Receiver clock when the last container was running (UP), if it was.
    pub up_us: Option<i64>,
    /// Seconds spent verifying archives.
    pub verify_s: f64,
    /// Seconds spent restoring.
    pub restore_s: f64,
    /// Per container restore seconds, in restore order.
    pub container_restore_s: Vec<(String, f64)>,
    /// Longest time CRIU itself spent restoring one container (podman's statistics).
    pub criu_restore_s: Option<f64>,
    /// Containers of this migration that may still exist, or run, on the target: its
    /// cleanup after a failed restore did not remove them. The source must not restore
    /// them too. Absent from the frame when empty, so older peers read it as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_on_target: Vec<LeftOnTarget>,
}

/// A container of the migration that the target could not remove after a failed restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeftOnTarget {
    pub name: String,
    /// podman's status of it ("running", "exited", …), or "unknown" when it could not be
    /// read.
    pub state: String,
    /// Why it is still there: the last failure of removing or inspecting it.
    pub error: String,
}

/// What the sender shipped, so the receiver can check it before restoring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub run_id: String,
    /// Restore order: dependencies first.
    pub containers: Vec<ContainerEntry>,
    /// Data folders synced to the same path on the target.
    pub data: Vec<String>,
    /// DOWN on the sender's clock (µs since the epoch).
    pub down_us: i64,
    /// The sender's estimate of receiver clock minus sender clock (µs).
    pub clock_offset_us: i64,
    /// The pod the containers are the members of: the receiver creates it and restores
    /// them into it. Absent for containers of no pod; a receiver that predates it refuses
    /// a manifest that carries one (unknown field), so nothing is restored outside a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Box<PodSpec>>,
}

/// What re-creates a pod on the target (`podman pod create`): everything else of the
/// source's pod was checked to be podman's default before the freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    /// Namespaces the members share with the infra container (`--share`), sorted.
    pub share: Vec<String>,
    /// Published ports (`--publish`), as podman takes them: `[IP:]HOST:CONTAINER/PROTO`.
    pub publish: Vec<String>,
    /// `--hostname`; empty for podman's default (the pod's name).
    pub hostname: String,
    /// `--label KEY=VALUE`.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The infra container's image (`--infra-image`); its own command runs.
    pub infra_image: String,
}

impl PodSpec {
    /// Checks what podman would take as something other than a value.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_container_name(&self.name) {
            return Err(format!("invalid pod name {:?}", self.name));
        }
        let known = ["cgroup", "ipc", "net", "pid", "uts"];
        if let Some(s) = self.share.iter().find(|s| !known.contains(&s.as_str())) {
            return Err(format!(
                "pod {} shares an unknown namespace {s:?}",
                self.name
            ));
        }
        let port = |p: &str| {
            !p.is_empty()
                && p.bytes().all(|b| {
                    b.is_ascii_hexdigit() || b":./[]".contains(&b) || b"tcpudsx".contains(&b)
                })
        };
        if let Some(p) = self.publish.iter().find(|p| !port(p)) {
            return Err(format!("pod {} publishes an invalid port {p:?}", self.name));
        }
        let plain = |v: &str| !v.starts_with('-') && !v.contains('\n') && !v.contains('\0');
        if !plain(&self.hostname) || self.infra_image.is_empty() || !plain(&self.infra_image) {
            return Err(format!(
                "pod {} has an invalid hostname or infra image",
                self.name
            ));
        }
        if let Some(k) = self
            .labels
            .keys()
            .find(|k| k.is_empty() || !plain(k) || k.contains('='))
        {
            return Err(format!("pod {} has an invalid label {k:?}", self.name));
        }
        Ok(())
    }
}

/// One checkpointed container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerEntry {
    pub name: String,
    /// File name inside the run folder on the target; never a path.
    pub archive: String,
    pub size: u64,
    /// The archive's digest ([`crate::digest`], lower-case hex).
    pub digest: String,
    pub image_id: String,
    pub file_locks: bool,
    pub tcp_established: bool,
    /// Dumped with CRIU's tcp-close: restored with it (connections come back closed).
    #[serde(default)]
    pub tcp_close: bool,
    /// Containers of this migration that must be running before this one is restored
    /// (it joins their namespaces, or the operator asked for sequential restores).
    /// Containers without such a link are restored in parallel.
    pub after: Vec<String>,
    /// Its addresses on macvlan/ipvlan networks, which move with it: the receiver guards
    /// them during the restore (with `tcp_established`) and announces them after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<AddressEntry>,
    /// Its memory moves lazily (post-copy): the archive holds no pages; the receiver
    /// restores it through CRIU's lazy-pages daemon, whose page requests reach the
    /// source through the relay of this session (`migrate relay-attach`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyEntry>,
}

/// How a container's pages follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LazyEntry {
    /// The relay session both ends must name (a random number of this migration).
    pub session: u64,
}

/// The file in the run folder on the target through which the relay of `container`'s
/// pages is reached (a Unix socket the receiver listens on).
pub fn relay_socket_name(container: &str) -> String {
    format!("relay-{container}.sock")
}

/// A container's addresses on one network whose addresses move with the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressEntry {
    /// The network's name, the same on both hosts (checked before the freeze).
    pub network: String,
    pub ips: Vec<std::net::IpAddr>,
}

/// A run id: what names the per-migration folder on both hosts.
pub fn valid_run_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A container name as podman accepts it.
pub fn valid_container_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && name.len() <= 253
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// An archive name: a plain file name, no path components, nothing hidden.
pub fn valid_archive_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl Manifest {
    /// Checks everything that can be checked without touching the disk.
    pub fn validate(&self, expected_run_id: &str) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::Manifest(m));
        if self.run_id != expected_run_id {
            return bad(format!(
                "run id {:?} does not match this migration ({expected_run_id:?})",
                self.run_id
            ));
        }
        if self.containers.is_empty() || self.containers.len() > MAX_CONTAINERS {
            return bad(format!(
                "{} containers (must be 1 to {MAX_CONTAINERS})",
                self.containers.len()
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut archives = std::collections::HashSet::new();
        for c in &self.containers {
            if !valid_container_name(&c.name) {
                return bad(format!("invalid container name {:?}", c.name));
            }
            if let Some(a) = c
                .addresses
                .iter()
                .find(|a| !valid_container_name(&a.network) || a.ips.is_empty())
            {
                return bad(format!("invalid address entry of {}: {a:?}", c.name));
            }
            if !valid_archive_name(&c.archive) {
                return bad(format!(
                    "archive name {:?} is not a plain file name",
                    c.archive
                ));
            }
            if c.digest.len() != crate::digest::HEX_LEN
                || !c
                    .digest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return bad(format!(
                    "invalid {} digest for {}",
                    crate::digest::NAME,
                    c.name
                ));
            }
            if !names.insert(&c.name) {
                return bad(format!("container {} listed twice", c.name));
            }
            if !archives.insert(&c.archive) {
                return bad(format!("archive {} listed twice", c.archive));
            }
        }
        for c in &self.containers {
            if let Some(a) = c.after.iter().find(|a| !names.contains(a)) {
                return bad(format!(
                    "{} is to follow {a:?}, which this migration does not carry",
                    c.name
                ));
            }
        }
        if restore_waves(&self.containers).is_none() {
            return bad("the restore order has a cycle".into());
        }
        for d in &self.data {
            if !d.starts_with('/') || d.split('/').any(|p| p == "..") {
                return bad(format!("data path {d:?} is not an absolute path"));
            }
        }
        if let Some(pod) = &self.pod {
            pod.validate().map_err(ProtocolError::Manifest)?;
        }
        Ok(())
    }
}

/// Groups containers into waves: each wave only needs containers of earlier waves, and
/// the containers of one wave are restored in parallel. `None` when the order has a cycle.
pub fn restore_waves(containers: &[ContainerEntry]) -> Option<Vec<Vec<&ContainerEntry>>> {
    let mut done: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut left: Vec<&ContainerEntry> = containers.iter().collect();
    let mut waves = Vec::new();
    while !left.is_empty() {
        let (ready, wait): (Vec<&ContainerEntry>, Vec<&ContainerEntry>) = left
            .into_iter()
            .partition(|c| c.after.iter().all(|a| done.contains(a.as_str())));
        if ready.is_empty() {
            return None;
        }
        done.extend(ready.iter().map(|c| c.name.as_str()));
        waves.push(ready);
        left = wait;
    }
    Some(waves)
}

/// The wire form of a frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    v: u32,
    seq: u64,
    /// The message as JSON text, so the MAC covers exactly the bytes sent.
    msg: String,
    mac: Option<String>,
}

/// Keys for the authenticated part of a connection.
#[derive(Clone)]
pub struct Auth {
    secret: Vec<u8>,
    nonce: String,
}

impl Auth {
    /// Keys for a connection whose hello carried `challenge` and whose welcome `nonce`.
    pub fn new(secret: Vec<u8>, challenge: &str, nonce: &str) -> Self {
        Auth {
            secret,
            nonce: format!("{challenge}:{nonce}"),
        }
    }

    fn proof_mac(&self) -> HmacSha256 {
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(b"migrate/v2/welcome-proof");
        mac.update(&[0]);
        mac.update(self.nonce.as_bytes());
        mac
    }

    /// The receiver's proof, in `Welcome`, that it holds the secret.
    pub fn proof(&self) -> String {
        hex::encode(self.proof_mac().finalize().into_bytes())
    }

    /// Checks a receiver's proof (constant time).
    pub fn check_proof(&self, proof: &str) -> bool {
        match hex::decode(proof) {
            Ok(bytes) => self.proof_mac().verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    fn mac(&self, dir: Direction, seq: u64, msg: &str) -> HmacSha256 {
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(dir.tag());
        mac.update(&[0]);
        mac.update(self.nonce.as_bytes());
        mac.update(&[0]);
        mac.update(&seq.to_be_bytes());
        mac.update(msg.as_bytes());
        mac
    }

    fn sign(&self, dir: Direction, seq: u64, msg: &str) -> String {
        hex::encode(self.mac(dir, seq, msg).finalize().into_bytes())
    }

    fn verify(&self, dir: Direction, seq: u64, msg: &str, tag: &str) -> bool {
        match hex::decode(tag) {
            Ok(bytes) => self.mac(dir, seq, msg).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }
}

/// Encodes one frame (with its trailing newline).
fn encode<M: Serialize>(
    msg: &M,
    seq: u64,
    auth: Option<(&Auth, Direction)>,
) -> Result<Vec<u8>, ProtocolError> {
    let text = serde_json::to_string(msg).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let mac = auth.map(|(a, dir)| a.sign(dir, seq, &text));
    let env = Envelope {
        v: PROTOCOL_VERSION,
        seq,
        msg: text,
        mac,
    };
    let mut line = serde_json::to_vec(&env).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    line.push(b'\n');
    if line.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge);
    }
    Ok(line)
}

/// Decodes and checks one frame.
fn decode<M: for<'de> Deserialize<'de>>(
    line: &[u8],
    expected_seq: u64,
    auth: Option<(&Auth, Direction)>,
) -> Result<M, ProtocolError> {
    let env: Envelope =
        serde_json::from_slice(line).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if env.v != PROTOCOL_VERSION {
        return Err(ProtocolError::Version(env.v));
    }
    if let Some((auth, dir)) = auth {
        let Some(tag) = env.mac.as_deref() else {
            return Err(ProtocolError::BadMac);
        };
        if !auth.verify(dir, env.seq, &env.msg, tag) {
            return Err(ProtocolError::BadMac);
        }
    }
    if env.seq != expected_seq {
        return Err(ProtocolError::Sequence {
            expected: expected_seq,
            got: env.seq,
        });
    }
    serde_json::from_str(&env.msg).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Reads one newline-terminated frame of at most [`MAX_FRAME`] bytes.
pub async fn read_frame<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ProtocolError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(ProtocolError::Closed);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        if line.len() + chunk.len() > MAX_FRAME {
            return Err(ProtocolError::TooLarge);
        }
        line.extend_from_slice(chunk);
        let n = chunk.len();
        r.consume(n);
        if done {
            line.pop();
            return Ok(line);
        }
    }
}

/// One side of a control connection: keeps sequence numbers and keys.
pub struct Channel<R, W> {
    reader: R,
    writer: W,
    send_seq: u64,
    recv_seq: u64,
    auth: Option<Auth>,
    outgoing: Direction,
}

impl<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin> Channel<R, W> {
    /// A channel whose own messages travel in `outgoing` direction.
    pub fn new(reader: R, writer: W, outgoing: Direction) -> Self {
        Channel {
            reader,
            writer,
            send_seq: 0,
            recv_seq: 0,
            auth: None,
            outgoing,
        }
    }

    /// The reader and writer back (for tests that look at raw bytes).
    #[cfg(test)]
    pub fn into_parts(self) -> (R, W) {
        (self.reader, self.writer)
    }

    /// From now on every frame in both directions must carry a valid MAC.
    pub fn authenticate(&mut self, auth: Auth) {
        self.auth = Some(auth);
    }

    fn incoming(&self) -> Direction {
        match self.outgoing {
            Direction::ToReceiver => Direction::ToSender,
            Direction::ToSender => Direction::ToReceiver,
        }
    }

    pub async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), ProtocolError> {
        let frame = encode(
            msg,
            self.send_seq,
            self.auth.as_ref().map(|a| (a, self.outgoing)),
        )?;
        self.writer.write_all(&frame).await?;
        self.writer.flush().await?;
        self.send_seq += 1;
        Ok(())
    }

    pub async fn recv<M: for<'de> Deserialize<'de>>(&mut self) -> Result<M, ProtocolError> {
        let line = read_frame(&mut self.reader).await?;
        let dir = self.incoming();
        let msg = decode(&line, self.recv_seq, self.auth.as_ref().map(|a| (a, dir)))?;
        self.recv_seq += 1;
        Ok(msg)
    }
}

/// TCP keepalive on a control connection: a peer that vanished (host down, cable cut)
/// is noticed within about 30 s (10 s idle, then 4 probes 5 s apart), even while neither
/// side has anything to say (a long pre-sync).
pub fn keepalive(sock: &tokio::net::TcpStream) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(10))
        .with_interval(std::time::Duration::from_secs(5))
        .with_retries(4);
    socket2::SockRef::from(sock).set_tcp_keepalive(&ka)
}

/// A fresh challenge or nonce for the handshake.
pub fn fresh_nonce() -> String {
    crate::secret::random_hex(16)
}

/// A challenge or nonce as the handshake accepts it: 16 to 64 bytes of hex.
pub fn valid_nonce(n: &str) -> bool {
    (32..=128).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One NTP-style clock sample, all in µs: sender sent `t0`, receiver got it at `t1`
/// and answered at `t2`, sender got the answer at `t3`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockSample {
    pub t0: i64,
    pub t1: i64,
    pub t2: i64,
    pub t3: i64,
}

impl ClockSample {
    /// Receiver clock minus sender clock.
    pub fn offset_us(&self) -> i64 {
        ((self.t1 - self.t0) + (self.t2 - self.t3)) / 2
    }

    /// Round-trip time spent on the network.
    pub fn delay_us(&self) -> i64 {
        (self.t3 - self.t0) - (self.t2 - self.t1)
    }
}

/// Offset estimate from several samples: the one with the shortest round trip wins, as
/// it has the least room for asymmetric delay. Returns (offset, delay) in µs.
pub fn estimate_offset(samples: &[ClockSample]) -> Option<(i64, i64)> {
    samples
        .iter()
        .min_by_key(|s| s.delay_us())
        .map(|s| (s.offset_us(), s.delay_us()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    fn entry(name: &str) -> ContainerEntry {
        ContainerEntry {
            name: name.into(),
            archive: format!("{name}.tar.zst"),
            size: 10,
            digest: "a".repeat(64),
            image_id: "abc".into(),
            file_locks: false,
            tcp_established: false,
            tcp_close: false,
            after: vec![],
            addresses: vec![],
            lazy: None,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            run_id: "run-1".into(),
            containers: vec![entry("db"), entry("web")],
            data: vec!["/srv/app".into()],
            down_us: 1,
            clock_offset_us: 0,
            pod: None,
        }
    }

    #[test]
    fn manifest_accepts_a_good_one() {
        manifest().validate("run-1").unwrap();
    }

    #[test]
    fn a_pod_travels_only_when_there_is_one_and_is_checked() {
        // Without a pod the manifest is what older receivers read.
        let text = serde_json::to_string(&manifest()).unwrap();
        assert!(!text.contains("pod"), "{text}");
        let mut m = manifest();
        m.pod = Some(Box::new(PodSpec {
            name: "pp".into(),
            share: vec!["ipc".into(), "net".into(), "uts".into()],
            publish: vec!["8085:80/tcp".into()],
            hostname: "pphost".into(),
            labels: [("app".to_string(), "pp".to_string())].into(),
            infra_image: "localhost/migrate-pause:latest".into(),
        }));
        m.validate("run-1").unwrap();
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        m.pod.as_mut().unwrap().infra_image = "--privileged".into();
        assert!(
            matches!(m.validate("run-1"), Err(ProtocolError::Manifest(e)) if e.contains("infra image"))
        );
    }

    #[test]
    fn manifest_rejects_path_components_and_bad_fields() {
        for archive in ["../x", "a/b", "/etc/passwd", ".hidden", "", "a b"] {
            let mut m = manifest();
            m.containers[0].archive = archive.into();
            assert!(m.validate("run-1").is_err(), "accepted archive {archive:?}");
        }
        let mut m = manifest();
        m.run_id = "other".into();
        assert!(m.validate("run-1").is_err());
        let mut m = manifest();
        m.containers[1].name = "db".into();
        assert!(m.validate("run-1").is_err(), "duplicate names");
        let mut m = manifest();
        m.containers[0].digest = "XYZ".into();
        assert!(m.validate("run-1").is_err());
        let mut m = manifest();
        m.containers.clear();
        assert!(m.validate("run-1").is_err());
        let mut m = manifest();
        m.data = vec!["relative/path".into()];
        assert!(m.validate("run-1").is_err());
        let mut m = manifest();
        m.data = vec!["/srv/../etc".into()];
        assert!(m.validate("run-1").is_err());
        let mut m = manifest();
        m.containers[0].name = "-rf".into();
        assert!(m.validate("run-1").is_err());
    }

    #[test]
    fn restore_waves_follow_dependencies() {
        let mut m = manifest();
        let names = |w: &Vec<Vec<&ContainerEntry>>| -> Vec<Vec<String>> {
            w.iter()
                .map(|wave| wave.iter().map(|c| c.name.clone()).collect())
                .collect()
        };
        assert_eq!(
            names(&restore_waves(&m.containers).unwrap()),
            vec![vec!["db", "web"]]
        );
        m.containers[0].after = vec!["web".into()];
        assert_eq!(
            names(&restore_waves(&m.containers).unwrap()),
            vec![vec!["web"], vec!["db"]]
        );
        m.validate("run-1").unwrap();
        m.containers[1].after = vec!["db".into()];
        assert!(restore_waves(&m.containers).is_none());
        assert!(m.validate("run-1").is_err(), "cycle");
        let mut m = manifest();
        m.containers[0].after = vec!["ghost".into()];
        assert!(m.validate("run-1").is_err(), "unknown dependency");
    }

    #[test]
    fn ids_and_names() {
        assert!(valid_run_id("20261125T073000-ab12"));
        assert!(!valid_run_id("../../etc"));
        assert!(!valid_run_id(""));
        assert!(valid_container_name("my_db.1"));
        assert!(!valid_container_name(".db"));
    }

    fn auth() -> Auth {
        Auth::new(b"secret-secret".to_vec(), "challenge1", "nonce1")
    }

    #[test]
    fn only_the_holder_of_the_secret_can_prove_it() {
        let a = auth();
        let proof = a.proof();
        assert!(a.check_proof(&proof));
        assert!(!Auth::new(b"guess".to_vec(), "challenge1", "nonce1").check_proof(&proof));
        // A proof made for another challenge (a replay) or another nonce does not count.
        assert!(!Auth::new(b"secret-secret".to_vec(), "challenge2", "nonce1").check_proof(&proof));
        assert!(!Auth::new(b"secret-secret".to_vec(), "challenge1", "nonce2").check_proof(&proof));
        assert!(!a.check_proof("zz"));
        assert!(!a.check_proof(""));
        // The proof is not a frame MAC of either direction (no reflection).
        assert_ne!(proof, a.sign(Direction::ToSender, 0, ""));
        assert_ne!(proof, a.sign(Direction::ToReceiver, 0, ""));
    }

    #[test]
    fn frames_round_trip_with_mac() {
        let a = auth();
        let msg = ToReceiver::TimeProbe { t0: 42 };
        let frame = encode(&msg, 3, Some((&a, Direction::ToReceiver))).unwrap();
        let back: ToReceiver = decode(
            &frame[..frame.len() - 1],
            3,
            Some((&a, Direction::ToReceiver)),
        )
        .unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn wrong_secret_wrong_direction_replay_and_missing_mac_are_refused() {
        let a = auth();
        let msg = ToReceiver::Ready {
            manifest: manifest(),
        };
        let frame = encode(&msg, 1, Some((&a, Direction::ToReceiver))).unwrap();
        let line = &frame[..frame.len() - 1];
        let other = Auth::new(b"guess".to_vec(), "challenge1", "nonce1");
        assert!(matches!(
            decode::<ToReceiver>(line, 1, Some((&other, Direction::ToReceiver))),
            Err(ProtocolError::BadMac)
        ));
        let other_nonce = Auth::new(b"secret-secret".to_vec(), "challenge1", "nonce2");
        assert!(matches!(
            decode::<ToReceiver>(line, 1, Some((&other_nonce, Direction::ToReceiver))),
            Err(ProtocolError::BadMac)
        ));
        assert!(matches!(
            decode::<ToReceiver>(line, 1, Some((&a, Direction::ToSender))),
            Err(ProtocolError::BadMac)
        ));
        assert!(matches!(
            decode::<ToReceiver>(line, 2, Some((&a, Direction::ToReceiver))),
            Err(ProtocolError::Sequence { .. })
        ));
        let plain = encode(&msg, 1, None).unwrap();
        assert!(matches!(
            decode::<ToReceiver>(
                &plain[..plain.len() - 1],
                1,
                Some((&a, Direction::ToReceiver))
            ),
            Err(ProtocolError::BadMac)
        ));
        // A MAC'd frame whose text was altered after signing.
        let text = String::from_utf8(line.to_vec())
            .unwrap()
            .replace("db", "dc");
        assert!(
            decode::<ToReceiver>(text.as_bytes(), 1, Some((&a, Direction::ToReceiver))).is_err()
        );
    }

    #[test]
    fn strict_parsing() {
        assert!(decode::<ToReceiver>(b"OK", 0, None).is_err());
        assert!(
            decode::<ToReceiver>(b"{\"v\":2,\"seq\":0,\"msg\":\"{}\",\"mac\":null}", 0, None)
                .is_err()
        );
        let unknown =
            br#"{"v":2,"seq":0,"msg":"{\"type\":\"time_probe\",\"t0\":1,\"x\":2}","mac":null}"#;
        assert!(decode::<ToReceiver>(unknown, 0, None).is_err());
        let version = br#"{"v":9,"seq":0,"msg":"{\"type\":\"time_probe\",\"t0\":1}","mac":null}"#;
        assert!(matches!(
            decode::<ToReceiver>(version, 0, None),
            Err(ProtocolError::Version(9))
        ));
    }

    #[tokio::test]
    async fn oversized_frames_are_cut_off() {
        let big = vec![b'x'; MAX_FRAME + 10];
        let mut r = BufReader::new(&big[..]);
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ProtocolError::TooLarge)
        ));
        let mut r = BufReader::new(&b"abc"[..]);
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ProtocolError::Closed)
        ));
    }

    #[tokio::test]
    async fn channel_over_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, w) = sock.into_split();
            let mut ch = Channel::new(BufReader::new(r), w, Direction::ToSender);
            let hello: ToReceiver = ch.recv().await.unwrap();
            assert!(matches!(hello, ToReceiver::Hello { .. }));
            ch.send(&ToSender::Welcome {
                protocol: PROTOCOL_VERSION,
                receiver_version: "t".into(),
                hostname: "b".into(),
                nonce: "nonce1".into(),
                proof: Some(auth().proof()),
            })
            .await
            .unwrap();
            ch.authenticate(auth());
            let probe: ToReceiver = ch.recv().await.unwrap();
            let ToReceiver::TimeProbe { t0 } = probe else {
                panic!("{probe:?}")
            };
            ch.send(&ToSender::TimeReply { t0, t1: 5, t2: 6 })
                .await
                .unwrap();
        });
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (r, w) = sock.into_split();
        let mut ch = Channel::new(BufReader::new(r), w, Direction::ToReceiver);
        ch.send(&ToReceiver::Hello {
            protocol: PROTOCOL_VERSION,
            run_id: "r".into(),
            sender_version: "t".into(),
            source_host: "a".into(),
            label: String::new(),
            challenge: Some("challenge1".into()),
        })
        .await
        .unwrap();
        let welcome: ToSender = ch.recv().await.unwrap();
        let ToSender::Welcome {
            proof: Some(proof), ..
        } = welcome
        else {
            panic!("{welcome:?}")
        };
        assert!(auth().check_proof(&proof));
        ch.authenticate(auth());
        ch.send(&ToReceiver::TimeProbe { t0: 1 }).await.unwrap();
        let reply: ToSender = ch.recv().await.unwrap();
        assert_eq!(
            reply,
            ToSender::TimeReply {
                t0: 1,
                t1: 5,
                t2: 6
            }
        );
        server.await.unwrap();
    }

    #[test]
    fn clock_offset_maths() {
        // Receiver is 1 s ahead; 10 ms each way; 2 ms processing.
        let s = ClockSample {
            t0: 0,
            t1: 1_010_000,
            t2: 1_012_000,
            t3: 22_000,
        };
        assert_eq!(s.offset_us(), 1_000_000);
        assert_eq!(s.delay_us(), 20_000);
        // Asymmetric sample with a longer round trip loses to the clean one.
        let noisy = ClockSample {
            t0: 0,
            t1: 1_090_000,
            t2: 1_091_000,
            t3: 101_000,
        };
        assert_eq!(estimate_offset(&[noisy, s]), Some((1_000_000, 20_000)));
        assert_eq!(estimate_offset(&[]), None);
        // Receiver behind the sender.
        let behind = ClockSample {
            t0: 5_000_000,
            t1: 3_000_100,
            t2: 3_000_200,
            t3: 5_000_300,
        };
        assert_eq!(behind.offset_us(), -2_000_000);
    }
}
