"""What autograd saves for the backward, per token and per decoder layer, bf16 vs the FP8 recipe.

    PYTHONPATH=src python benchmarks/fp8_saved_activations.py

The demo model (`tiny-v3`: 1 dense + 3 MoE layers and an MTP module) on one demo micro-batch (8 x 256
tokens), under bf16 autocast as the trainer runs it, once as built (`run.dtype=bf16`) and once converted
with `convert_to_fp8_training` (`run.dtype=fp8`). A `saved_tensors_hooks` pack hook records the storage
of every tensor saved for the backward (deduplicated by storage pointer; weights, their per-expert
views and autocast's weight casts excluded), attributed to the decoder layer whose forward saved it
first (forward pre-hooks and hooks mark the layer).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch

from seekformer.config import PRESETS, ModelConfig
from seekformer.model.transformer import Transformer
from seekformer.quant.fp8_training import SavedTensorMeter, convert_to_fp8_training
from seekformer.training.cross_entropy import linear_cross_entropy


def saved_bytes_by_layer(model: Transformer, tokens: torch.Tensor) -> dict[str, int]:
    """{layer name or "other": bytes of the storages first saved while that layer ran forward}."""
    meter = SavedTensorMeter(model.parameters())
    meter.tag = "other"
    for name, layer in list(model.model.layers.named_children()) + [(f"mtp.{i}", m) for i, m in enumerate(model.mtp)]:
        layer.register_forward_pre_hook(lambda _m, _a, n=name: setattr(meter, "tag", n))
        layer.register_forward_hook(lambda _m, _a, _o: setattr(meter, "tag", "other"))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with meter, torch.autocast("cpu", torch.bfloat16):
        h0 = model.hidden_states(x)  # the trainer's losses: main and MTP cross-entropy, no logits kept
        loss = linear_cross_entropy(h0, model.lm_head.weight, y)
        for k, h in enumerate(model.mtp_hidden_states(h0, x), start=1):
            loss = loss + 0.3 * linear_cross_entropy(model.mtp_head_input(h, k), model.lm_head.weight, y[:, k:])
        loss.backward()
    out: dict[str, int] = defaultdict(int)
    for tag, nbytes, _ in meter.storages.values():
        out[tag] += nbytes
    return dict(out)


def main() -> int:
    cfg = ModelConfig.from_hf(dict(PRESETS["tiny-v3"]))
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (8, 257))
    n = tokens[:, :-1].numel()
    results = {}
    for dtype in ("bf16", "fp8"):
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        if dtype == "fp8":
            convert_to_fp8_training(model)
        results[dtype] = saved_bytes_by_layer(model, tokens)
    names = sorted(set(results["bf16"]) | set(results["fp8"]), key=lambda s: (not s.isdigit(), s))
    print(f"bytes saved for the backward per token ({n} tokens), by layer:")
    print(f"{'layer':>8} {'bf16':>9} {'fp8':>9} {'fp8/bf16':>9}")
    for name in names:
        b, f = results["bf16"].get(name, 0) / n, results["fp8"].get(name, 0) / n
        print(f"{name:>8} {b:9.0f} {f:9.0f} {f / b if b else float('nan'):9.3f}")
    tb, tf = sum(results["bf16"].values()) / n, sum(results["fp8"].values()) / n
    print(f"{'total':>8} {tb:9.0f} {tf:9.0f} {tf / tb:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
