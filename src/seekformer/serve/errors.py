"""Errors a request can cause; the HTTP layer turns them into OpenAI-style 4xx bodies."""

from __future__ import annotations


class RequestError(ValueError):
    """A request is invalid; `field` names the part of it that is wrong (OpenAI's `param`)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit; the client should retry later (HTTP 429)."""
