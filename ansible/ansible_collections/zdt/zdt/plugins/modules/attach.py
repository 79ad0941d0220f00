#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: zdt developers
# MIT OR Apache-2.0
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: attach
short_description: Put a port under zdt
description:
  - Runs C(zdt-ctl attach ADDR) when the port is not attached yet. The processes already
    listening keep serving. C(changed=false) when it is attached as asked.
version_added: "0.1.0"
author:
  - zdt developers
extends_documentation_fragment:
  - zdt.zdt.zdt
options:
  addr:
    description: "[ADDR]:PORT, as zdt-ctl attach takes it, e.g. C(:80)."
    type: str
    required: true
"""

EXAMPLES = r"""
- name: Put :80 under zdt
  zdt.zdt.attach:
    addr: ":80"
"""

RETURN = r"""
stdout:
  description: What C(zdt-ctl attach) printed.
  returned: when the port was attached by this task
  type: str
"""

from ansible_collections.zdt.zdt.plugins.module_utils import zdt


def main():
    module = zdt.module(
        dict(addr=dict(type="str", required=True)),
    )
    addr = module.params["addr"]
    port = addr.rsplit(":", 1)[-1]
    if not port.isdigit():
        module.fail_json(msg="addr %r: give [ADDR]:PORT, e.g. :80" % addr, rc=2, zdt_error="bad-input")
    attached = [s for s in zdt.status(module, allow_none=True) if s.get("attached") and str(s["port"]) == port]
    if attached:
        module.exit_json(changed=False, spec=attached[0]["spec"])
    if module.check_mode:
        module.exit_json(changed=True)
    module.exit_json(changed=True, stdout=zdt.run(module, ["attach", addr], json_out=False))
if __name__ == "__main__":
    main()
