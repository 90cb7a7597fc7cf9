"""README's table of the `balora_*` keys, generated from the pydantic schema.

Each key's description lives once, on its `BALoRAConfig` field (`core/config.py`), and reaches
the schema through `args.py`; the README copy is this script's output.
`python ci/key_table.py` prints the table; `--write` puts it into README.md between the markers.
tests/test_key_table.py fails when README's copy differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from axolotl_balora.args import BALORA_KEYS, BALoRAArgs
from axolotl_balora.core.config import BALoRAConfig

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- balora-keys:start -->", "<!-- balora-keys:end -->"
REGENERATE = "python ci/key_table.py --write"


def key_table() -> str:
    """The markdown table: key | default | meaning, in the schema's order."""
    defaults = BALoRAConfig()
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key in BALORA_KEYS:
        default = getattr(defaults, key.removeprefix("balora_"))
        description = BALoRAArgs.model_fields[key].description.replace("|", "\\|")
        rows.append(f"| `{key}` | `{default}` | {description} |")
    return "\n".join(rows)


def _split(text: str) -> tuple[str, str, str]:
    """README text before the table block, the block itself, and what follows it."""
    head, start, rest = text.partition(START)
    block, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    return head, block, tail


def readme_table(text: str) -> str:
    """The table between README's markers."""
    return _split(text)[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    if not parser.parse_args().write:
        print(key_table())
        return
    head, _, tail = _split(README.read_text())
    # Blank lines around the table, so that no Markdown renderer reads a marker as one of its rows.
    README.write_text(f"{head}{START}\n\n{key_table()}\n\n{END}{tail}")


if __name__ == "__main__":
    main()
