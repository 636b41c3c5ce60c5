"""`adapter`: bottleneck adapters after attention and after the MLP of every block.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP" (https://arxiv.org/abs/1902.00751):
    sequential:  h = f(x);  h <- h + s * up(act(down(h)))
He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (https://arxiv.org/abs/2110.04366):
    parallel:    h = f(x) + s * up(act(down(x)))
where f is the block's attention or MLP sub-layer, down: hidden -> bottleneck, up: bottleneck -> hidden. `up` starts
at zero, so the model is unchanged before the first step.

Hand-written because PEFT does not implement bottleneck adapters. The adapters are child modules of each `self_attn`
and `mlp` (named `tuneforge_adapter`) and run from forward hooks on those sub-layers, so the base model's own
parameter names and code stay untouched (this works for any decoder whose blocks have `self_attn` and `mlp`, e.g.
Llama, Qwen2, Mistral). The non-linearity makes them impossible to fold into the base weights: no merge.

Saved folder (NOT a PEFT adapter; `peft.PeftModel.from_pretrained` cannot read it):
    adapter_config.json        {"tuneforge_method": "adapter", "options": {...}, "base_model_name_or_path": ...}
    adapter_model.safetensors  the adapter tensors only, named as in the adapted model
Loaders tell it apart from a PEFT adapter by the `tuneforge_method` key (`tuneforge_adapter_method`), or just call
`load_adapter_folder`, which dispatches to this method or to PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tuneforge.configs.typed import from_dict, opt
from tuneforge.errors import ConfigError, UserError
from tuneforge.methods import register
from tuneforge.methods.base import Method, freeze_all, unwrap
from tuneforge.methods.full import decoder_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
SUBLAYERS = ("self_attn", "mlp")
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}


@dataclass
class AdapterOptions:
    bottleneck_size: int = opt(64, "Width of the adapter bottleneck (Houlsby et al. used 8-256; about hidden/16 is "
                                   "a common start). Each adapter has 2*hidden*size + size + hidden parameters.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = opt("relu", "Activation inside the bottleneck.")
    placement: Literal["sequential", "parallel"] = opt(
        "sequential", "sequential (Houlsby): adapt the sub-layer's output; parallel (He et al., 2022): feed the "
                      "sub-layer's input to the adapter and add the result to its output.")
    scaling: float = opt(1.0, "Multiplier on the adapter output (He et al. use 4.0 for parallel adapters).")


class BottleneckAdapter(torch.nn.Module):
    """down -> act -> up, scaled; `up` zero-initialised. Kept in fp32 when the base is half precision or quantized
    (like PEFT does for its adapters), so small updates are not lost to rounding."""

    def __init__(self, hidden: int, opts: AdapterOptions, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.placement = opts.placement
        self.scaling = opts.scaling
        self.down = torch.nn.Linear(hidden, opts.bottleneck_size, dtype=dtype, device=device)
        self.act = ACTIVATIONS[opts.non_linearity]()
        self.up = torch.nn.Linear(opts.bottleneck_size, hidden, dtype=dtype, device=device)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.act(self.down(x.to(self.down.weight.dtype))))
        return (self.scaling * y).to(x.dtype)

    def hook(self, module, args, kwargs, output):
        """Forward hook on the sub-layer. HF attention returns a tuple (hidden, attn_weights); MLPs a tensor."""
        hidden = output[0] if isinstance(output, tuple) else output
        if self.placement == "sequential":
            source = hidden
        else:
            source = args[0] if args else kwargs["hidden_states"]
        hidden = hidden + self(source)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _hidden_size(model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def inject_adapters(model: torch.nn.Module, opts: AdapterOptions) -> list[str]:
    """Add one adapter to `self_attn` and one to `mlp` of every block; returns the adapted sub-layer names."""
    base = unwrap(model)
    stack_name, layers = decoder_layers(base)
    hidden = _hidden_size(base)
    adapted = []
    for i, layer in enumerate(layers):
        for sub in SUBLAYERS:
            module = getattr(layer, sub, None)
            if module is None:
                raise ConfigError(f"Method `adapter`: block {i} of {type(base).__name__} has no `{sub}` sub-layer; "
                                  f"adapters support Llama-style decoders (Llama, Qwen2, Mistral). Use `lora`.")
            if hasattr(module, "tuneforge_adapter"):
                raise UserError(f"Method `adapter`: {stack_name}.{i}.{sub} already has an adapter.")
            ref = next(module.parameters())
            dtype = ref.dtype if ref.dtype == torch.float64 else torch.float32  # fp32 under half/quantized bases
            adapter = BottleneckAdapter(hidden, opts, dtype=dtype, device=ref.device)
            module.tuneforge_adapter = adapter
            module.register_forward_hook(adapter.hook, with_kwargs=True)
            adapted.append(f"{stack_name}.{i}.{sub}")
    return adapted


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in unwrap(model).named_parameters() if ".tuneforge_adapter." in n}


def tuneforge_adapter_method(path: str | os.PathLike) -> str | None:
    """The TuneForge method that wrote the adapter folder `path` (e.g. "adapter"), or None for a PEFT adapter or a
    folder without adapter_config.json. Chat/eval loaders call this before falling back to PEFT."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("tuneforge_method")
    except (json.JSONDecodeError, AttributeError):
        return None


