"""Load a saved adapter with vanilla PEFT in a fresh interpreter that never imports this package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

VANILLA_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, tokens_path, out_path, mode = sys.argv[1:]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    model.train(mode == "train")
    with torch.no_grad():
        torch.save(model(torch.load(tokens_path)).logits, out_path)
    assert not any(name.startswith("axolotl_balora") for name in sys.modules)
    """
)


def vanilla_peft_logits(base_dir: Path, adapter_dir: Path, tokens: torch.Tensor, workdir: Path,
                        mode: str = "eval") -> torch.Tensor:
    """Logits of `base_dir` + `adapter_dir` as plain `PeftModel.from_pretrained` computes them.

    `mode` "train" keeps bitsandbytes' 4-bit CPU layers off their eval-only repacked path.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    script, tokens_path, logits_path = workdir / "reload.py", workdir / "tokens.pt", workdir / "logits.pt"
    script.write_text(VANILLA_RELOAD)
    torch.save(tokens, tokens_path)
    subprocess.run([sys.executable, str(script), str(base_dir), str(adapter_dir), str(tokens_path),
                    str(logits_path), mode], check=True)
    return torch.load(logits_path)
