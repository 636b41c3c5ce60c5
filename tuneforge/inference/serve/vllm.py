"""`tuneforge serve --backend vllm`: hand the model (and LoRA adapters) to vLLM's own OpenAI server.

    tuneforge export --model M --adapter outputs/run --out outputs/merged     # a plain HF folder
    tuneforge serve --model outputs/merged --backend vllm --port 8000
    tuneforge serve --model outputs/base --adapter math=outputs/math --backend vllm   # LoRA served by vLLM

vLLM needs Linux, a CUDA GPU and `pip install vllm`; anything else is a clear error (the default backend, TuneForge's
own engine, runs everywhere). The command is built here and run in place of this process's server, with the same
host/port/API key/model ids as the default backend: the key travels in VLLM_API_KEY (never on the command line,
where other users could read it in the process list). Adapters are checked against the base model's checkpoint
before vLLM starts, because vLLM loads a LoRA whose module names match nothing without complaint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tuneforge.errors import UserError

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def check_vllm_available() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm needs vLLM, which is not installed: `pip install vllm` (Linux with a CUDA "
                        "GPU). Without a GPU, use the default --backend tuneforge.")
    import torch

    if not torch.cuda.is_available():
        raise UserError("--backend vllm needs a CUDA GPU and none is visible. Use the default --backend tuneforge "
                        "(CPU or GPU).")


def _model_folder(model: str) -> str:
    if model.startswith("builtin:"):
        raise UserError(f"--backend vllm serves Hugging Face folders or hub ids; {model} is a built-in model. Export "
                        f"it first (`tuneforge export --model {model} --out DIR`) and serve DIR.")
    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"--backend vllm: {path} has no config.json. Serve a merged/exported Hugging Face folder "
                        f"(`tuneforge export ... --out DIR`), with adapters given by --adapter NAME=DIR.")
    return str(path) if path.exists() else model


def _checkpoint_weight_names(folder: Path) -> set[str] | None:
    """The base model's tensor names from its safetensors files (headers only), or None when unknown."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


def check_lora_against_checkpoint(name: str, adapter_dir: Path, base_names: set[str]) -> int:
    """Each LoRA tensor must sit on a weight of the base checkpoint; returns the adapter's rank."""
    from tuneforge.inference.serve.models import _check_adapter_folder, _weight_names

    weights = _check_adapter_folder(name, adapter_dir, allow_pickle=False)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"Adapter `{name}` is a {config.get('peft_type')} adapter; vLLM serves LoRA adapters only. "
                        f"Merge it (`tuneforge export`) or use the default --backend tuneforge.")
    missing = []
    for key in _weight_names(weights):
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        if f"{module}.weight" not in base_names:
            missing.append(key)
    if missing:
        raise UserError(f"Adapter `{name}` ({adapter_dir}): {len(missing)} of its tensors match no weight of the base "
                        f"model (e.g. {missing[0]}); vLLM would serve the base model's answers under its name. Pass "
                        f"the adapter's own base model with --model.")
    return int(config.get("r", 8))


def vllm_command(args, base_id: str, python: str = sys.executable, template_file: Path | None = None) -> list[str]:
    """vLLM's OpenAI server command line for the same model ids, address and limits as `tuneforge serve`;
    `template_file`: the chat template for every request (see `vllm_chat_template`)."""
    from tuneforge.inference.serve.models import parse_adapter_specs

    model = _model_folder(args.model)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", base_id,
           "--host", args.host, "--port", str(args.port), "--max-num-seqs", str(args.max_batch_size)]
    adapters = parse_adapter_specs(args.adapter)
    if adapters:
        base_names = _checkpoint_weight_names(Path(model)) if Path(model).is_dir() else None
        ranks = []
        for name, folder in adapters.items():
            folder = Path(folder).expanduser()
            ranks.append(check_lora_against_checkpoint(name, folder, base_names) if base_names is not None
                         else int(json.loads((folder / "adapter_config.json").read_text()).get("r", 8)))
        rank = next((r for r in LORA_RANKS if r >= max(ranks)), max(ranks))
        cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(rank), "--lora-modules",
                *(f"{name}={Path(folder).expanduser()}" for name, folder in adapters.items())]
    if template_file is not None:
        cmd += ["--chat-template", str(template_file)]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd + list(args.vllm_args)


def vllm_chat_template(args) -> str | None:
    """The Jinja source vLLM should render every request with, or None for the model's own. vLLM reads a file or
    Jinja text, not TuneForge's built-in names (`--chat-template chatml` would render the word), so a name is
    resolved here. vLLM has one template for all ids: an adapter trained with another template than the base's
    (recorded in its run, or saved beside it) is refused unless --chat-template says which to use."""
    from tuneforge.data.templates import resolve_chat_template
    from tuneforge.inference.serve.models import parse_adapter_specs, trained_templates
    from tuneforge.models.adapter_loading import saved_template

    if args.chat_template:
        return resolve_chat_template(None, args.chat_template)
    model = Path(args.model).expanduser()
    base = saved_template(model) if model.is_dir() else None
    trained = trained_templates(parse_adapter_specs(args.adapter), None)
    differ = sorted(name for name, template in trained.items() if resolve_chat_template(None, template) != base)
    if differ:
        raise UserError(f"Adapter(s) {', '.join(differ)} were trained with another chat template than the base "
                        f"model's, and vLLM renders every request with one template. Pass the one to use with "
                        f"--chat-template (a built-in name, a .jinja file or Jinja text; it applies to the base "
                        f"model's requests too), or serve with the default --backend tuneforge, which renders each "
                        f"adapter's requests with its own.")
    return None


def run_vllm(args) -> int:
    from tuneforge.inference.serve.models import base_model_id

    check_vllm_available()
    template = vllm_chat_template(args)
    with tempfile.TemporaryDirectory(prefix="tuneforge-vllm-") as folder:  # vLLM reads it at start; kept while it runs
        template_file = None
        if template is not None:
            template_file = Path(folder) / "chat_template.jinja"
            template_file.write_text(template, encoding="utf-8")
        return _exec_vllm(args, vllm_command(args, args.served_model_name or base_model_id(args.model),
                                             template_file=template_file))


def _exec_vllm(args, cmd: list[str]) -> int:
    from tuneforge.inference.serve.main import is_loopback, resolve_api_key

    env = dict(os.environ)
    key = resolve_api_key(args)
    if key:
        env["VLLM_API_KEY"] = key
    elif not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key.", file=sys.stderr)
    print("Starting vLLM:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)
