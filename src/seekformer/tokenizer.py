"""Byte-level BPE tokenizers (Hugging Face `tokenizers`), special tokens and the chat format.

Special tokens, in id order when trained here (ids 0..6):

| token | id | role |
| --- | --- | --- |
| `<|begin_of_text|>` | 0 | BOS |
| `<|end_of_text|>` | 1 | EOS: ends every pretraining document and every assistant turn |
| `<|pad|>` | 2 | padding |
| `<|User|>` | 3 | starts a user turn |
| `<|Assistant|>` | 4 | starts an assistant turn |
| `<think>` `</think>` | 5, 6 | reasoning span (R1); not "special": kept by `skip_special_tokens` |

Chat format (DeepSeek-R1 style, no newlines added):
`<|begin_of_text|>{system}<|User|>{user}<|Assistant|>{assistant}<|end_of_text|><|User|>...<|Assistant|>`
A vocabulary that holds DeepSeek's own full-width markers `<｜User｜>` / `<｜Assistant｜>` (the hub
tokenizers) gets those instead. A tokenizer whose directory carries its own chat template
(`tokenizer_config.json`'s `chat_template`, or `chat_template.jinja` as transformers 5 saves it) is
rendered with that template through Jinja2, as transformers' `apply_chat_template` renders it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from seekformer.io_utils import atomic_write, atomic_write_text

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"
DEEPSEEK_USER_TOKEN = "<｜User｜>"  # full-width bars, as in DeepSeek's hub tokenizers
DEEPSEEK_ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, THINK_START, THINK_END,
)
# added tokens that are never split but survive decode(skip_special_tokens=True)
NON_SPECIAL_ADDED = (THINK_START, THINK_END)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

def seekformer_chat_template(user_token: str = USER_TOKEN, assistant_token: str = ASSISTANT_TOKEN) -> str:
    """Jinja2 version of `format_chat` for transformers' `apply_chat_template` (same output)."""
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '" + user_token + "' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '" + assistant_token + "' + message['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + assistant_token + "' }}"
        "{% if think is defined and think %}{{ '" + THINK_START + "\\n' }}{% endif %}"
        "{% endif %}"
    )


CHAT_TEMPLATE = seekformer_chat_template()
DEEPSEEK_CHAT_TEMPLATE = seekformer_chat_template(DEEPSEEK_USER_TOKEN, DEEPSEEK_ASSISTANT_TOKEN)


def format_chat(
    messages: Sequence[Mapping[str, Any]],
    bos_token: str = BOS_TOKEN,
    eos_token: str = EOS_TOKEN,
    add_generation_prompt: bool = True,
    think: bool = False,
    user_token: str = USER_TOKEN,
    assistant_token: str = ASSISTANT_TOKEN,
) -> str:
    """Render `messages` (dicts with `role` in system/user/assistant and a `content` string).

    System messages must come first; their text follows BOS verbatim. With `add_generation_prompt`
    the text ends with `<|Assistant|>` (plus `<think>\\n` when `think`, as DeepSeek-R1 does)."""
    parts = [bos_token]
    seen_turn = False
    for i, (role, content) in enumerate(check_messages(messages)):
        if role == "system":
            if seen_turn:
                raise ValueError(f"messages[{i}]: system messages must come before user/assistant turns")
            parts.append(content)
        elif role == "user":
            seen_turn = True
            parts.append(user_token + content)
        else:
            seen_turn = True
            parts.append(assistant_token + content + eos_token)
    if add_generation_prompt:
        parts.append(assistant_token + (THINK_START + "\n" if think else ""))
    return "".join(parts)


ROLES = ("system", "user", "assistant")


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, content) of each message, or a ValueError naming the first malformed one."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {message!r}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: 'content' must be a string, got {content!r}")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {role!r}; expected system, user or assistant")
        out.append((role, content))
    return out


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], **context: Any) -> str:
    """Render a Hugging Face chat template with Jinja2 the way transformers does: a sandboxed
    environment with `trim_blocks` / `lstrip_blocks` and loop controls, the `tojson` filter, the
    `raise_exception` and `strftime_now` functions, and `{% generation %}` markers rendered as their
    content. `context` holds `add_generation_prompt`, the special tokens and any extra variables."""
    return _compile_template(template).render(messages=[dict(m) for m in messages], **context)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"the chat template refused the messages: {message}")

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(_GENERATION_TAG.sub("", template))
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template is not valid Jinja2 ({exc})") from exc


