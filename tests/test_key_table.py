"""Each `balora_*` key is described once, in the schema, and README's key table is generated from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from axolotl_balora.args import BALORA_KEYS, BALoRAArgs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ci"))
import key_table  # noqa: E402  (ci/ is not a package)


@pytest.mark.parametrize("key", BALORA_KEYS)
def test_every_key_carries_its_description_in_the_schema(key):
    description = BALoRAArgs.model_json_schema()["properties"][key].get("description")
    assert description and description.strip(), f"{key}: no description in the pydantic schema"


def test_readmes_key_table_is_the_generated_one():
    readme = key_table.readme_table(key_table.README.read_text())
    assert readme == key_table.key_table(), (
        f"README.md's balora_* key table differs from the schema's; run `{key_table.REGENERATE}`"
    )
