"""Inference: the generation engine, chat, the OpenAI-compatible server (serve/) and export (export/)."""
