"""Load a saved adapter with vanilla PEFT in a fresh interpreter that never imports this package.

The interpreter starts with `-S` and gets site-packages by hand, so that no `.pth` file runs
(this package's startup hook for axolotl plugin names included).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import torch

# This environment's site-packages, found here: under -S a venv's interpreter reports the base's.
SITE_WITHOUT_PTH_FILES = (
    "import sys\n"
    f"sys.path.extend({list(dict.fromkeys(sysconfig.get_paths()[key] for key in ('purelib', 'platlib')))!r})\n"
)
NOTHING_OF_THIS_PACKAGE = "\nassert not any(name.startswith('axolotl_balora') for name in sys.modules)\n"

VANILLA_RELOAD = textwrap.dedent(
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, tokens_path, out_path, mode = sys.argv[1:]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    model.train(mode == "train")
    with torch.no_grad():
        torch.save(model(torch.load(tokens_path)).logits, out_path)
    """
)


def run_vanilla_script(script: Path, source: str, *args: object) -> None:
    """Run `source` in a fresh `python -S` (site-packages, no `.pth`) and check that it never
    imported axolotl_balora."""
    script.write_text(SITE_WITHOUT_PTH_FILES + source + NOTHING_OF_THIS_PACKAGE)
    subprocess.run([sys.executable, "-S", str(script), *map(str, args)], check=True)


def vanilla_peft_logits(base_dir: Path, adapter_dir: Path, tokens: torch.Tensor, workdir: Path,
                        mode: str = "eval") -> torch.Tensor:
    """Logits of `base_dir` + `adapter_dir` as plain `PeftModel.from_pretrained` computes them.

    `mode` "train" keeps bitsandbytes' 4-bit CPU layers off their eval-only repacked path.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    tokens_path, logits_path = workdir / "tokens.pt", workdir / "logits.pt"
    torch.save(tokens, tokens_path)
    run_vanilla_script(workdir / "reload.py", VANILLA_RELOAD, base_dir, adapter_dir, tokens_path, logits_path, mode)
    return torch.load(logits_path)
