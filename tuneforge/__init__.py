"""TuneForge: from base weights to a fine-tuned, aligned, evaluated and served LLM."""

__version__ = "0.1.0"
