"""Engram gate visualisation: how strongly each token takes its n-gram memory (alpha), per Engram layer.

Like Figure 7 of the Engram paper: every token of a text is drawn with a background whose intensity
is its gate value alpha_t in (0, 1), one row per Engram layer. Written as a self-contained HTML page
and as a PNG.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch

from .io_utils import atomic_write, atomic_write_text


@dataclass
class GateTrace:
    tokens: list[str]  # the text of each token, as decoded alone
    gates: dict[int, list[float]]  # Engram layer id -> alpha per token


@torch.no_grad()
def trace_gates(model, tokenizer, text: str) -> GateTrace:
    """Run `text` through `model` and collect alpha of every Engram layer."""
    engrams = {i: layer.engram for i, layer in enumerate(model.model.layers) if getattr(layer, "engram", None)}
    if not engrams:
        raise ValueError("this model has no Engram layers (engram_layer_ids is empty)")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the text encodes to no tokens")
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise ValueError(f"the text is {len(ids)} tokens, longer than the model's context of {limit}")
    for engram in engrams.values():
        engram.keep_gate = True
    try:
        model.eval()
        model(torch.tensor([ids], device=model.device))
        gates = {i: engram.last_gate[0].float().tolist() for i, engram in engrams.items()}
    finally:
        for engram in engrams.values():
            engram.keep_gate, engram.last_gate = False, None
    return GateTrace(tokens=[tokenizer.decode_token(i) for i in ids], gates=gates)


def _shade(alpha: float) -> str:
    """White (alpha 0) to deep orange (alpha 1)."""
    r, g, b = 255, int(255 - 140 * alpha), int(255 - 235 * alpha)
    return f"rgb({r},{g},{b})"


def render_html(trace: GateTrace, title: str = "Engram gates") -> str:
    rows = []
    for layer, gates in trace.gates.items():
        spans = "".join(
            f'<span title="alpha={a:.3f}" style="background:{_shade(a)}">'
            f"{html.escape(tok).replace(chr(10), '&#8629;<br>') or '&nbsp;'}</span>"
            for tok, a in zip(trace.tokens, gates)
        )
        mean = sum(gates) / len(gates)
        rows.append(f"<h2>layer {layer} <small>mean alpha {mean:.3f}</small></h2><pre>{spans}</pre>")
    scale = "".join(f'<span style="background:{_shade(a / 10)}">{a / 10:.1f}</span>' for a in range(11))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em} pre{white-space:pre-wrap;font-size:15px;line-height:1.7}"
        " span{padding:1px 0} .scale span{padding:2px 6px;font-family:monospace}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Background = gate alpha of each token (hover for the value).</p>"
        f"<p class='scale'>{scale}</p>{''.join(rows)}</body></html>\n"
    )


def render_png(trace: GateTrace, path: str | Path, max_tokens: int = 120) -> Path:
    """One row of coloured token boxes per Engram layer (first `max_tokens` tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = trace.tokens[:max_tokens]
    per_line = 20
    lines = (len(tokens) + per_line - 1) // per_line
    layers = list(trace.gates)
    fig, axes = plt.subplots(len(layers), 1, figsize=(16, 0.5 + 0.45 * lines * len(layers) + 0.4 * len(layers)),
                             squeeze=False)
    cmap = plt.get_cmap("Oranges")
    for ax, layer in zip(axes[:, 0], layers):
        gates = trace.gates[layer][:max_tokens]
        for i, (tok, a) in enumerate(zip(tokens, gates)):
            row, col = divmod(i, per_line)
            ax.add_patch(plt.Rectangle((col, -row - 1), 0.96, 0.9, color=cmap(a)))
            label = tok.replace("\n", "\\n").replace("$", r"\$")[:8]
            ax.text(col + 0.48, -row - 0.55, label, ha="center", va="center", fontsize=7, family="monospace")
        ax.set_xlim(0, per_line)
        ax.set_ylim(-lines, 0)
        ax.axis("off")
        ax.set_title(f"Engram layer {layer}: gate alpha per token", fontsize=9, loc="left")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_gate_pages(trace: GateTrace, html_path: str | Path, png_path: str | Path | None) -> list[Path]:
    written = [atomic_write_text(html_path, render_html(trace))]
    if png_path is not None:
        written.append(render_png(trace, png_path))
    return written
