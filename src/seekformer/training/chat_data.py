"""Supervised fine-tuning data: JSONL conversations -> token ids with the loss on assistant tokens.

A record is `{"messages": [{"role", "content"}, ...]}` (OpenAI style: system, user, assistant) or
`{"prompt": "...", "completion": "..."}` (one user turn, one assistant turn). Other keys are kept
and ignored. Each conversation is rendered by the tokenizer's chat template (`Tokenizer.apply_chat_template`)
and every token of an assistant turn, including the template's end-of-turn marker, is a target; the
system and user turns and the template's own markers are not.

Which characters belong to assistant turn i is read off the template itself: the text of the
conversation up to turn i with the generation prompt, against the text that includes turn i. What
the second adds is the turn as the model must produce it. This needs no markers in the template
(transformers' `{% generation %}` tags) and works for every template that renders history the same
whether or not more turns follow; the others are trained one assistant turn per example.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import Tokenizer, check_messages

IGNORE = -100  # target id of tokens that carry no loss


class ChatDataError(ValueError):
    """A malformed SFT record or one that cannot be trained on (named by file and line)."""


@dataclass
class ChatRecord:
    messages: list[dict[str, str]]
    source: str  # "file:line", for error messages
    extra: dict[str, Any]  # the record's other keys (e.g. "answer")


def read_chat_jsonl(path: str | Path, need_assistant: bool = True) -> list[ChatRecord]:
    """Every record of a JSONL file; a malformed one is a ChatDataError naming its line.

    `need_assistant=False` accepts conversations without an assistant turn (prompts for generation):
    `{"prompt": ...}` alone, or messages that end with a user turn."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ChatDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            records.append(parse_record(raw, where, need_assistant))
    if not records:
        raise ChatDataError(f"{path} holds no records")
    return records


def parse_record(raw: Any, where: str, need_assistant: bool = True) -> ChatRecord:
    """One record as a ChatRecord (see the module docstring), or a ChatDataError naming `where`."""
    if not isinstance(raw, Mapping):
        raise ChatDataError(f"{where}: expected a JSON object with 'messages' or 'prompt'/'completion', "
                            f"got {type(raw).__name__}")
    if "messages" in raw:
        messages = raw["messages"]
        extra = {k: v for k, v in raw.items() if k != "messages"}
    elif "prompt" in raw:
        prompt, completion = raw["prompt"], raw.get("completion")
        if not isinstance(prompt, str):
            raise ChatDataError(f"{where}: 'prompt' must be a string, got {prompt!r}"[:200])
        if completion is None and need_assistant:
            raise ChatDataError(f"{where}: a record with 'prompt' needs a 'completion' string")
        if completion is not None and not isinstance(completion, str):
            raise ChatDataError(f"{where}: 'completion' must be a string, got {completion!r}"[:200])
        messages = [{"role": "user", "content": prompt}]
        if completion is not None:
            messages.append({"role": "assistant", "content": completion})
        extra = {k: v for k, v in raw.items() if k not in ("prompt", "completion")}
    else:
        raise ChatDataError(f"{where}: expected a 'messages' list or 'prompt' and 'completion' strings; "
                            f"the record has keys {sorted(raw)}")
    try:
        roles = [role for role, _ in check_messages(messages)]
    except ValueError as exc:
        raise ChatDataError(f"{where}: {exc}") from None
    if need_assistant and "assistant" not in roles:
        raise ChatDataError(f"{where}: the conversation has no assistant turn to learn from")
    if not need_assistant and (not roles or roles[-1] == "assistant"):
        raise ChatDataError(f"{where}: a prompt must end with a user turn")
    return ChatRecord([{"role": m["role"], "content": m["content"]} for m in messages], where, extra)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
                    ) -> list[tuple[str, list[tuple[int, int]]]]:
    """Texts to train on, each with the character spans [start, end) of its assistant turns.

    One text (the whole conversation) when the template renders history unchanged by later turns;
    else one text per assistant turn, ending with it."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        with_turn = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        turns.append((with_turn, _common_prefix(context, with_turn)))
    if all(full.startswith(text) for text, _ in turns):
        return [(full, [(start, len(text)) for text, start in turns])]
    return [(text, [(start, len(text))]) for text, start in turns]


@dataclass
class ChatExample:
    """Token ids [n] and the loss mask [n] (True on assistant tokens) of one training sequence."""

    ids: np.ndarray
    mask: np.ndarray
    source: str

    @property
    def inputs(self) -> np.ndarray:
        return self.ids[:-1]

    @property
    def targets(self) -> np.ndarray:
        """Next-token targets of `inputs`: the following id on assistant tokens, IGNORE elsewhere."""
        return np.where(self.mask[1:], self.ids[1:], IGNORE)


def tokenize_chat(tokenizer: Tokenizer, record: ChatRecord, max_len: int | None = None,
                  truncate: bool = False) -> list[ChatExample]:
    """The record's training sequences (see `assistant_spans`). A sequence of more than `max_len`
    inputs (the context) is a ChatDataError naming the record, or with `truncate` loses its tail;
    a prompt that fills the context by itself is always an error."""
    examples = []
    for text, spans in assistant_spans(tokenizer, record.messages):
        encoding = tokenizer.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        starts = np.asarray([start for start, _ in encoding.offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            mask |= (starts >= start) & (starts < end)
        if not mask.any():
            raise ChatDataError(f"{record.source}: the assistant turns encode to no tokens")
        if max_len is not None and len(ids) - 1 > max_len:
            first = int(mask.argmax())
            if first >= max_len:
                raise ChatDataError(f"{record.source}: the prompt has {first} tokens, which fill the context of "
                                    f"{max_len} tokens before the first assistant token")
            if not truncate:
                raise ChatDataError(f"{record.source}: {len(ids) - 1} tokens, longer than the context of {max_len} "
                                    "(shorten the record, raise data.max_len, or set data.truncate=true)")
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        examples.append(ChatExample(ids, mask, record.source))
    return examples


def tokenize_records(tokenizer: Tokenizer, records: Sequence[ChatRecord], max_len: int | None = None,
                     truncate: bool = False) -> list[ChatExample]:
    return [ex for record in records for ex in tokenize_chat(tokenizer, record, max_len, truncate)]


@dataclass
class ChatBatch:
    """Inputs [B, T], next-token targets [B, T] (IGNORE off the assistant tokens) and, for packed
    rows, the example index of every position [B, T] (attention stays inside an example and
    positions restart at each one)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor | None = None
    n_tokens: int = 0  # real (not padding) input tokens

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> ChatBatch:
        docs = self.document_ids.to(device) if self.document_ids is not None else None
        return ChatBatch(self.inputs.to(device), self.targets.to(device), docs, self.n_tokens)


