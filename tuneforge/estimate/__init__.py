"""`tuneforge estimate`: parameters and memory per GPU for each fine-tuning method, computed from model shapes.

- memory.py: the estimator itself (trainable counts, memory parts, ZeRO/FSDP sharding, the CLI table).
- shapes.py: model shapes (presets, a config.json, a hub id's known shape) and how to read them.
"""
