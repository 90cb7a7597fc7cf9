"""`uv pip ARGS...` for the environment of this interpreter, from the package sources pip is set up with.

The Makefile installs every environment with uv instead of pip: uv downloads, unpacks and
byte-compiles in parallel, where pip does each package in turn (docs/development.md has the
side-by-side install times). uv does not read pip's configuration, so this reads it
(`pip config list`: the PIP_* environment, then the `install` and `global` sections of every
pip.conf) and hands the same sources to uv:

    index-url, extra-index-url, find-links  ->  --index-url, --extra-index-url, --find-links
    constraint                              ->  --constraint (on top of the caller's own)
    cert                                    ->  SSL_CERT_FILE
    default-timeout                         ->  UV_HTTP_TIMEOUT
    no-cache-dir (any true value)           ->  --no-cache

and `--index-strategy unsafe-best-match`, pip's rule of taking the best version found in any
source (uv's default would take every package from the first index that has it).

Usage (the venv's own python, which has `uv` installed):

    .venv/bin/python ci/uv_pip.py install --compile-bytecode -c ci/constraints.txt -e '.[axolotl,dev]'
"""

from __future__ import annotations

import os
import subprocess
import sys

# pip's precedence, highest first: the PIP_* environment, then the `install` section, then `global`.
SECTION_ORDER = (":env:", "install", "global")
TRUE = {"1", "true", "yes", "on"}


def pip_settings() -> dict[str, str]:
    """Each pip setting (name -> value) as pip itself would resolve it for `pip install`."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    found: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        found.setdefault(name, {})[section] = value.strip().strip("'\"")
    return {name: next(values[s] for s in SECTION_ORDER if s in values)
            for name, values in found.items() if any(s in values for s in SECTION_ORDER)}


def uv_options(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(uv arguments, environment variables) that give uv the sources and limits of `settings`."""
    options = ["--index-strategy", "unsafe-best-match"]
    if "index-url" in settings:
        options += ["--index-url", settings["index-url"]]
    for name, flag in (("extra-index-url", "--extra-index-url"), ("find-links", "--find-links"),
                       ("constraint", "--constraint")):
        for value in settings.get(name, "").split():
            options += [flag, value]
    if settings.get("no-cache-dir", "").lower() in TRUE:
        options.append("--no-cache")
    env = {}
    if "cert" in settings:
        env["SSL_CERT_FILE"] = settings["cert"]
    if "default-timeout" in settings:
        env["UV_HTTP_TIMEOUT"] = settings["default-timeout"]
    return options, env


def main(argv: list[str]) -> int:
    from uv import find_uv_bin  # installed into the venv by the Makefile, before this runs

    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, *rest = argv
    options, env = uv_options(pip_settings())
    uv = [find_uv_bin(), "pip", command, "--python", sys.executable, *options, *rest]
    print("[setup] " + " ".join(uv), flush=True)
    return subprocess.run(uv, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