# transformers' assistant-mask markers; rendering ignores them (masks come from `chat_spans`)
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with BOS/EOS/PAD ids and the chat format."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str | None = PAD_TOKEN,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        for name, token in (("bos", bos_token), ("eos", eos_token)):
            if backend.token_to_id(token) is None:
                raise ValueError(f"{name} token {token!r} is not in the tokenizer's vocabulary")
        # a tokenizer without a pad token pads with EOS (as DeepSeek's hub tokenizers do)
        self.pad_token = pad_token if pad_token and backend.token_to_id(pad_token) is not None else eos_token
        # seekformer's format with DeepSeek's full-width markers when the vocabulary has them
        deepseek = all(backend.token_to_id(t) is not None for t in (DEEPSEEK_USER_TOKEN, DEEPSEEK_ASSISTANT_TOKEN))
        self.user_token = DEEPSEEK_USER_TOKEN if deepseek else USER_TOKEN
        self.assistant_token = DEEPSEEK_ASSISTANT_TOKEN if deepseek else ASSISTANT_TOKEN
        builtin = seekformer_chat_template(self.user_token, self.assistant_token)
        # None (or seekformer's own template): `format_chat`; any other template: rendered by Jinja2
        self.chat_template = builtin if chat_template is None else chat_template
        self.own_template = chat_template is not None and chat_template != builtin

    # ids and sizes
    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (all ids are < vocab_size)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.backend.token_to_id(self.pad_token)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The raw vocabulary entry (byte-level characters, e.g. 'Ġthe'); see `decode_token` for text."""
        return self.backend.id_to_token(int(token_id))

    # encode / decode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings inside `text` map to their ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (tokenizers' Rust thread pool)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        if add_bos:
            return [[self.bos_id, *e.ids] for e in encs]
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, numpy array or tensor). Byte-level: `decode(encode(t)) == t`."""
        id_list = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.backend.decode(id_list, skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """Text of one token; a token holding part of a UTF-8 character decodes to U+FFFD."""
        return self.backend.decode([int(token_id)], skip_special_tokens=False)

    # chat
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, think: bool = False
    ) -> str:
        """The chat text for `messages`: the tokenizer's own template when it has one (`think` is
        passed to it as a variable), else `format_chat`; encode it with `encode(text)`."""
        if not self.own_template:
            return format_chat(messages, self.bos_token, self.eos_token, add_generation_prompt, think,
                               self.user_token, self.assistant_token)
        check_messages(messages)
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        if think:
            context["think"] = True
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **context)

    # files
    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory`; returns the json path."""
        directory = Path(directory)
        path = atomic_write(directory / TOKENIZER_FILE, lambda tmp: self.backend.save(str(tmp)))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": self.chat_template,
        }
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return path

    def __repr__(self) -> str:
        ids = f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}"
        return f"Tokenizer(vocab_size={self.vocab_size}, {ids})"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`; special tokens take ids 0..len(special_tokens)-1.

    `special_tokens` must include BOS, EOS and PAD. The vocabulary may come out smaller than
    `vocab_size` on a tiny corpus (no more merges to learn)."""
    special_tokens = list(dict.fromkeys(special_tokens))
    missing = [t for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN) if t not in special_tokens]
    if missing:
        raise ValueError(f"special_tokens must include {missing}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {len(alphabet) + len(special_tokens)} "
            f"(256 byte tokens + {len(special_tokens)} special tokens)"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer)
    # transformers' tokenizer(text) prepends BOS like DeepSeek's; our encode() never uses this
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A $B:1",
            special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))],
        ),
    ])
    # the trainer marks every added token special; <think> tags must survive skip_special_tokens
    spec = json.loads(backend.to_str())
    for entry in spec["added_tokens"]:
        if entry["content"] in NON_SPECIAL_ADDED:
            entry["special"] = False
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def _token_string(value: Any) -> str | None:
    """tokenizer_config.json stores tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_template(value: Any, config_file: Path) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"} (the
    one named "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{config_file}: chat_template must be a string or a list of named templates with a "
                     f"'default' one, got {value!r}"[:300])


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a directory holding `tokenizer.json` (and optionally `tokenizer_config.json`), or the file."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer not found: {file} does not exist")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ValueError(f"{file}: not a valid tokenizer.json ({exc})") from exc
    kwargs: dict[str, Any] = {}
    config_file = file.parent / CONFIG_FILE
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_file}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object")
        for key in ("bos_token", "eos_token", "pad_token"):
            token = _token_string(config.get(key))
            if token is not None:
                kwargs[key] = token
        kwargs["chat_template"] = _config_template(config.get("chat_template"), config_file)
    template_file = file.parent / TEMPLATE_FILE
    if template_file.is_file():  # transformers 5 saves the template here (it wins over the config's)
        kwargs["chat_template"] = template_file.read_text(encoding="utf-8")
    try:
        return Tokenizer(backend, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc
