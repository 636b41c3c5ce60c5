"""The one data path: readers -> format adapters -> `Example` -> chat template -> `Encoded` -> packing -> batch.

    from tuneforge.data import build_datasets, collate

    train, evals, report = build_datasets(cfg.data, tokenizer, "sft", chat_template=cfg.model.chat_template)
    batch = collate(train[:4], pad_token_id)       # keys besides "labels" go straight into model(**inputs)

    pairs, _, _ = build_datasets(cfg.data, tokenizer, "pairwise")   # also "kto", "prompt"
    batch = collate_pairs(pairs[:4], pad_token_id) # 8 rows: 4 chosen, then their 4 rejected
"""

from tuneforge.data.build import build_datasets, load_examples
from tuneforge.data.collate import (
    collate,
    collate_for,
    collate_kto,
    collate_kto_padding_free,
    collate_padding_free,
    collate_pairs,
    collate_pairs_padding_free,
    collate_prompts,
)
from tuneforge.data.encode import encode_chat
from tuneforge.data.packing import PackedRow, pack
from tuneforge.data.templates import BUILTIN_TEMPLATES, resolve_chat_template
from tuneforge.data.types import (
    IGNORE_INDEX,
    BadRow,
    DataReport,
    Encoded,
    EncodedKTO,
    EncodedPair,
    EncodedPrompt,
    Example,
    PairExample,
)

__all__ = ["build_datasets", "load_examples", "collate", "collate_for", "collate_padding_free", "collate_pairs",
           "collate_pairs_padding_free", "collate_kto",
           "collate_kto_padding_free", "collate_prompts",
           "encode_chat", "exact_match", "generate_example_task",
           "PackedRow", "pack", "BUILTIN_TEMPLATES", "resolve_chat_template", "IGNORE_INDEX", "BadRow", "DataReport",
           "Encoded", "EncodedKTO", "EncodedPair", "EncodedPrompt", "Example", "PairExample"]


def __getattr__(name: str):
    # The example task is imported on first use, so `python -m tuneforge.data.example_task` runs it cleanly.
    if name in ("exact_match", "generate_example_task"):
        from tuneforge.data import example_task

        return getattr(example_task, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
