"""What the server serves: one base model and any number of named PEFT adapters on it, loaded once.

    served = load_served(ModelConfig(name_or_path="/tmp/tiny"), {"math": "outputs/math", "chat": "outputs/chat"})
    served.ids()          # ["tiny", "math", "chat"]: the ids /v1/models lists and requests name in `model`
    served.adapter_for("math")   # "served_0": its PEFT name;  served.adapter_for("tiny") -> None (the base model)

Adapters get PEFT names of their own (`served_0`, ...), so a client-facing name PEFT reserves (`lora`, `ia3`: part of
its parameter prefixes) or cannot hold (`v1.2`: a dot) still loads right. PEFT holds adapters of one type per model,
so one server takes adapters of one PEFT type. A TuneForge `adapter` (bottleneck) folder cannot be switched off per
request: it is served alone, built into the model, under its name only (the plain base is not served then).

An adapter run that trained with its own chat template (`model.chat_template`, which `chat` and `export` also read)
has its requests rendered with that template; the base model's requests keep the model's own. `--chat-template`
sets one template for every served id instead (as it does for `chat --adapter`).

Every adapter is checked at load: each tensor in its weights file must land on a module of the base model. An
adapter trained for another architecture (or saved with other module names) would otherwise load as nothing and
every answer would silently be the base model's (a known trap of multi-LoRA servers), so that is an error here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
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
    peft_names: dict[str, str] = field(default_factory=dict)  # name -> the adapter's name in the PEFT model
    built_in: bool = False  # the one adapter is part of the model (TuneForge `adapter`): every request gets it
    templates: dict[str, str] = field(default_factory=dict)  # name -> Jinja source it trained with (if not the base's)

    def ids(self) -> list[str]:
        return list(self.adapters) if self.built_in else [self.base_id, *self.adapters]

    def knows(self, model_id: str) -> bool:
        return model_id in self.ids()

    def adapter_for(self, model_id: str) -> str | None:
        return self.peft_names.get(model_id, model_id) if model_id in self.adapters and not self.built_in else None

    def template_for(self, model_id: str) -> str | None:
        """The chat template to render `model_id`'s requests with; None: the tokenizer's own."""
        return self.templates.get(model_id)

    def template_notes(self) -> list[str]:
        """One line per adapter served with its own trained template (printed at start)."""
        from tuneforge.data.templates import is_jinja_source
        from tuneforge.models.adapter_loading import recorded_template

        notes = []
        for name in self.templates:
            folder = Path(self.adapters[name]).expanduser()
            recorded = recorded_template(folder) or ""
            shown = "Jinja source" if is_jinja_source(recorded) else recorded
            source = (f"the chat template `{shown}` (model.chat_template in {folder / 'tuneforge_config.yaml'})"
                      if recorded else f"the chat template saved beside it in {folder} (not the model's own)")
            others = "" if self.built_in else f"; `{self.base_id}` and adapters without one keep the model's own"
            notes.append(f"note: adapter `{name}` was trained with {source}: its requests are rendered with "
                         f"it{others}. --chat-template sets one template for all.")
        return notes


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
    if method is not None:  # load_served serves it without this check; vLLM cannot run it at all
        raise UserError(f"Adapter `{name}`: {folder} is a TuneForge `{method}` adapter, which PEFT and vLLM cannot "
                        f"load. Serve it alone with the default --backend tuneforge.")
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

    from tuneforge.methods.base import vocab_resized

    in_file = _weight_file(weights)
    # as the adapter was saved (save_peft); PEFT's "auto" looks the base's name up on the Hub, which a built-in's
    # name is not: a raw "Could not find a config file" warning and a network wait at start-up
    placed = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=vocab_resized(model))
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


def adapter_kind(folder: Path) -> str:
    """What kind of adapter a folder holds: the TuneForge method for TuneForge's own format (e.g. "adapter"), else
    PEFT's type in lower case ("lora" also for dora/rslora/pissa, "prefix_tuning" also for p_tuning_v2)."""
    import json

    from tuneforge.methods.adapters import tuneforge_adapter_method

    method = tuneforge_adapter_method(folder)
    if method is not None:
        return method
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "unknown"
    return str(config.get("peft_type", "unknown") if isinstance(config, dict) else "unknown").lower()


def _check_kinds(adapters: dict[str, str], kinds: dict[str, str], built_in: list[str], base: str) -> None:
    """A TuneForge adapter (`built_in`: their names) only alone, and PEFT adapters of one type (PEFT refuses to
    combine types, in words that blame the base model)."""
    if built_in and len(adapters) > 1:
        name = built_in[0]
        others = " ".join(f"{n}={d}" for n, d in adapters.items() if n != name)
        raise UserError(f"Adapter `{name}` ({adapters[name]}) is a TuneForge `{kinds[name]}` adapter: it becomes "
                        f"part of the model's layers and cannot be switched off per request, so a server holds it "
                        f"only alone. Serve it by itself (`tuneforge serve --model {base} --adapter {name}="
                        f"{adapters[name]}`: every request gets it) and the others from a second server on another "
                        f"--port (`--adapter {others}`).")
    groups: dict[str, list[str]] = {}
    for name, kind in kinds.items():
        groups.setdefault(kind, []).append(name)
    if len(groups) > 1:
        shown = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in groups.items())
        commands = " and ".join(f"`tuneforge serve --model {base} --adapter "
                                f"{' '.join(f'{n}={adapters[n]}' for n in names)} --port {8000 + i}`"
                                for i, names in enumerate(groups.values()))
        raise UserError(f"One server takes adapters of one PEFT type (PEFT holds one type per model), and these are "
                        f"of {len(groups)} types ({shown}). Start one server per type, each on its own port: "
                        f"{commands}.")


