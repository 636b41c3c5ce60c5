"""Models: loading from any source (loading.py), tiny presets (presets.py, tokenizer.py), built-in real models
(builtin.py).

    from tuneforge.models import load_model_and_tokenizer, load_tokenizer, init_model
"""

from tuneforge.models.loading import load_model_and_tokenizer, load_tokenizer
from tuneforge.models.presets import PRESETS, init_model

__all__ = ["PRESETS", "init_model", "load_model_and_tokenizer", "load_tokenizer"]
