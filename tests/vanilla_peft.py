"""Load a saved adapter with vanilla PEFT in a fresh interpreter that never imports this package.

The interpreter starts with `-S` and gets site-packages by hand, so that no `.pth` file runs
(this package's startup hook for axolotl plugin names included).
"""

from __future__ import annotations

import json
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

# Reloads every (base, adapter) pair of a JSON job list in one interpreter: starting one costs
# more than the reloads (about 13 s of imports on a 2-core CI machine).
VANILLA_RELOAD = textwrap.dedent(
    """
    import json
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    jobs_path, tokens_path, mode = sys.argv[1:]
    tokens = torch.load(tokens_path)
    for base_dir, adapter_dir, out_path in json.loads(open(jobs_path).read()):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
        model.train(mode == "train")
        with torch.no_grad():
            torch.save(model(tokens).logits, out_path)
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
    return vanilla_peft_logits_of_each([(base_dir, adapter_dir)], tokens, workdir, mode)[0]


def vanilla_peft_logits_of_each(pairs: list[tuple[Path, Path]], tokens: torch.Tensor, workdir: Path,
                                mode: str = "eval") -> list[torch.Tensor]:
    """`vanilla_peft_logits` of every (base_dir, adapter_dir) pair, reloaded in one fresh interpreter."""
    workdir.mkdir(parents=True, exist_ok=True)
    tokens_path, jobs_path = workdir / "tokens.pt", workdir / "reload-jobs.json"
    torch.save(tokens, tokens_path)
    outputs = [workdir / f"logits-{index}.pt" for index in range(len(pairs))]
    jobs_path.write_text(json.dumps([[str(base), str(adapter), str(out)]
                                     for (base, adapter), out in zip(pairs, outputs)]))
    run_vanilla_script(workdir / "reload.py", VANILLA_RELOAD, jobs_path, tokens_path, mode)
    return [torch.load(path) for path in outputs]