def collate(examples: Sequence[ChatExample], pad_id: int, length: int | None = None) -> ChatBatch:
    """One example per row, right-padded to the longest (or `length`). Causal attention never lets a
    real token see the padding after it, so these rows need no attention mask. No examples: a batch
    of no rows (a data-parallel rank left without rows still runs the step's collectives)."""
    length = length or max((len(ex.inputs) for ex in examples), default=1)
    inputs = np.full((len(examples), length), pad_id, dtype=np.int64)
    targets = np.full((len(examples), length), IGNORE, dtype=np.int64)
    for row, ex in enumerate(examples):
        inputs[row, : len(ex.inputs)] = ex.inputs
        targets[row, : len(ex.inputs)] = ex.targets
    return ChatBatch(torch.from_numpy(inputs), torch.from_numpy(targets), None, sum(len(ex.inputs) for ex in examples))


def pack(rows: Sequence[Sequence[ChatExample]], pad_id: int, length: int) -> ChatBatch:
    """Several examples per row, each in its own attention segment; the padding at a row's end is a
    segment of its own (its targets are IGNORE)."""
    inputs = np.full((len(rows), length), pad_id, dtype=np.int64)
    targets = np.full((len(rows), length), IGNORE, dtype=np.int64)
    docs = np.full((len(rows), length), -1, dtype=np.int64)
    for row, examples in enumerate(rows):
        at = 0
        for doc, ex in enumerate(examples):
            n = len(ex.inputs)
            inputs[row, at: at + n], targets[row, at: at + n], docs[row, at: at + n] = ex.inputs, ex.targets, doc
            at += n
        docs[row, at:] = len(examples)
    n_tokens = sum(len(ex.inputs) for examples in rows for ex in examples)
    return ChatBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(docs), n_tokens)


def pack_rows(examples: Sequence[ChatExample], length: int) -> list[list[ChatExample]]:
    """Fill rows of `length` inputs in the given order, starting a new row when the next example does
    not fit."""
    rows: list[list[ChatExample]] = []
    used = length + 1
    for ex in examples:
        n = len(ex.inputs)
        if used + n > length:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += n
    return rows


def shard(rows: Sequence, rank: int, world_size: int) -> Sequence:
    """Rank `rank`'s contiguous share of `rows` (shares differ by at most one; some may be empty)."""
    return rows[rank * len(rows) // world_size: (rank + 1) * len(rows) // world_size]


class ChatBatches:
    """Endless, seeded batches over the examples: each epoch a fresh permutation (seed + epoch), cut
    into batches of `batch_size` rows (one example per row, or packed rows of `seq_len`).

    With `world_size > 1` every rank draws the same global batches and keeps its `shard` of each one's
    rows: the ranks together see what one process sees, in the same order.
    `state_dict()` / `load_state_dict()` (epoch and position) make a resumed run see the same batches,
    on any number of ranks.
    """

    def __init__(self, examples: Sequence[ChatExample], batch_size: int, seq_len: int, pad_id: int,
                 packing: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not examples:
            raise ChatDataError("no training examples")
        self.examples, self.batch_size, self.seq_len = list(examples), batch_size, seq_len
        self.pad_id, self.packing, self.seed = pad_id, packing, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._plan = self._epoch_plan(0)

    def _epoch_plan(self, epoch: int) -> list[list[list[ChatExample]]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        shuffled = [self.examples[i] for i in order]
        rows = pack_rows(shuffled, self.seq_len) if self.packing else [[ex] for ex in shuffled]
        return [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self._plan)

    def __iter__(self) -> Iterator[ChatBatch]:
        return self

    def __next__(self) -> ChatBatch:
        if self.position >= len(self._plan):
            self.epoch, self.position = self.epoch + 1, 0
            self._plan = self._epoch_plan(self.epoch)
        rows = self._plan[self.position]
        mine = shard(rows, self.rank, self.world_size)
        self.position += 1
        if self.packing:
            return pack(mine, self.pad_id, self.seq_len)
        # padded to the global batch's longest row: every rank's padding tokens are one process's (MoE
        # layers route them too, so they count in the expert loads)
        return collate([row[0] for row in mine], self.pad_id, max(len(row[0].inputs) for row in rows))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the saved batches were drawn with seed {state['seed']}, not {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._plan = self._epoch_plan(self.epoch)


def eval_chat_batches(examples: Sequence[ChatExample], batch_size: int, pad_id: int, rank: int = 0,
                      world_size: int = 1) -> Iterator[ChatBatch]:
    """Every example once, in order, one per row (this rank's `shard` of every batch, padded as the
    whole batch)."""
    for i in range(0, len(examples), batch_size):
        batch = examples[i: i + batch_size]
        yield collate(shard(batch, rank, world_size), pad_id, max(len(ex.inputs) for ex in batch))
