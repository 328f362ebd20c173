"""cspkit: train weight-sparse transformers, find their circuits, explore them, bridge to dense models."""
from . import checkpoint, data, tasks
from .checkpoint import load
from .tokenizer import get_encoding

__all__ = ["load", "get_encoding", "checkpoint", "data", "tasks"]
__version__ = "0.1.0"
