"""Test subprocesses keep their temporary files in the session's own folder (tests/conftest.py,
`subprocess_tmpdir` in tests/axolotl_cli.py), removed when the session ends: the empty
`torchelastic_*` folders that every torchrun launch leaves no longer pile up in /tmp."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from axolotl_cli import SUBPROCESS_TMPDIR_ENV, axolotl_command

# The longest socket path multiprocessing makes in it: <TMPDIR>/pymp-XXXXXXXX/listener-XXXXXXXX.
_SOCKET_SUFFIX = "/pymp-xxxxxxxx/listener-xxxxxxxx"


def test_axolotl_subprocesses_take_the_sessions_temporary_folder(tmp_path):
    folder = os.environ[SUBPROCESS_TMPDIR_ENV]
    _, env = axolotl_command("train", {}, tmp_path)
    seen = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert seen == folder != tempfile.gettempdir()
    assert Path(folder).is_dir()
    assert len(folder + _SOCKET_SUFFIX) <= 107, "Unix socket paths in it would be too long"


def test_a_node_that_names_its_own_temporary_folder_keeps_it(tmp_path):
    _, env = axolotl_command("train", {}, tmp_path, extra_env={"TMPDIR": str(tmp_path / "node0")})
    assert env["TMPDIR"] == str(tmp_path / "node0")
