"""The test processes' gc speed-up (tests/cpu_distributed/gc_freeze.py) freezes only when asked,
and garbage made after a freeze is still collected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from axolotl_cli import CPU_DISTRIBUTED_DIR, axolotl_command
from cpu_distributed import gc_freeze

# Survivors of a full collection are frozen; a cycle made afterwards is still collected.
PROBE = """
import gc, json, weakref
class Node: pass
kept = [Node() for _ in range(1000)]
gc.collect()
frozen = gc.get_freeze_count()
cycle = Node(); cycle.self = cycle
alive = weakref.ref(cycle)
del cycle
gc.collect()
print(json.dumps({"frozen": frozen, "cycle_collected": alive() is None}))
"""


def _probe(flag: str | None) -> dict[str, object]:
    env = {key: value for key, value in os.environ.items() if key != gc_freeze.ENV_VAR}
    env["PYTHONPATH"] = str(CPU_DISTRIBUTED_DIR)
    if flag is not None:
        env[gc_freeze.ENV_VAR] = flag
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_a_subprocess_freezes_the_survivors_of_a_full_collection_only_when_asked():
    # Some CPython 3.12 builds start with a few hundred objects frozen already.
    unasked = _probe(None)["frozen"]
    assert _probe("0")["frozen"] == unasked
    assert _probe("1")["frozen"] > unasked + 1000


def test_garbage_made_after_a_freeze_is_still_collected():
    assert _probe("1")["cycle_collected"] is True


def test_the_test_session_and_its_subprocesses_ask_for_it(tmp_path):
    # tests/conftest.py sets the variable unless the developer did (0: off, to compare).
    asked = os.environ[gc_freeze.ENV_VAR]
    assert gc_freeze.installed() == (asked == "1")
    _, env = axolotl_command("train", {"base_model": "unused"}, tmp_path)
    assert env[gc_freeze.ENV_VAR] == asked
    assert str(CPU_DISTRIBUTED_DIR) in env["PYTHONPATH"].split(os.pathsep)
