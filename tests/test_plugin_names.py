"""`plugins: [axolotl_balora]`: the startup hook that lets axolotl's loader accept the bare name.

The CLI runs with each spelling are in test_axolotl_cli.py; these check the installed hook in a
fresh interpreter (what `axolotl train` gets) and the wrapping itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from axolotl_balora.patches import plugin_names


# One fresh interpreter (what `axolotl train` gets) reports everything: importing axolotl's
# plugin module there costs seconds, so it is done once.
FRESH_PROBE = """
import json, sys
def watchers():
    return sum(type(finder).__name__ == "_PatchAfterImport" for finder in sys.meta_path)
report = {"watchers_at_start": watchers(), "axolotl_at_start": "axolotl" in sys.modules}
import axolotl.integrations.base as base
report["watchers_after"] = watchers()
normalize = getattr(base, "normalize_plugin_name", None)
for name in NAMES:
    plugin = base.load_plugin(name)
    report[name] = {"loaded": f"{type(plugin).__module__}.{type(plugin).__name__}",
                    "normalized": normalize(name) if normalize else None}
try:
    base.load_plugin("axolotl_balora_typo")
except ValueError as error:
    report["typo"] = str(error)
print("REPORT " + json.dumps(report))
"""
SPELLINGS = sorted(plugin_names.ALIASES | {plugin_names.PLUGIN_NAME})


@pytest.fixture(scope="module")
def fresh_interpreter() -> dict:
    code = f"NAMES = {SPELLINGS!r}\n" + FRESH_PROBE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_the_install_puts_the_startup_hook_at_the_root_of_site_packages():
    hook = Path(sysconfig.get_paths()["purelib"]) / "axolotl_balora.pth"
    assert hook.is_file(), f"{hook} missing: the wheel's force-include (pyproject.toml) was not installed"
    assert hook.read_text().strip() == "import axolotl_balora.patches.plugin_names; axolotl_balora.patches.plugin_names.install()"


@pytest.mark.parametrize("name", SPELLINGS)
def test_axolotls_own_load_plugin_accepts_every_spelling(fresh_interpreter, name):
    assert fresh_interpreter[name]["loaded"] == "axolotl_balora.plugin.BALoRAPlugin"
    # None: this axolotl has no normalize_plugin_name (0.19, 0.20); 0.21 must map the alias
    assert fresh_interpreter[name]["normalized"] in (None, plugin_names.PLUGIN_NAME)


def test_other_plugin_names_reach_axolotl_unchanged(fresh_interpreter):
    assert fresh_interpreter["typo"].startswith("not enough values to unpack")


def test_the_watcher_is_on_sys_meta_path_at_startup_and_gone_after_axolotls_import(fresh_interpreter):
    assert fresh_interpreter["watchers_at_start"] == 1 and not fresh_interpreter["axolotl_at_start"]
    assert fresh_interpreter["watchers_after"] == 0


def _fake_axolotl_base() -> types.ModuleType:
    base = types.ModuleType("fake_base")
    base.load_plugin = lambda name: ("load", name)
    base.normalize_plugin_name = lambda name: ("normalize", name)
    return base


def test_wrapping_maps_only_the_aliases_and_happens_once():
    base = _fake_axolotl_base()
    plugin_names.accept_plugin_aliases(base)
    wrapped = base.load_plugin
    plugin_names.accept_plugin_aliases(base)
    assert base.load_plugin is wrapped
    assert base.load_plugin("axolotl_balora") == ("load", plugin_names.PLUGIN_NAME)
    assert base.normalize_plugin_name("axolotl_balora.plugin.BALoRAPlugin") == ("normalize", plugin_names.PLUGIN_NAME)
    assert base.load_plugin("other.Plugin") == ("load", "other.Plugin")
    assert base.load_plugin("axolotl_balora.BALoRAPlugin") == ("load", plugin_names.PLUGIN_NAME)


def test_a_version_without_normalize_plugin_name_gets_only_load_plugin_wrapped():
    base = _fake_axolotl_base()
    del base.normalize_plugin_name
    plugin_names.accept_plugin_aliases(base)
    assert base.load_plugin("axolotl_balora") == ("load", plugin_names.PLUGIN_NAME)
    assert not hasattr(base, "normalize_plugin_name")
