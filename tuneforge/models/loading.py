"""One code path that loads a model and its tokenizer, whatever the source.

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct"))

`name_or_path` is a local Hugging Face folder, a hub id, or `builtin:<name>` (fetched and converted once, then a
local folder; see builtin.py). All three end in the same `from_pretrained` calls, so what works for a tiny test
model works for a real one. Security defaults: `trust_remote_code` stays off unless the config turns it on, and
pickle weights (.bin/.pt/.pth) are refused unless `model.allow_pickle: true`, because unpickling runs code.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from tuneforge.errors import UserError, cannot_write, close_name_near

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `gpt2` or `org/name`


@contextmanager
def atomic_folder(final: Path, replace: bool = True):
    """Yield a temp folder next to `final`; on success it is renamed to `final` (replacing an existing one when
    `replace`), on error it is removed. Readers therefore see either no folder or a complete one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _remove_killed_writes(final)
    _make_folder(tmp, final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{final} already exists; remove it or choose another folder.")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def _remove_killed_writes(final: Path) -> None:
    """Temp folders of earlier writes of `final` whose process is gone (SIGKILL, a crashed machine: no clean-up ran)
    are removed; a live one (another export at work) is left alone."""
    from tuneforge.training.output_dir import pid_alive

    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and p.is_dir() and not p.is_symlink() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def check_can_create(final: Path, what: str = "") -> None:
    """Fail before any work when `atomic_folder(final)` could not create its temp folder (a file on the way, a
    read-only or forbidden place): the error names the folder and the reason, instead of a traceback after the
    model has loaded and merged. Leaves only the parent folders, which the real write creates anyway."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"Cannot write {what + ' ' if what else ''}{final}: it is a file, not a folder. Pick a "
                        f"folder path.")
    probe = final.with_name(f".{final.name}.probe-{os.getpid()}")
    _make_folder(probe, final, what)
    probe.rmdir()


def _make_folder(folder: Path, final: Path, what: str = "") -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
    except OSError as e:
        raise cannot_write(final, e, what) from None


def resolve_source(name_or_path: str) -> str:
    """A local folder for local and builtin sources (checked), the hub id unchanged otherwise."""
    if name_or_path.startswith("builtin:"):
        from tuneforge.models.builtin import resolve_builtin

        return str(resolve_builtin(name_or_path.removeprefix("builtin:")))
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_local_folder(path)
        return str(path)
    if looks_local(name_or_path):
        raise UserError(f"Model folder {name_or_path} does not exist (relative paths count from the current folder, "
                        f"{Path.cwd()}).{close_name_near(name_or_path, folders_only=True)} Pass an existing Hugging "
                        f"Face folder (with config.json), a hub id like Qwen/Qwen2.5-0.5B-Instruct, or "
                        f"builtin:smollm2-135m-instruct.")
    return name_or_path


def looks_local(name: str) -> bool:
    """Whether a name that does not exist was meant as a local path rather than a hub id: it is not shaped like a
    hub id (`./x`, `/x`, `~/x`, `a/b/c`), or its first folder exists here (`runs/x` when ./runs exists,
    the output folder of a run that has not been trained yet). Models and data both ask this."""
    if name.startswith("builtin:"):
        return False
    if not HUB_ID.match(name) or name.count("/") > 1:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


def _train_on_advice(folder: Path) -> str:
    """How another run (e.g. DPO after SFT) starts from an adapter: from its merge, where its method merges."""
    from tuneforge.inference.export.source import adapter_method  # the export's own reading of the folder

    try:
        method = adapter_method(folder)
    except UserError:
        method = None
    if method is not None and not method.mergeable:
        return (f"Its method ({method.name}) cannot be merged into the base weights, so no model folder can be made "
                f"from it for another run to start from: train that stage on the base model, with a method that "
                f"merges (lora) if it should start from this fine-tune.")
    return (f"To train on from it (e.g. DPO after SFT), merge it first: `tuneforge export --adapter {folder} --out "
            f"{folder}-merged`, then `model.name_or_path={folder}-merged`.")


def check_local_folder(folder: Path) -> None:
    """Refuse what is not a loadable model folder, saying what it looks like instead."""
    if not folder.is_dir():
        raise UserError(f"{folder} is a file; the model (`model.name_or_path`, or `--model`) must be the folder that "
                        f"holds config.json.")
    if (folder / "config.json").is_file():
        _check_causal_lm(folder)
        return
    if (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder} holds an adapter (adapter_config.json), not a full model. To chat, serve or "
                        f"evaluate, pass the base model as the model and this folder as the adapter (`tuneforge chat "
                        f"--adapter {folder}`). {_train_on_advice(folder)}")
    raise UserError(f"{folder} has no config.json, so it is not a Hugging Face model folder. Point "
                    f"`model.name_or_path` (or `--model`) at the folder written by save_pretrained (or by "
                    f"`tuneforge init-model`).")


def _check_causal_lm(folder: Path) -> None:
    """A reward model (`stage: rm` writes an XForSequenceClassification) loads as a causal LM with its score head
    dropped and a random lm_head: chat printed noise and export wrote that model. Refuse it, saying what it is for."""
    import json

    try:
        architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # transformers reports an unreadable config in its own words
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{folder} holds a reward model ({architectures[0]}: a score head, no language-model head), "
                        f"so it cannot generate text or be trained or exported as a causal LM. Use it as the reward "
                        f"of stage ppo or grpo (`ppo.reward: {{{folder}: 1.0}}`), or load it with "
                        f"AutoModelForSequenceClassification.")


def check_pickle(folder: Path, allow_pickle: bool) -> None:
    """Pickle weights run code when loaded: refuse a folder whose only weights are pickles unless allowed."""
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles:
        raise UserError(f"{pickles[0]} holds pickle weights, which can execute code when loaded, and {folder} has no "
                        f".safetensors file. Convert it to safetensors, or, if you trust the source, set "
                        f"`model.allow_pickle: true`.")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so an offline machine gets an answer in seconds instead of after a minute
    of transformers' (or datasets') retries. With a proxy configured we cannot probe directly and let them try.
    The answer is kept for the process: model, tokenizer and datasets ask in turn."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _probe(url.hostname, url.port or (443 if url.scheme == "https" else 80), timeout)


@contextmanager
def hub_offline():
    """Hugging Face libraries in offline mode for the duration (as HF_HUB_OFFLINE=1 would set them at import): a hub
    name resolves from the local cache or fails at once, never after a minute of retries."""
    import huggingface_hub.constants as hub

    modules = [hub]
    try:
        import datasets.config

        modules.append(datasets.config)
    except ImportError:
        pass
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(fn, source: str, what: str, **kwargs):
    """Call a `from_pretrained`, turning the usual failures into one-paragraph UserErrors."""
    local = Path(source).is_dir()
    if not local and not hub_reachable():
        kwargs["local_files_only"] = True  # the hub cache may still hold it
    try:
        return fn(source, **kwargs)
    except OSError as e:
        if local:
            raise UserError(f"Could not load the {what} from {source}: {e}") from e
        if kwargs.get("local_files_only"):
            raise UserError(f"`{source}` is not a local folder and the Hugging Face hub is unreachable from here "
                            f"(and the model is not in the local hub cache)."
                            f"{close_name_near(source, folders_only=True)} Download the "
                            f"model on a machine with access and pass its local folder as `model.name_or_path` (or "
                            f"`--model`), or use builtin:smollm2-135m-instruct.") from e
        hint = "" if kwargs.get("use_safetensors") is not True else (
            " If the repository has only pickle weights and you trust it, set `model.allow_pickle: true`.")
        raise UserError(f"Could not load the {what} `{source}` from the hub: {e}.{hint}") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{source} needs to run its own Python code to load ({e}). Set "
                            f"`model.trust_remote_code: true` only if you trust its source.") from e
        raise


def prepare_tokenizer(tokenizer) -> None:
    """Make a tokenizer ready for batching: a pad token (eos, else unk/bos, else a new <|pad|>) and right
    padding, which training expects (generation switches to left padding itself)."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is not None:
            tokenizer.pad_token = fallback
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = "right"


def apply_chat_template_override(tokenizer, override: str | None) -> None:
    """`model.chat_template`: a built-in name or a .jinja path, resolved by the data package."""
    if not override:
        return
    from tuneforge.data.templates import resolve_chat_template  # lazy: only needed for overrides

    template = resolve_chat_template(tokenizer, override)
    if template is not None:
        tokenizer.chat_template = template


def _load_tokenizer_from(source: str, model_cfg):
    from transformers import AutoTokenizer

    no_tokenizer = UserError(f"{source} has no usable tokenizer (no tokenizer.json, tokenizer.model or vocab files "
                             f"there). Copy the tokenizer files of the base model into {source} (or write them with "
                             f"tokenizer.save_pretrained).")
    try:
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, "tokenizer",
                                     trust_remote_code=model_cfg.trust_remote_code)
    except ValueError as e:
        if Path(source).is_dir() and "instantiate the backend tokenizer" in str(e):
            raise no_tokenizer from e
        raise
    if not tokenizer("hello world", add_special_tokens=False).input_ids:
        # config.json and weights without tokenizer files can load as an empty tokenizer (transformers builds one
        # from the config's class), and the run then failed on "no trainable token" in the data
        raise no_tokenizer
    prepare_tokenizer(tokenizer)
    apply_chat_template_override(tokenizer, model_cfg.chat_template)
    return tokenizer


