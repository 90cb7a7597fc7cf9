"""Save a 4-bit (bitsandbytes NF4) copy of a base model for BA-LoRA QLoRA training.

Axolotl (0.19-0.21) builds its 4-bit BitsAndBytesConfig only for `adapter: qlora`,
so `load_in_4bit` cannot reach a plugin adapter. A checkpoint that carries its own
`quantization_config` loads in 4 bits with any adapter, so QLoRA with BA-LoRA is:

    python -m axolotl_balora.quantize BASE_MODEL ./base-nf4
    # config: base_model: ./base-nf4  (and no load_in_4bit)

The quantization is the one Axolotl's qlora uses (NF4, double quantization).
BA-LoRA's PiSSA factors come from the dequantized weights; the 4-bit base is
never modified, and the adapters saved from training apply to this checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def quantize_to_nf4(base_model: str, output: Path, compute_dtype: str = "bfloat16",
                    quant_storage: str = "uint8", device: str | None = None) -> Path:
    """Load `base_model` in NF4 and save it (with its tokenizer) to `output`, atomically.

    `quant_storage` bfloat16 is what FSDP sharding of a 4-bit model needs (all
    parameters of one dtype); uint8 is bitsandbytes' default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if compute_dtype not in DTYPES or compute_dtype == "uint8":
        raise ValueError(f"compute_dtype {compute_dtype!r}: use bfloat16, float16 or float32")
    if quant_storage not in DTYPES:
        raise ValueError(f"quant_storage {quant_storage!r}: use one of {', '.join(DTYPES)}")
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; remove it or choose another output folder")
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype], bnb_4bit_quant_storage=DTYPES[quant_storage],
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    LOG.info("loading %s in NF4 on %s", base_model, device)
    model = AutoModelForCausalLM.from_pretrained(
        base_model, quantization_config=config, dtype=DTYPES[compute_dtype], device_map=device
    )
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "balora_quantized_from.json").write_text(
            json.dumps({"base_model": str(base_model), "compute_dtype": compute_dtype,
                        "quant_storage": quant_storage}, indent=2) + "\n"
        )
        staging.chmod(0o755)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    LOG.info("saved the NF4 checkpoint to %s", output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_model", help="hub id or folder of the full-precision base model")
    parser.add_argument("output", type=Path, help="new folder for the 4-bit checkpoint")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quant-storage", default="uint8", choices=list(DTYPES),
                        help="dtype holding the packed weights (bfloat16 for FSDP)")
    parser.add_argument("--device", default=None, help="where to quantize (default: cuda if available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[balora.quantize] %(message)s")
    quantize_to_nf4(args.base_model, args.output, args.compute_dtype, args.quant_storage, args.device)


if __name__ == "__main__":
    main()
