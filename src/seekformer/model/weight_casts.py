"""Exact copies of weights in a lower precision, read in place of casting them again.

GRPO samples from a bf16 copy of its float32 policy, refreshed before every rollout. The update that
follows (the first of mu) runs its bf16 products on exactly those values, yet the routed experts'
loop (`expert_kernels.LoopedExperts`) would round every expert's weights to bf16 again (~25 M values,
~10 ms per step for the GRPO benchmark's model). `CastCopies` records (weight, copy) pairs right after
the copies are written (`copy_` rounds as autocast's casts do); inside `with copies.active():`
`fresh_cast(weight, dtype)` returns the copy. The caller scopes the block: it must end before an
optimizer step, which changes the weights without a trace here (torch's fused AdamW writes through
its kernels and leaves the version counters alone). Within the block a change that bumps a
version counter or moves a tensor's storage (an in-place op, `load_state_dict`) sends the caller
back to casting.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

_Entry = tuple[weakref.ref, int, int, weakref.ref, int, int]  # weight, its version and storage; the copy's
_active: dict[int, _Entry] = {}


class CastCopies:
    """(weight, copy) pairs recorded when the copies were written; nothing is kept alive here."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def record(self, weight: torch.Tensor, copy: torch.Tensor) -> None:
        """`copy` holds `weight` rounded to `copy.dtype` now (call it right after writing it)."""
        if copy.shape != weight.shape or copy.device != weight.device:
            raise ValueError(f"CastCopies.record: {tuple(copy.shape)} on {copy.device} is not a copy of "
                             f"{tuple(weight.shape)} on {weight.device}")
        self._entries[id(weight)] = (weakref.ref(weight), weight._version, weight.data_ptr(), weakref.ref(copy),
                                     copy._version, copy.data_ptr())

    def clear(self) -> None:
        self._entries.clear()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """`fresh_cast` answers from these copies inside the block (and from no others)."""
        global _active
        previous, _active = _active, self._entries
        try:
            yield
        finally:
            _active = previous


def fresh_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The active copy of `weight` in `dtype` (detached), or None when there is none or either tensor
    changed in place since it was recorded."""
    entry = _active.get(id(weight))
    if entry is None:
        return None
    weight_ref, weight_version, weight_pointer, copy_ref, copy_version, copy_pointer = entry
    copy = copy_ref()
    if (weight_ref() is not weight or copy is None or copy.dtype != dtype or weight._version != weight_version
            or weight.data_ptr() != weight_pointer or copy._version != copy_version
            or copy.data_ptr() != copy_pointer):
        return None
    return copy.detach()
