#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: zdt developers
# MIT OR Apache-2.0
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: promote
short_description: Hand a port over to a process, with zdt
description:
  - Runs C(zdt-ctl promote PID) on the host. zdt waits for PID to listen on the port and for its
    readiness check to answer 200, then sends every new connection to it; connections already
    queued on the previous version are moved by the kernel, none is refused or reset.
  - Idempotent. When PID (or processes it started) already holds the role asked for (active, or
    canary with O(weight)), nothing is run and the result is C(changed=false).
  - A failure changes nothing on the host, or zdt restored what it had changed (rc 8). The
    task's C(rc) is zdt-ctl's exit code and C(zdt_error) its name.
version_added: "0.1.0"
author:
  - zdt developers
extends_documentation_fragment:
  - zdt.zdt.zdt
options:
  pid:
    description: The process to promote, e.g. a systemd unit's MainPID.
    type: int
    required: true
  port:
    description:
      - The attached ports to promote it on; needed only when several are attached.
    type: list
    elements: int
  readyz:
    description: Readiness URL, on the process's own admin port; the switch happens once it answers 200.
    type: str
  probe:
    description: Check readiness at this path through the public port itself (for apps without an admin port).
    type: str
  no_readyz:
    description: Skip the readiness check.
    type: bool
    default: false
  timeout:
    description: How long to wait for the process to listen and answer 200 (zdt-ctl's default is 60s).
    type: str
  weight:
    description: Canary. Send this percentage (1-99) of new connections to the process.
    type: int
  probation:
    description:
      - After the switch, keep checking the process this long. If it dies or stops answering 200,
        zdt restores the previous version and the task fails with rc 8.
    type: str
  stop_old:
    description: After the switch (and probation), SIGTERM the previous version and wait for it to exit.
    type: bool
    default: false
  drain_timeout:
    description: How long O(stop_old) waits for the previous version to exit.
    type: str
notes:
  - Check mode reports whether the task would promote, from C(zdt-ctl status).
"""

EXAMPLES = r"""
- name: Hand :80 over to the new instance once it is ready, then stop the old one
  zdt.zdt.promote:
    pid: "{{ new_pid }}"
    readyz: http://127.0.0.1:8082/readyz
    probation: 10s
    stop_old: true

- name: A canary with 10 % of new connections
  zdt.zdt.promote:
    pid: "{{ new_pid }}"
    readyz: http://127.0.0.1:8082/readyz
    weight: 10
"""

RETURN = r"""
changed:
  description: Whether a promote ran (false when the process already had the role).
  returned: always
  type: bool
report:
  description: C(zdt-ctl promote --json)'s report, one per port (pid, slots, drained, stopped, timings).
  returned: when a promote ran
  type: list
  elements: dict
"""

import os

from ansible_collections.zdt.zdt.plugins.module_utils import zdt


def has_role(module, port, pid, role):
    """Whether every member of `role` on `port` is `pid` or one of its processes (nginx's
    workers, of their master), and there is one. A process this module runs under (init, sshd)
    is no service, though every member descends from it: zdt-ctl decides for it."""
    holders = zdt.serving_pids(zdt.status(module, port)[0], role)
    if pid in holders:
        return all(zdt.descends_from(p, pid) for p in holders)
    if zdt.descends_from(os.getpid(), pid):
        return False
    return bool(holders) and all(zdt.descends_from(p, pid) for p in holders)


def main():
    module = zdt.module(
        dict(
            pid=dict(type="int", required=True),
            port=dict(type="list", elements="int"),
            readyz=dict(type="str"),
            probe=dict(type="str"),
            no_readyz=dict(type="bool", default=False),
            timeout=dict(type="str"),
            weight=dict(type="int"),
            probation=dict(type="str"),
            stop_old=dict(type="bool", default=False),
            drain_timeout=dict(type="str"),
        ),
        mutually_exclusive=[("readyz", "probe", "no_readyz")],
        required_one_of=[("readyz", "probe", "no_readyz")],
    )
    p = module.params
    pid = p["pid"]
    if not zdt.exists(pid):
        module.fail_json(msg="pid %d does not exist on this host" % pid, rc=2, zdt_error="bad-input")
    ports = zdt.one_port(module, p["port"])
    role = "canary" if p["weight"] is not None else "active"
    # A canary's share may change with another weight: only a full promote is known to be done.
    if role == "active" and all(has_role(module, port, pid, role) for port in ports):
        module.exit_json(changed=False, msg="pid %d is already active" % pid)
    if module.check_mode:
        module.exit_json(changed=True, msg="pid %d would be promoted" % pid)

    args = ["promote", pid]
    for port in ports:
        args += ["--port", port]
    for name in ("readyz", "probe", "timeout", "weight", "probation", "drain_timeout"):
        if p[name] is not None:
            args += ["--" + name.replace("_", "-"), p[name]]
    if p["no_readyz"]:
        args.append("--no-readyz")
    if p["stop_old"]:
        args.append("--stop-old")
    report = zdt.run(module, args)
    module.exit_json(changed=True, report=report if isinstance(report, list) else [report])


if __name__ == "__main__":
    main()
