# -*- coding: utf-8 -*-
# Copyright: zdt developers
# MIT OR Apache-2.0
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    """What every zdt module shares: where zdt-ctl is, what it needs, and how it fails."""

    DOCUMENTATION = r"""
options:
  zdt_ctl:
    description: Path of zdt-ctl.
    type: path
    default: zdt-ctl
requirements:
  - zdt-ctl (the zdt package) on the host, run as root
notes:
  - A failure carries zdt-ctl's exit code as C(rc) and its name as C(zdt_error) (C(bad-input),
    C(not-attached), C(readiness-timeout), C(process-died), C(refused), C(rolled-back), ...),
    with zdt-ctl's message, which names the bad input and what to do. A failed zdt-ctl command
    changed nothing.
"""
