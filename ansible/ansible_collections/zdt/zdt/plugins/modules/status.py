#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: zdt developers
# MIT OR Apache-2.0
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: status
short_description: What zdt does for the host's ports, as facts
description:
  - Runs C(zdt-ctl status --json) and sets the fact C(zdt_ports), a dict from port number to
    its status (schema docs/status.schema.json in zdt's repository). Changes nothing.
version_added: "0.1.0"
author:
  - zdt developers
extends_documentation_fragment:
  - zdt.zdt.zdt
options:
  port:
    description: Only this port (default every attached port).
    type: int
"""

EXAMPLES = r"""
- name: Read zdt's state
  zdt.zdt.status:

- name: Fail unless one process serves :80
  ansible.builtin.assert:
    that: zdt_ports['80'].members | selectattr('role', 'eq', 'active') | list | length == 1
"""

RETURN = r"""
ansible_facts:
  description: C(zdt_ports), a dict from port (as a string) to C(zdt-ctl status PORT --json).
  returned: always
  type: dict
"""

from ansible_collections.zdt.zdt.plugins.module_utils import zdt


def main():
    module = zdt.module(
        dict(port=dict(type="int")),
    )
    ports = zdt.status(module, module.params["port"])
    module.exit_json(changed=False, ansible_facts=dict(zdt_ports=dict((str(s["port"]), s) for s in ports)))


if __name__ == "__main__":
    main()
