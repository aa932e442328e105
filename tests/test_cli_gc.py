"""The CLI entry's garbage-collector settings (`cli.main`): off while importing, heap frozen at exit,
and untouched when `main` is called in-process with arguments (tests, embedding)."""

from __future__ import annotations

import gc
import subprocess
import sys

from lorabake import cli

PROBE = """
import gc, sys
from lorabake import cli
sys.argv = ["lorabake", "merge", "--help"]
before = gc.isenabled()
try:
    cli.main()
except SystemExit:
    pass
print(before, gc.isenabled(), gc.get_freeze_count() > 0)
"""


def test_own_process_freezes_what_exists_at_exit():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()[-3:]
    assert out == ["True", "False", "True"]  # --help returns before any import: the GC stays off to the end


def test_in_process_calls_leave_the_collector_alone():
    frozen = gc.get_freeze_count()
    try:
        cli.main(["merge", "--help"])
    except SystemExit:
        pass
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_a_command_collects_again_once_its_imports_are_in():
    gc.disable()
    try:
        cli._imports_done()
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()
