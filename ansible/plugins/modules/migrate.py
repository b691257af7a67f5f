#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Ansible module: one `migrate send`, `check` or `drain` on the source host."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: migrate
short_description: Move running podman containers to another host with migrate
version_added: "0.1.0"
description:
  - Runs C(migrate) on the managed host (the source) and returns its machine-readable
    record(s). The target is reached over SSH from the source, as C(migrate send --to) does;
    the receiver is started there over that connection (C(--spawn-receiver) or
    C(--install-receiver)).
  - C(command=send) moves the named containers or pod. When none of them is on this host any
    more, nothing is done and the task is not changed (a re-run after a move).
  - C(command=drain) empties this host onto the targets in O(to) (all its running containers,
    or the named ones), placing each unit where there is room.
  - C(command=check) only checks, and never changes anything.
  - In check mode, C(send) runs C(migrate check) and C(drain) runs C(migrate drain --plan).
options:
  command:
    description: What to run.
    type: str
    choices: [send, check, drain]
    default: send
  to:
    description:
      - The target as C([USER@]HOST) for C(send) and C(check); for C(drain), one or more
        targets.
    type: list
    elements: str
    required: true
  containers:
    description:
      - Containers or a pod to move. Required for C(send) and C(check); for C(drain), the
        units to move (default every running container of the host).
    type: list
    elements: str
    default: []
  data:
    description: Data folders synced to the same path on the target (C(send), C(check)).
    type: list
    elements: str
    default: []
  receiver:
    description:
      - C(install) copies the source's migrate binary to the target and starts it as the
        receiver; C(spawn) starts the target's own migrate of the same version; C(none)
        expects a receiver already listening.
    type: str
    choices: [install, spawn, none]
    default: install
  tcp:
    description: What happens to the containers' TCP connections (C(--tcp)).
    type: str
    choices: [close, established, refuse]
    default: close
  ship_image:
    description: Copy an image the target lacks (C(--ship-image)).
    type: bool
    default: false
  parallel:
    description: C(drain) only, moves at a time on this host (C(--parallel)).
    type: int
    default: 1
  keep_going:
    description: C(drain) only, go on after a unit failed (C(--keep-going)).
    type: bool
    default: false
  label:
    description: Free text for the records' label column.
    type: str
    default: ""
  extra_args:
    description: More arguments for migrate, placed before the names.
    type: list
    elements: str
    default: []
  binary:
    description: The migrate executable on the managed host.
    type: str
    default: migrate
author:
  - migrate developers
"""

EXAMPLES = r"""
- name: Move db and web to host b
  migrate.fleet.migrate:
    to: [root@b.example]
    containers: [db, web]
    data: [/srv/app]

- name: Drain this host onto b and c, two moves at a time
  migrate.fleet.migrate:
    command: drain
    to: [root@b.example, root@c.example]
    parallel: 2
"""

RETURN = r"""
record:
  description: The record of the move (C(send)), or the summary record (C(drain)).
  returned: when migrate printed one
  type: dict
records:
  description: Every record migrate printed, one per unit and the summary last (C(drain)).
  returned: always
  type: list
  elements: dict
report:
  description: The C(check --format json) report (C(check), and C(send) in check mode).
  returned: when a check ran
  type: dict
rc:
  description: migrate's exit status (0 done, 1 failed and undone, 2 refused, 3 needs a human).
  returned: when migrate ran
  type: int
stderr:
  description: What migrate said to people.
  returned: when migrate ran
  type: str
cmd:
  description: The command line that ran.
  returned: when migrate ran
  type: list
  elements: str
"""

import json

from ansible.module_utils.basic import AnsibleModule

# migrate's exit statuses.
EXIT_MEANING = {
    1: "failed and undone: everything runs where it ran before",
    2: "refused before anything was frozen",
    3: "a human is needed: read the record's error",
}


def receiver_flags(p):
    return {"install": ["--install-receiver"], "spawn": ["--spawn-receiver"], "none": []}[p["receiver"]]


def common_flags(p):
    args = ["--tcp", p["tcp"]]
    if p["ship_image"]:
        args.append("--ship-image")
    if p["label"]:
        args += ["--label", p["label"]]
    return args


def data_flags(p):
    out = []
    for d in p["data"]:
        out += ["--data", d]
    return out


def json_lines(text):
    """Every line of stdout that is a JSON object, in order."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def present_here(module, names):
    """The names that are containers or pods on this host."""
    podman = module.get_bin_path("podman", required=True)
    here = []
    for n in names:
        for kind in ("container", "pod"):
            rc, _, _ = module.run_command([podman, kind, "exists", n])
            if rc == 0:
                here.append(n)
                break
    return here


