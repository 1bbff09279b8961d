"""seekformer: the DeepSeek family of language models in readable PyTorch."""

from .checkpoint import CheckpointError, load_model, save_pretrained
from .config import ConfigError, ModelConfig
from .model.transformer import Transformer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "Transformer",
    "load_model",
    "save_pretrained",
]
__version__ = "0.1.0"
