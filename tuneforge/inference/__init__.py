"""The one generation engine (see engine.py): batched, KV-cached, continuously batched, streaming."""

from tuneforge.inference.engine import Engine, encode_chat, generate_replies, stop_token_ids
from tuneforge.inference.types import Completion, Delta, SamplingParams

__all__ = ["Completion", "Delta", "Engine", "SamplingParams", "encode_chat", "generate_replies", "stop_token_ids"]
