"""`seekformer quantize --model DIR --out DIR_FP8`: write a model in the hub's block-wise FP8 layout."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = "write a model in DeepSeek-V3's FP8 layout (e4m3 weights + weight_scale_inv per 128x128 block)"
# files of a model directory other than config and weights, copied along
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="a model directory (hub layout)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR_FP8",
                        help="where to write the FP8 model (a new or empty directory)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")


def run(args: argparse.Namespace) -> int:
    from .. import load_model, save_pretrained
    from ..config import ModelConfig

    source, out = args.model, args.out
    if not source.is_dir():
        raise FileNotFoundError(f"model directory {source} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory: choose a new one")
    if ModelConfig.from_hf(source).quantization_config is not None:
        raise ValueError(f"{source} already holds FP8 weights (its config.json has a quantization_config)")
    # float32 holds bf16 and fp16 weights exactly: each block is quantized from the original values
    model = load_model(source)
    save_pretrained(model, out, max_shard_size=args.max_shard_size, fp8=True)
    for name in COMPANIONS:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    print(out)
    return 0
