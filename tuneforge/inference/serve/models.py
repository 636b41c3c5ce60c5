"""What the server serves: one base model and any number of named PEFT adapters on it, loaded once.

    served = load_served(ModelConfig(name_or_path="/tmp/tiny"), {"math": "outputs/math", "chat": "outputs/chat"})
    served.ids()          # ["tiny", "math", "chat"]: the ids /v1/models lists and requests name in `model`
    served.adapter_for("math")   # "math";  served.adapter_for("tiny") -> None (base model, adapters disabled)

Every adapter is checked at load: each tensor in its weights file must land on a module of the base model. An
adapter trained for another architecture (or saved with other module names) would otherwise load as nothing and
every answer would silently be the base model's (a known trap of multi-LoRA servers), so that is an error here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import UserError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][\w.:-]*$")
SERVE_ADVICE = "Pass the model it was trained on as --model (serve's default is not the recorded base)."


@dataclass
class ServedModels:
    model: object  # the (PEFT-wrapped when adapters are given) model the engine decodes with
    tokenizer: object
    base_id: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder

    def ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def knows(self, model_id: str) -> bool:
        return model_id == self.base_id or model_id in self.adapters

    def adapter_for(self, model_id: str) -> str | None:
        return model_id if model_id in self.adapters else None


def base_model_id(name_or_path: str) -> str:
    """The id clients use for the base model: a local folder's name, else the hub id / builtin name as given."""
    if name_or_path.startswith("builtin:"):
        return name_or_path.removeprefix("builtin:")
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else name_or_path


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """["NAME=DIR", ...] -> {NAME: DIR}; a bare DIR is named after its folder."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).expanduser().resolve().name, spec
        if not ADAPTER_NAME.match(name):
            raise UserError(f"--adapter {spec}: the name {name!r} must be letters, digits and . _ - : (it becomes "
                            f"the `model` id clients send). Write --adapter NAME=DIR.")
        if name in adapters:
            raise UserError(f"--adapter {spec}: the name {name!r} is given twice; each adapter needs its own name.")
        adapters[name] = folder
    return adapters


def _check_adapter_folder(name: str, folder: Path, allow_pickle: bool) -> Path:
    """The weights file of a PEFT adapter folder (or a UserError saying what the folder is instead)."""
    from tuneforge.methods.adapters import tuneforge_adapter_method
    from tuneforge.models.adapter_loading import adapter_folder

    adapter_folder(folder, "serve it with --model instead.", prefix=f"Adapter `{name}`: ")
    method = tuneforge_adapter_method(folder)
    if method is not None:
        raise UserError(f"Adapter `{name}`: {folder} is a TuneForge `{method}` adapter, which cannot be switched on "
                        f"and off per request. Serve it alone as the model (`tuneforge chat` style) or train a PEFT "
                        f"method (lora, dora, ia3, ...) to serve it next to others.")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        return weights
    if (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise UserError(f"Adapter `{name}`: {folder} holds pickle weights (adapter_model.bin), which can run code "
                            f"when loaded. Re-save it as safetensors, or pass --allow-pickle if you trust it.")
        return folder / "adapter_model.bin"
    raise UserError(f"Adapter `{name}`: {folder} has adapter_config.json but no adapter_model.safetensors.")


def _weight_file(weights: Path) -> dict:
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    import torch

    return torch.load(weights, map_location="cpu", weights_only=True)


def _weight_names(weights: Path) -> list[str]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return list(f.keys())
    return list(_weight_file(weights))


def check_adapter_matches(model, name: str, weights: Path) -> None:
    """Every tensor of the file must be a parameter the adapter put on the base model, holding the file's values
    (PEFT only warns about keys it could not place, and about names that clash with its own prefixes)."""
    import torch
    from peft import get_peft_model_state_dict

    in_file = _weight_file(weights)
    placed = get_peft_model_state_dict(model, adapter_name=name)
    unmatched = [k for k in in_file if k not in placed]
    if not in_file or not placed or unmatched:
        shown = ", ".join(unmatched[:3]) or "(the file holds no tensors)"
        raise UserError(f"Adapter `{name}` ({weights.parent}): {len(unmatched) or len(in_file)} of its "
                        f"{len(in_file)} tensors match no module of the base model (e.g. {shown}). It was probably "
                        f"trained on another model; serving it would answer with the base model's weights. Pass the "
                        f"adapter's own base model with --model.")
    differ = [k for k, v in in_file.items() if not torch.equal(placed[k].detach().cpu().to(v.dtype), v)]
    if differ:
        raise UserError(f"Adapter `{name}` ({weights.parent}): after loading, {len(differ)} tensors do not hold the "
                        f"file's values (e.g. {differ[0]}). Give the adapter another name (PEFT mis-loads names "
                        f"that clash with its own prefixes such as `lora_`).")


def check_adapters_fit(adapters: dict[str, str], base_name: str, allow_pickle: bool = False) -> None:
    """Each adapter folder is one, and was trained on a base of this shape: checked from config.json files before
    the base is loaded (a 7B model takes minutes), with the error chat and export give."""
    from tuneforge.models.adapter_loading import check_base_matches, recorded_base

    for name, folder in adapters.items():
        checked = _check_adapter_folder(name, Path(folder).expanduser(), allow_pickle).parent
        check_base_matches(checked, recorded_base(checked), base_name, SERVE_ADVICE)


def attach_adapters(model, adapters: dict[str, str], allow_pickle: bool = False, base_name: str | None = None):
    """Load each adapter under its name on one PEFT model; the first wraps the base, the others are added.
    base_name: how the user named the base, for errors."""
    from peft import PeftModel

    from tuneforge.models.adapter_loading import load_error

    for name, folder in adapters.items():
        weights = _check_adapter_folder(name, Path(folder).expanduser(), allow_pickle)
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(weights.parent), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(weights.parent), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as e:  # PEFT's size-mismatch list -> one line, as chat says it
            raise load_error(weights.parent, base_name, e, SERVE_ADVICE) from e
        check_adapter_matches(model, name, weights)
    return model


def load_served(model_cfg, adapters: dict[str, str], served_name: str | None = None,
                placement: tuple | None = None) -> ServedModels:
    """Load the base model and tokenizer through the one loading path, then the adapters (checked).
    placement: (device, dtype), default the CPU in fp32."""
    from tuneforge.models.loading import load_model_and_tokenizer

    base_id = served_name or base_model_id(model_cfg.name_or_path)
    if base_id in adapters:
        raise UserError(f"The adapter name {base_id!r} is also the base model's id; give the adapter another name "
                        f"(--adapter OTHER=DIR) or the base another one (--served-model-name).")
    import torch

    check_adapters_fit(adapters, model_cfg.name_or_path, model_cfg.allow_pickle)
    device, dtype = placement or ("cpu", torch.float32)
    model, tokenizer = load_model_and_tokenizer(model_cfg, dtype=dtype, device=device)
    model = attach_adapters(model, adapters, model_cfg.allow_pickle, model_cfg.name_or_path)
    return ServedModels(model=model.eval(), tokenizer=tokenizer, base_id=base_id, adapters=dict(adapters))
