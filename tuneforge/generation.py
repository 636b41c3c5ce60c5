"""Moved to `tuneforge.inference` (the generation engine); this name stays for code written against it."""

from tuneforge.inference import generate_replies, stop_token_ids

__all__ = ["generate_replies", "stop_token_ids"]
