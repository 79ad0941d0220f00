#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: zdt developers
# MIT OR Apache-2.0
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: rollback
short_description: Give a port back to the version before, while it still runs, with zdt
description:
  - Runs C(zdt-ctl rollback PORT) on the host. The previous active set takes new connections
    again at once; the current one drains. Nothing is started or stopped.
  - The version before must still run (a deploy without O(zdt.zdt.promote#module:stop_old), or
    during its probation). Once it was stopped there is nothing to roll back to (rc 7, nothing
    changed); deploy the previous release instead (the P(zdt.zdt.rollback#playbook) playbook).
version_added: "0.1.0"
author:
  - zdt developers
extends_documentation_fragment:
  - zdt.zdt.zdt
options:
  port:
    description: The attached port; needed only when several are attached.
    type: int
notes:
  - Check mode reports C(changed=true) when the port has draining members (the version before is
    among them), without running anything.
"""

EXAMPLES = r"""
- name: Back to the previous version
  zdt.zdt.rollback:
    port: 80
"""

RETURN = r"""
report:
  description: C(zdt-ctl rollback --json)'s report (restored, canary, demoted pids).
  returned: when a rollback ran
  type: dict
"""

from ansible_collections.zdt.zdt.plugins.module_utils import zdt


def main():
    module = zdt.module(
        dict(port=dict(type="int")),
    )
    port = zdt.one_port(module, [module.params["port"]] if module.params["port"] else None)[0]
    if module.check_mode:
        draining = zdt.serving_pids(zdt.status(module, port)[0], "draining")
        module.exit_json(changed=bool(draining), draining=draining)
    report = zdt.run(module, ["rollback", port])
    module.exit_json(changed=True, report=report)


if __name__ == "__main__":
    main()
