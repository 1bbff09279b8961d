"""OpenAI request bodies (pydantic, strict types) and their translation to engine sampling settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import RequestError
from .sampling import MAX_TOP_LOGPROBS, RequestSampling


class _Body(BaseModel):
    # strict: a string where a number belongs is an error, not a coercion; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = True  # this server sends the final usage chunk unless told not to


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is None or self.stream_options.include_usage

    def sampling(self, max_tokens: int, logprobs: int | None) -> RequestSampling:
        if max_tokens is None or max_tokens < 1:
            raise RequestError("max_tokens", f"must be a positive integer, got {max_tokens!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return RequestSampling(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, n=self.n,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self, tokenizer) -> list[list[int]]:
        """Token ids of each prompt (a string, a list of strings, ids, or a list of id lists)."""
        if self.echo:
            raise RequestError("echo", "is not supported by this server")
        if self.suffix:
            raise RequestError("suffix", "is not supported by this server")
        p = self.prompt
        if isinstance(p, str):
            texts = [p]
        elif p and all(isinstance(x, int) for x in p):
            return [list(p)]
        elif p and all(isinstance(x, list) for x in p):
            return [list(x) for x in p]
        else:
            texts = list(p)
        if not texts or not all(texts):
            raise RequestError("prompt", "must not be empty")
        return [tokenizer.encode(t) for t in texts]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def prompt_ids(self, tokenizer) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in self.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise RequestError("messages", str(exc)) from exc
        return tokenizer.encode(text)

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError("top_logprobs", "needs logprobs: true")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise RequestError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        return (self.top_logprobs or 0) if self.logprobs else None
