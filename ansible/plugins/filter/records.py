# -*- coding: utf-8 -*-
"""Filters for migrate's records."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import csv
import io

DOCUMENTATION = r"""
---
name: records_csv
short_description: migrate records as one CSV
version_added: "0.1.0"
description:
  - Turns a list of migrate records (the JSON objects C(migrate send/drain --format json)
    prints) into CSV text with one header line, the columns in the order they first appear.
options:
  _input:
    description: The records.
    type: list
    elements: dict
    required: true
author:
  - migrate developers
"""

EXAMPLES = r"""
- name: Write the records of a drain
  ansible.builtin.copy:
    dest: records.csv
    content: "{{ drain_result.records | migrate.fleet.records_csv }}"
    mode: "0644"
"""

RETURN = r"""
_value:
  description: CSV text, a header line then one line per record.
  type: str
"""


def records_csv(records):
    columns = []
    for r in records:
        for k in r:
            if k not in columns:
                columns.append(k)
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow(r)
    return out.getvalue()


class FilterModule(object):
    def filters(self):
        return {"records_csv": records_csv}
