//! The receiver's part in moving a container's own address ([`crate::engine::address`]):
//! the guard around a wave's restore when its connections are kept, and the
//! announcement once the containers run.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::Ctx;
use crate::engine::address::{self, Guard};
use crate::engine::podman::Podman;
use crate::protocol::ContainerEntry;

/// How long the guard's addresses stay dropped if nobody removes them: longer than any
/// one wave's restore has taken here (seconds, tens for GiBs of memory), short enough
/// that a receiver killed half-way does not cut the address off for long.
const GUARD_EXPIRES: Duration = Duration::from_secs(120);

/// Installs the guard for the wave's containers whose connections are kept and whose
/// address moves; `None` when none has such an address. A guard that cannot be set up
/// is reported and the restore goes on: the connections may then be reset, the
/// service is not held back for it.
pub(super) async fn guard(wave: &[&ContainerEntry], run_id: &str, ctx: &Ctx) -> Option<Guard> {
    let mut by_parent: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for c in wave.iter().filter(|c| c.tcp_established) {
        for a in &c.addresses {
            match address::parent_here(&a.network).await {
                Ok(parent) => by_parent.entry(parent).or_default().extend(&a.ips),
                Err(e) => {
                    ctx.ui
                        .warn(&format!("cannot guard {}'s address: {e:#}", c.name));
                }
            }
        }
    }
    if by_parent.is_empty() {
        return None;
    }
    match Guard::install(run_id, &by_parent, GUARD_EXPIRES).await {
        Ok(g) => Some(g),
        Err(e) => {
            ctx.ui.warn(&format!(
                "cannot hold TCP to the moving addresses back during the restore ({e:#}): their connections may be reset"
            ));
            None
        }
    }
}

/// Takes the guard away (its addresses would expire anyway).
pub(super) async fn unguard(guard: Option<Guard>, ctx: &Ctx) {
    if let Some(g) = guard
        && let Err(e) = g.remove().await
    {
        ctx.ui.warn(&format!(
            "cannot remove the guard of the moving addresses ({e:#}); its addresses expire within {}s",
            GUARD_EXPIRES.as_secs()
        ));
    }
}

/// Tells the segment where the restored containers' addresses are now.
pub(super) async fn announce(containers: &[ContainerEntry], ctx: &Ctx) {
    let podman = Podman;
    for c in containers.iter().filter(|c| !c.addresses.is_empty()) {
        let pid = match podman.inspect(std::slice::from_ref(&c.name)).await {
            Ok(v) if !v.is_empty() => v[0].pid,
            Ok(_) => continue,
            Err(e) => {
                ctx.ui
                    .warn(&format!("cannot announce {}'s address: {e}", c.name));
                continue;
            }
        };
        for ip in c.addresses.iter().flat_map(|a| &a.ips) {
            match address::announce(pid, *ip).await {
                Ok(()) => ctx.ui.info(&format!("announced {ip} ({})", c.name)),
                Err(e) => ctx
                    .ui
                    .warn(&format!("cannot announce {ip} ({}): {e:#}", c.name)),
            }
        }
    }
}