def load_adapter_folder(base_model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Put any saved adapter folder on a base model: a TuneForge one (by its `tuneforge_method` key) through that
    method's `load`, otherwise a PEFT one through `peft.PeftModel.from_pretrained`. For chat/eval/serve."""
    from tuneforge.methods import get_method

    method = tuneforge_adapter_method(path)
    if method is not None:
        return get_method(method).load(base_model, Path(path))
    if not (Path(path) / CONFIG_NAME).is_file():
        raise UserError(f"{path} has no {CONFIG_NAME}, so it is not an adapter folder. Pass a folder written by "
                        f"`tuneforge train` with an adapter method (lora, adapter, p_tuning_v2, ...).")
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(path))


def _write_folder(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write config + weights into a temp folder beside `out_dir`, then move the files in (never half-written)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "tuneforge_method": "adapter"})
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # config last: a folder with a config always has its weights
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Adapter(Method):
    name = "adapter"
    section = "adapter"
    Options = AdapterOptions
    mergeable = False
    saves_adapter = True
    summary = "Houlsby bottleneck adapters after attention and MLP (sequential or parallel); no merge."
    guide = "Classic multi-task setups that keep one small module per task; prefer LoRA when you want to merge."

    def validate(self, cfg):
        o = cfg.options(self.section)
        if o.bottleneck_size < 1:
            raise ConfigError(f"`adapter.bottleneck_size` must be at least 1, got {o.bottleneck_size}.")
        if o.scaling == 0:
            raise ConfigError("`adapter.scaling` is 0: the adapters would have no effect. Use e.g. 1.0.")

    def apply(self, model, opts, cfg):
        freeze_all(model)
        inject_adapters(model, opts)  # new parameters default to requires_grad=True
        return model

    def save(self, model, out_dir):
        base = unwrap(model)
        opts = self._options_of(base)
        config = {"tuneforge_method": self.name, "format_version": FORMAT_VERSION,
                  "base_model_name_or_path": getattr(base, "name_or_path", None),
                  "hidden_size": _hidden_size(base), "options": dataclasses.asdict(opts)}
        _write_folder(Path(out_dir), config, adapter_state_dict(base))

    def _options_of(self, base) -> AdapterOptions:
        """Read the options back from the injected modules (the single source of truth once applied)."""
        adapters = [m for m in base.modules() if isinstance(m, BottleneckAdapter)]
        if not adapters:
            raise UserError("Method `adapter`: this model has no adapters to save (was `apply` run?).")
        a = adapters[0]
        act = next(k for k, v in ACTIVATIONS.items() if isinstance(a.act, v))
        return AdapterOptions(bottleneck_size=a.down.out_features, non_linearity=act, placement=a.placement,
                              scaling=a.scaling)

    def load(self, base_model, path):
        from safetensors.torch import load_file

        path = Path(path)
        method = tuneforge_adapter_method(path)
        if method != self.name:
            raise UserError(f"{path} is not a TuneForge `adapter` folder (its {CONFIG_NAME} has tuneforge_method="
                            f"{method!r}); PEFT adapters load with their own method, e.g. `lora`.")
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        opts = from_dict(AdapterOptions, config.get("options") or {}, prefix=f"{path / CONFIG_NAME}: options")
        if config.get("hidden_size") not in (None, _hidden_size(unwrap(base_model))):
            raise UserError(f"{path} was trained on a model with hidden size {config['hidden_size']} "
                            f"({config.get('base_model_name_or_path')}), but the base model given has hidden size "
                            f"{_hidden_size(unwrap(base_model))}. Load it on the model it was trained from.")
        inject_adapters(base_model, opts)
        self._load_tensors(base_model, load_file(str(path / WEIGHTS_NAME)), path)
        freeze_all(base_model)
        return base_model.eval()

    @staticmethod
    def _load_tensors(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
        params = dict(adapter_state_dict(model))
        missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
        if missing or unexpected:
            raise UserError(f"{path / WEIGHTS_NAME} does not match this model's blocks: missing "
                            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}. Load it on the base model "
                            f"it was trained from.")
        with torch.no_grad():
            for name, param in unwrap(model).named_parameters():
                if name in tensors:
                    param.copy_(tensors[name])


register(Adapter())