def run_check(module, p, binary):
    cmd = [binary, "check", "--format", "json", "--to", p["to"][0]]
    cmd += receiver_flags(p) + common_flags(p) + data_flags(p) + p["extra_args"] + p["containers"]
    rc, out, err = module.run_command(cmd)
    docs = json_lines(out)
    result = dict(cmd=cmd, rc=rc, stderr=err, records=[], report=docs[0] if docs else {})
    return rc, result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            command=dict(type="str", choices=["send", "check", "drain"], default="send"),
            to=dict(type="list", elements="str", required=True),
            containers=dict(type="list", elements="str", default=[]),
            data=dict(type="list", elements="str", default=[]),
            receiver=dict(type="str", choices=["install", "spawn", "none"], default="install"),
            tcp=dict(type="str", choices=["close", "established", "refuse"], default="close"),
            ship_image=dict(type="bool", default=False),
            parallel=dict(type="int", default=1),
            keep_going=dict(type="bool", default=False),
            label=dict(type="str", default=""),
            extra_args=dict(type="list", elements="str", default=[]),
            binary=dict(type="str", default="migrate"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    binary = module.get_bin_path(p["binary"], required=True)
    command = p["command"]
    if command in ("send", "check") and (len(p["to"]) != 1 or not p["containers"]):
        module.fail_json(msg="%s needs one target in 'to' and the names in 'containers'" % command)

    if command == "send":
        here = present_here(module, p["containers"])
        if not here:
            module.exit_json(
                changed=False,
                records=[],
                msg="none of %s is on this host: nothing to move" % ", ".join(p["containers"]),
            )
        if len(here) != len(p["containers"]):
            gone = [n for n in p["containers"] if n not in here]
            module.fail_json(
                msg="only some of them are here (%s are not): move or name them together"
                % ", ".join(gone),
                records=[],
            )

    if command == "check" or (command == "send" and module.check_mode):
        rc, result = run_check(module, p, binary)
        ready = result["report"].get("verdict") == "ready"
        result["changed"] = command == "send" and ready
        if rc != 0 or not ready:
            module.fail_json(msg="a migration would be refused: %s" % first_failure(result["report"]), **result)
        module.exit_json(**result)

    if command == "send":
        cmd = [binary, "send", "--format", "json", "--to", p["to"][0]]
        cmd += receiver_flags(p) + common_flags(p) + data_flags(p) + p["extra_args"] + p["containers"]
    else:
        cmd = [binary, "drain", "--format", "json", "--to", ",".join(p["to"])]
        cmd += ["--parallel", str(p["parallel"])]
        if p["receiver"] == "install":
            cmd.append("--install-receiver")
        if p["keep_going"]:
            cmd.append("--keep-going")
        if module.check_mode:
            cmd.append("--plan")
        cmd += common_flags(p) + p["extra_args"] + p["containers"]

    rc, out, err = module.run_command(cmd)
    records = json_lines(out)
    result = dict(cmd=cmd, rc=rc, stderr=err, records=records, record=records[-1] if records else {})
    moved = [r for r in records if r.get("outcome") == "ok" and r.get("role") not in ("drain", "plan")]
    result["changed"] = bool(moved) and not module.check_mode
    if rc != 0:
        why = result["record"].get("error") or EXIT_MEANING.get(rc, "exit status %d" % rc)
        module.fail_json(msg="migrate %s: %s" % (command, why), **result)
    module.exit_json(**result)


def first_failure(report):
    for f in report.get("findings", []):
        if f.get("severity") == "fail":
            return f.get("text", "")
    return "see the report"


if __name__ == "__main__":
    main()
