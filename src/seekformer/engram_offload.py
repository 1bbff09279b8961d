"""Engram tables in host memory while the rest of a built model runs on an accelerator.

Applied to a built model, as parallelism is (the model itself knows nothing of it):

    offload = offload_engram_tables(model, device="cuda")   # tables on the host, the rest on the GPU
    model(ids)                                               # or generate(model, ...), training, ...
    offload.remove()                                         # back to plain forwards (placement stays)

Every Engram table *and the id buffers its hashing reads* (`compression`, `multipliers`, `primes`,
`offsets`) go to host memory, so hashing and the row gather run on the host next to the table; all
other parameters and buffers go to `device`. The rows a forward needs depend only on the tokens, so a
hook before the first decoder layer hashes the tokens and gathers the rows of every Engram layer at
once, then copies them to the device. On CUDA each copy leaves from pinned memory (only the gathered
rows are pinned, never the table) on one side stream made once, and each Engram layer waits only for
its own copy's event, so the copies overlap the earlier layers' compute. Gradients flow back to the
host table (row-sparse with `engram.sparse_grad = True`). The decode state's id history lives on the
host with the table, its conv history on the device.

What has run where: the placement, the host-side hashing and the prefetch hooks are tested on CPU
(host and device both the CPU, and a "meta" device standing in for the accelerator). The CUDA part
(pinned rows, the side stream, events) has never run on a GPU: this project's machine has none.
"""

from __future__ import annotations

import torch
from torch import nn

HOST_BUFFERS = ("compression", "multipliers", "primes", "offsets")


class EngramOffload:
    """Handle of an applied offload: the prefetch hooks and the side stream; `remove()` takes the hooks off."""

    def __init__(self, model: nn.Module, host: torch.device) -> None:
        self.model, self.host = model, host
        self.layers = model.engram_layers()
        self._memories: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        first = model.model.layers[0]
        self._hooks = [first.register_forward_pre_hook(self._prefetch_hook, with_kwargs=True)]
        self._hooks += [layer.engram.register_forward_pre_hook(self._inject_hook, with_kwargs=True)
                        for layer in self.layers]

    def prefetch(self, input_ids: torch.Tensor, device: torch.device | str, cache=None,
                 attention_mask: torch.Tensor | None = None) -> dict[int, tuple[torch.Tensor, object]]:
        """Memory vectors of every Engram layer for `input_ids` [B, T], looked up on the host and sent to
        `device`: {layer index: (memory [B, T, (N-1)*dim] on `device`, CUDA event or None)}."""
        device = torch.device(device)
        ids = input_ids.to(self.host)
        mask = None if attention_mask is None else attention_mask.to(self.host)
        stream = self._side_stream(device)
        memories = {}
        for layer in self.layers:
            memory, event = layer.engram.lookup(ids, layer.engram_state(cache), mask), None
            if memory.device != device:
                if stream is None:
                    memory = memory.to(device)
                else:
                    memory = memory.pin_memory()  # the gathered rows only
                    with torch.cuda.stream(stream):
                        memory = memory.to(device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                    memory.record_stream(torch.cuda.current_stream(device))  # used on the main stream
            memories[layer.layer_idx] = (memory, event)
        return memories

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._memories = [], {}

    # ------------------------------------------------------------------ hooks
    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _prefetch_hook(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the first decoder layer: look up every Engram layer's rows for this forward."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            return
        self._memories = self.prefetch(input_ids, args[0].device, kwargs.get("cache"), kwargs.get("token_mask"))

    def _inject_hook(self, engram: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before an Engram layer: hand it its prefetched rows (after their copy has arrived)."""
        entry = self._memories.pop(engram.layer_id, None)
        if entry is None:
            return None  # not called from a model forward: the layer looks up (on the host) itself
        memory, event = entry
        if event is not None:
            torch.cuda.current_stream(memory.device).wait_event(event)
        return args, {**kwargs, "memory": memory}


def offload_engram_tables(model: nn.Module, device: torch.device | str | None = None,
                          host: torch.device | str = "cpu") -> EngramOffload:
    """Put every Engram table and its hashing buffers on `host` and the rest of `model` on `device`
    (default: where the model is now); install the prefetch hooks. Returns the handle.

    A later `model.to(...)` moves the tables too; call this again after it.
    """
    layers = model.engram_layers()
    if not layers:
        raise ValueError("this model has no Engram layers (engram_layer_ids is empty)")
    host = torch.device(host)
    device = model.device if device is None else torch.device(device)
    on_host = {id(layer.engram.table.weight) for layer in layers}
    on_host |= {id(getattr(layer.engram, name)) for layer in layers for name in HOST_BUFFERS}
    model._apply(lambda t: t.to(host if id(t) in on_host else device))
    return EngramOffload(model, host)
