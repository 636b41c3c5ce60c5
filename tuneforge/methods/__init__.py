"""The method registry: `METHODS[name]` is a `Method`. Each module below registers its methods on import."""

from __future__ import annotations

from tuneforge.methods.base import Method

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    from tuneforge.errors import ConfigError, did_you_mean

    if name not in METHODS:
        raise ConfigError(f"Unknown method `{name}`.{did_you_mean(name, METHODS)}")
    return METHODS[name]


# One import per method module (registration happens at import).
from tuneforge.methods import (  # noqa: E402,F401
    adapters,
    bitfit,
    full,
    ia3,
    llama_adapter,
    lora,
    lora_variants,
    prompts,
    prompts_v2,
    qlora,
)
