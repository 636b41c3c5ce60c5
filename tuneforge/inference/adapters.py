"""Running any loaded model (+ adapters from any registry method) one batch step at a time.

- Plain transformers models, including ones changed in place (full, bitfit, TuneForge's bottleneck `adapter`):
  called as they are.
- PEFT LoRA-style, IA3 and LLaMA-Adapter models: called through the PeftModel with the request's adapter active;
  `None` runs the base model (adapters disabled). A LoRA model also runs rows with different adapters in one batch
  (PEFT's mixed-batch `adapter_names`).
- PEFT prompt-learning models (prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2): their only effect is extra
  positions every sequence starts with (soft-prompt embeddings or per-layer key/values), so the engine turns each
  adapter into a KV prefix once (`prefix`) and puts it in the cache before the prompt; the base model then runs
  unchanged, and rows with different prompt adapters share a batch. Positions follow PEFT's `generate`: the
  virtual tokens take positions 0..n-1 and the prompt starts at n.
"""

from __future__ import annotations

import contextlib

import torch

from tuneforge.errors import UserError
from tuneforge.inference import kv
from tuneforge.kernels.onednn_linear import auto_linears
from tuneforge.methods.base import unwrap


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def active_adapter(model) -> str | None:
    """The adapter a PEFT model runs by default (None for other models): what chat and eval mean by "the model"."""
    model = unwrap(model)
    return model.active_adapter if _is_peft(model) else None


class ModelRunner:
    """One forward step of a batch whose rows may ask for different adapters."""

    def __init__(self, model):
        self.model = unwrap(model)
        self.peft = _is_peft(self.model)
        configs = self.model.peft_config if self.peft else {}
        self.prompt_learning = self.peft and any(c.is_prompt_learning for c in configs.values())
        self.module = self.model.get_base_model() if self.prompt_learning else self.model
        self.mixable = self.prompt_learning or (self.peft and type(self.model.base_model).__name__ == "LoraModel")
        self._prefixes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config) if self.peft else []

    def check(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none (the model has no PEFT adapters)"
            raise UserError(f"Unknown adapter {adapter!r}; the loaded adapters are: {known}.")

    def can_share(self, a: str | None, b: str | None) -> bool:
        """Whether rows for adapters a and b may decode in the same batch."""
        return a == b or self.mixable

    def prefix_len(self, adapter: str | None) -> int:
        """How many virtual positions the adapter puts before the prompt (from its config: no model call)."""
        if not self.prompt_learning or adapter is None:
            return 0
        return int(self.model.peft_config[adapter].num_virtual_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def prefix(self, adapter: str | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The per-layer key/values ([1, H, n, D]) a prompt-learning adapter puts before every prompt, or None."""
        if not self.prompt_learning or adapter is None:
            return None
        if adapter not in self._prefixes:
            self._prefixes[adapter] = self._compute_prefix(adapter)
        return self._prefixes[adapter]

    def _compute_prefix(self, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from peft.utils import PeftType

        with self._active(adapter):
            prompt = self.model.get_prompt(batch_size=1)
        if self.model.peft_config[adapter].peft_type == PeftType.PREFIX_TUNING:
            return [(layer.keys, layer.values) for layer in prompt.layers]
        # Soft prompts (prompt tuning, p-tuning): run the virtual embeddings through the base model once; being
        # first in every sequence, their keys/values never depend on what follows.
        cache = kv.empty_cache()
        n = prompt.shape[1]
        dtype = next(self.module.parameters()).dtype
        self.module(inputs_embeds=prompt.to(dtype), past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(n, device=prompt.device)[None], logits_to_keep=1)
        return kv.tensors_of(cache)

    @contextlib.contextmanager
    def _active(self, adapter: str | None):
        """Run with `adapter` active (None: adapters disabled); restores the previous state."""
        if not self.peft or self.prompt_learning and adapter is None:
            yield
            return
        if adapter is None:
            with self.model.disable_adapter():
                yield
            return
        previous = self.model.active_adapter
        if previous != adapter:
            self.model.set_adapter(adapter)
        try:
            yield
        finally:
            if previous != adapter:
                self.model.set_adapter(previous)

    def forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str | None]) -> torch.Tensor:
        """Logits of the last position of every row, [B, V] float32."""
        with auto_linears(input_ids.device):  # fp32 on CPU: oneDNN's GEMMs where faster (kernels/onednn_linear.py)
            return self._forward(input_ids, attention_mask, position_ids, cache, adapters)

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str | None]) -> torch.Tensor:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        if self.prompt_learning:  # the prefix is already in the cache
            return self.module(**kwargs).logits[:, -1].float()
        first = adapters[0]
        if all(a == first for a in adapters):
            with self._active(first):
                return self.module(**kwargs).logits[:, -1].float()
        names = [a if a is not None else "__base__" for a in adapters]
        return self.module(**kwargs, adapter_names=names).logits[:, -1].float()
