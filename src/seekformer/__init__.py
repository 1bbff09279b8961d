"""seekformer: the DeepSeek family of language models in readable PyTorch."""

from .checkpoint import CheckpointError, save_pretrained
from .config import ConfigError, ModelConfig
from .inference import generate
from .model.transformer import Transformer
from .tokenizer import load_tokenizer

load_model = Transformer.from_pretrained

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "Transformer",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_pretrained",
]
__version__ = "0.1.0"
