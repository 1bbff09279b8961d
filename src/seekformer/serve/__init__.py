"""Serving: a continuous-batching engine over a paged latent cache, and an OpenAI-compatible HTTP API
(`seekformer serve`; the HTTP part needs the `serve` extra: fastapi, uvicorn, pydantic)."""

from .engine import ChoiceOutput, Delta, Engine, RequestHandle, RequestOutput, TokenLogprob
from .errors import QueueFull, RequestError
from .sampling import RequestSampling

__all__ = ["ChoiceOutput", "Delta", "Engine", "QueueFull", "RequestError", "RequestHandle", "RequestOutput",
           "RequestSampling", "TokenLogprob"]
