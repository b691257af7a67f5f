//! The lab itself works: podman + CRIU + SSH move a container between two hosts without
//! our tool (scripts/lab smoke checkpoints on a, copies with scp, restores on b, and
//! checks that the in-memory counter continued).
mod common;

#[test]
fn lab_moves_a_container_by_hand_and_state_continues() {
    common::require_lab!();
    common::kill_receivers();
    for h in ["a", "b"] {
        common::lab(&["workload", "down", h]).ok();
    }
    let out = common::lab(&["smoke"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
}