def check_adapters_fit(adapters: dict[str, str], base_name: str, allow_pickle: bool = False) -> bool:
    """Each adapter folder is one, they can share a server, and each was trained on a base of this shape: checked
    from config files before the base is loaded (a 7B model takes minutes), with the error chat and export give.
    Returns whether the one adapter is a TuneForge adapter, to be built into the model."""
    from tuneforge.methods.adapters import tuneforge_adapter_method
    from tuneforge.models.adapter_loading import adapter_folder, check_base_matches, recorded_base

    for name, folder in adapters.items():
        adapter_folder(Path(folder).expanduser(), "serve it with --model instead.", prefix=f"Adapter `{name}`: ")
    kinds = {name: adapter_kind(Path(folder).expanduser()) for name, folder in adapters.items()}
    built_in = [n for n, folder in adapters.items() if tuneforge_adapter_method(Path(folder).expanduser())]
    _check_kinds(adapters, kinds, built_in, base_name)
    for name, folder in adapters.items():
        checked = Path(folder).expanduser()
        if not built_in:
            checked = _check_adapter_folder(name, checked, allow_pickle).parent
        check_base_matches(checked, recorded_base(checked), base_name, SERVE_ADVICE)
    return bool(built_in)


def peft_names(adapters: dict[str, str]) -> dict[str, str]:
    """name -> the adapter's name inside the PEFT model: PEFT mis-loads names inside its parameter prefixes (`ia3`
    of `ia3_`, `lora` of `lora_`, even `a`) and cannot hold a dot, so none of the clients' names is used there."""
    return {name: f"served_{i}" for i, name in enumerate(adapters)}


def attach_adapters(model, adapters: dict[str, str], allow_pickle: bool = False, base_name: str | None = None,
                    names: dict[str, str] | None = None):
    """Load each adapter on one PEFT model under its PEFT name (`names`, default its own name); the first wraps the
    base, the others are added. base_name: how the user named the base, for errors."""
    from peft import PeftModel

    from tuneforge.models.adapter_loading import load_error

    for name, folder in adapters.items():
        weights = _check_adapter_folder(name, Path(folder).expanduser(), allow_pickle)
        inner = (names or {}).get(name, name)
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(weights.parent), adapter_name=inner)
            else:
                model = PeftModel.from_pretrained(model, str(weights.parent), adapter_name=inner)
        except (ValueError, KeyError, RuntimeError) as e:  # PEFT's size-mismatch list -> one line, as chat says it
            raise load_error(weights.parent, base_name, e, SERVE_ADVICE) from e
        check_adapter_matches(model, inner, weights)
    return model


def build_in(model, name: str, folder: str, base_name: str):
    """The model with a TuneForge adapter folder put into its layers (as chat loads it)."""
    from tuneforge.methods.adapters import load_adapter_folder
    from tuneforge.models.adapter_loading import load_error

    try:
        return load_adapter_folder(model, Path(folder).expanduser())
    except (ValueError, KeyError, RuntimeError) as e:
        raise load_error(Path(folder), base_name, e, SERVE_ADVICE) from e


def load_served(model_cfg, adapters: dict[str, str], served_name: str | None = None,
                placement: tuple | None = None) -> ServedModels:
    """Load the base model and tokenizer through the one loading path, then the adapters (checked).
    placement: (device, dtype), default the CPU in fp32."""
    from tuneforge.models.loading import load_model_and_tokenizer

    base_id = served_name or base_model_id(model_cfg.name_or_path)
    import torch

    built_in = check_adapters_fit(adapters, model_cfg.name_or_path, model_cfg.allow_pickle)
    if base_id in adapters and not built_in:  # built in: the base is not served, so no clash
        raise UserError(f"The adapter name {base_id!r} is also the base model's id; give the adapter another name "
                        f"(--adapter OTHER=DIR) or the base another one (--served-model-name).")
    trained = trained_templates(adapters, model_cfg.chat_template)
    if built_in and trained:  # the base is not served: the adapter's template becomes the tokenizer's own
        model_cfg = replace(model_cfg, chat_template=next(iter(trained.values())))
    device, dtype = placement or ("cpu", torch.float32)
    model, tokenizer = load_model_and_tokenizer(model_cfg, dtype=dtype, device=device)
    if built_in:
        (name, folder), = adapters.items()
        model = build_in(model, name, folder, model_cfg.name_or_path)
        return ServedModels(model=model.eval(), tokenizer=tokenizer, base_id=base_id, adapters=dict(adapters),
                            built_in=True, templates={name: tokenizer.chat_template} if trained else {})
    names = peft_names(adapters)
    model = attach_adapters(model, adapters, model_cfg.allow_pickle, model_cfg.name_or_path, names)
    return ServedModels(model=model.eval(), tokenizer=tokenizer, base_id=base_id, adapters=dict(adapters),
                        peft_names=names, templates=own_templates(tokenizer, trained))


def trained_templates(adapters: dict[str, str], override: str | None) -> dict[str, str]:
    """name -> the `model.chat_template` each adapter's run trained with (as `chat --adapter` reads it); none when
    --chat-template sets one template for all."""
    from tuneforge.models.adapter_loading import trained_template

    if override:
        return {}
    found = {name: trained_template(Path(folder).expanduser()) for name, folder in adapters.items()}
    return {name: template for name, template in found.items() if template}


def own_templates(tokenizer, trained: dict[str, str]) -> dict[str, str]:
    """The trained templates as Jinja source (read once, checked at load), leaving out any that is the base's own."""
    from tuneforge.data.templates import resolve_chat_template

    sources = {name: resolve_chat_template(tokenizer, template) for name, template in trained.items()}
    return {name: source for name, source in sources.items() if source != tokenizer.chat_template}
