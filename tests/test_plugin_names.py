"""`plugins: [axolotl_balora]`: the startup hook that lets axolotl's loader accept the bare name.

The CLI runs with each spelling are in test_axolotl_cli.py; these check the installed hook in a
fresh interpreter (what `axolotl train` gets) and the wrapping itself.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from axolotl_balora import plugin_names


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_install_puts_the_startup_hook_at_the_root_of_site_packages():
    hook = Path(sysconfig.get_paths()["purelib"]) / "axolotl_balora.pth"
    assert hook.is_file(), f"{hook} missing: the wheel's force-include (pyproject.toml) was not installed"
    assert hook.read_text().strip() == "import axolotl_balora.plugin_names; axolotl_balora.plugin_names.install()"


@pytest.mark.parametrize("name", sorted(plugin_names.ALIASES | {plugin_names.PLUGIN_NAME}))
def test_axolotls_own_load_plugin_accepts_every_spelling_in_a_fresh_interpreter(name):
    result = _fresh_python(
        "import axolotl.integrations.base as base\n"
        f"plugin = base.load_plugin({name!r})\n"
        "print(type(plugin).__module__, type(plugin).__name__)\n"
        "print(getattr(base, 'normalize_plugin_name', lambda n: 'axolotl_balora.BALoRAPlugin')(" f"{name!r}))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["axolotl_balora.plugin BALoRAPlugin", plugin_names.PLUGIN_NAME]


def test_other_plugin_names_reach_axolotl_unchanged_in_a_fresh_interpreter():
    result = _fresh_python(
        "import axolotl.integrations.base as base\n"
        "try:\n"
        "    base.load_plugin('axolotl_balora_typo')\n"
        "except ValueError as error:\n"
        "    print('ValueError', error)\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ValueError not enough values to unpack")


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


def test_the_watcher_is_on_sys_meta_path_at_startup_and_gone_after_axolotls_import():
    result = _fresh_python(
        "import sys\n"
        "def watchers(): return sum(type(f).__name__ == '_PatchAfterImport' for f in sys.meta_path)\n"
        "print(watchers(), 'axolotl' in sys.modules)\n"
        "import axolotl.integrations.base as base\n"
        "print(watchers(), hasattr(base.load_plugin, '__wrapped__'))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["1 False", "0 True"]
