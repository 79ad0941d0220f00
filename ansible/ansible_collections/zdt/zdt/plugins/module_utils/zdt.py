# -*- coding: utf-8 -*-
# Copyright: zdt developers
# MIT OR Apache-2.0
"""What every zdt module shares: running zdt-ctl with --json, and its failures as Ansible's.

zdt-ctl is the only interface: these modules keep no state of their own and never touch the
pinned maps, so a play and an operator at the shell see and change the same thing.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os

from ansible.module_utils.basic import AnsibleModule

# zdt-ctl's exit codes (README, "Exit codes"); a failed task carries the code as `rc` and this
# as `zdt_error`, so that a play can branch on what happened.
EXIT_CODES = {
    1: "internal",
    2: "bad-input",
    3: "not-attached",
    4: "readiness-timeout",
    5: "process-died",
    6: "permission-denied",
    7: "refused",
    8: "rolled-back",
}

def module(argument_spec, **kwargs):
    """An AnsibleModule with `argument_spec` and the options every zdt module has (the doc
    fragment zdt.zdt.zdt); every zdt module supports check mode."""
    spec = dict(zdt_ctl=dict(type="path", default="zdt-ctl"))
    spec.update(argument_spec)
    return AnsibleModule(argument_spec=spec, supports_check_mode=True, **kwargs)


NOT_ATTACHED = 3


def run(module, args, json_out=True, tolerate=()):
    """Runs zdt-ctl ARGS [--json]; its parsed report, or fail_json with its exit code and message
    (None for an exit code in `tolerate`)."""
    cmd = [module.params["zdt_ctl"]] + [str(a) for a in args]
    if json_out:
        cmd.append("--json")
    rc, out, err = module.run_command(cmd)
    if rc in tolerate:
        return None
    if rc != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        # zdt-ctl's last line is the error; it names the bad input and what to do.
        msg = lines[-1] if lines else "zdt-ctl exited with %d" % rc
        if msg.startswith("zdt-ctl: "):
            msg = msg[len("zdt-ctl: "):]
        module.fail_json(
            msg=msg, rc=rc, zdt_error=EXIT_CODES.get(rc, "unknown"), cmd=cmd, stdout=out, stderr=err
        )
    if not json_out:
        return out
    try:
        return json.loads(out)
    except ValueError as e:
        module.fail_json(msg="zdt-ctl printed no JSON: %s" % e, cmd=cmd, stdout=out, stderr=err)


def status(module, port=None, allow_none=False):
    """The status of every attached port (a list), or of `port`; with `allow_none`, an empty list
    where zdt-ctl says that no port (or not `port`) is attached."""
    tolerate = (NOT_ATTACHED,) if allow_none else ()
    report = run(module, ["status"] + ([port] if port else []), tolerate=tolerate)
    if report is None:
        return []
    return report if isinstance(report, list) else [report]


def one_port(module, ports):
    """`ports` as given, or the one attached port; fails when several are attached and none is named."""
    if ports:
        return ports
    attached = [s["port"] for s in status(module, allow_none=True) if s.get("attached")]
    if len(attached) != 1:
        module.fail_json(
            msg="%d ports are attached (%s): name one with port"
            % (len(attached), ", ".join(str(p) for p in attached) or "none"),
            rc=2,
            zdt_error="bad-input",
        )
    return attached


def descends_from(pid, ancestor):
    """Whether process `pid` is `ancestor` or one of its descendants (by /proc's parent links)."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid == ancestor:
            return True
        try:
            with open("/proc/%d/stat" % pid) as f:
                stat = f.read()
        except (IOError, OSError):
            return False
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        seen += 1
    return pid == ancestor


def serving_pids(port_status, role):
    return [m["pid"] for m in port_status["members"] if m["role"] == role]


def exists(pid):
    return os.path.exists("/proc/%d" % pid)