def load_tokenizer(model_cfg):
    """The tokenizer of `model_cfg.name_or_path`, with a pad token, right padding and any template override."""
    return _load_tokenizer_from(resolve_source(model_cfg.name_or_path), model_cfg)


def _load_model_from(source: str, model_cfg, dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    from tuneforge.models.attention import resolve_attention, settle_attention

    attention = resolve_attention(model_cfg.attn_implementation)
    if Path(source).is_dir():
        check_pickle(Path(source), model_cfg.allow_pickle)
    if not model_cfg.allow_pickle:
        kwargs.setdefault("use_safetensors", True)  # never fall back to pickle files on the hub either
    try:
        return settle_attention(_from_pretrained(AutoModelForCausalLM.from_pretrained, source, "model", dtype=dtype,
                                                 trust_remote_code=model_cfg.trust_remote_code,
                                                 attn_implementation=attention, **kwargs))
    except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package or a GPU
        raise UserError(f"`model.attn_implementation: {model_cfg.attn_implementation}` is not available here: "
                        f"{e} Use auto (the default), sdpa or eager.") from e


VOCAB_RESIZED = "tuneforge_vocab_resized"  # attribute set on a model whose embeddings the loader resized


def load_model_and_tokenizer(model_cfg, dtype: torch.dtype | None = torch.float32,
                             device: str | torch.device | None = "cpu", **from_pretrained_kwargs):
    """Load (model, tokenizer) from a local folder, a hub id or `builtin:<name>`.

    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained` (e.g. a quantization config); with a
    `device_map` among them the model is left where transformers placed it instead of moved to `device`."""
    source = resolve_source(model_cfg.name_or_path)
    tokenizer = _load_tokenizer_from(source, model_cfg)
    model = _load_model_from(source, model_cfg, dtype, **from_pretrained_kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # only when prepare_tokenizer added <|pad|>
        model.resize_token_embeddings(len(tokenizer))
        setattr(model, VOCAB_RESIZED, True)  # so an adapter saves the resized embeddings (methods/base.py save_peft)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None and "device_map" not in from_pretrained_kwargs:
        model.to(device)
    return model, tokenizer


INFERENCE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def inference_placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where and in which precision chat, serve and eval run a model.

    device auto: the GPU when there is one, else the CPU. dtype auto: bf16 on a GPU that computes it, else fp32.
    On CPU auto stays fp32 even where the CPU multiplies bf16 natively (AVX512-BF16/AMX, where bf16 decodes a batch
    ~1.5x faster here), because bf16 replies can differ from those of the fp32 model that was trained and evaluated;
    `bf16` asks for it."""
    from tuneforge.training.runtime import DTYPES, cpu_has_native_bf16, pick_device

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device} is not a device; use auto, cpu, cuda or cuda:N.")
    if dtype not in INFERENCE_DTYPES:
        raise UserError(f"--dtype {dtype} is not a precision; use one of {', '.join(INFERENCE_DTYPES)}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asks for a GPU, but torch sees none (the CPU build of torch, or no "
                        f"driver); use --device cpu.")
    dev = torch.device(device) if device.startswith("cuda:") else pick_device(device, 0)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp16" and dev.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU: CPUs compute fp16 slowly and PyTorch lacks some fp16 CPU kernels. "
                        "Use fp32 or bf16 on CPU.")
    if dtype == "bf16" and dev.type == "cpu" and not cpu_has_native_bf16():
        import logging

        logging.getLogger(__name__).warning("This CPU has no native bf16 (AVX512-BF16/AMX): bf16 runs emulated, "
                                            "far slower than fp32.")
    return dev, DTYPES[dtype]
