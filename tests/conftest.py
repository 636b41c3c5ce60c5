"""Fixtures shared by the whole suite.

- `tiny_llama_dir`, `tiny_qwen2_dir`: folders written once per session by `tuneforge init-model` (tiny random
  Llama-3-style and Qwen2.5-style models with trained BPE tokenizers and chat templates). Treat them as read-only;
  copy one (shutil.copytree) before changing files in it.
- `shared_assets`: Path to ../shared/assets (real chat templates, datasets); skips the test when it is absent.

The suite runs offline on a few CPU cores: hub access is switched off (fail fast, never retry for a minute) and
torch uses at most 4 threads unless OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the Rust tokenizers

import torch  # noqa: E402 - after the environment above

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_ASSETS = REPO_ROOT.parent / "shared" / "assets"

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def _init(preset: str, tmp_path_factory) -> Path:
    from tuneforge.models.presets import init_model

    return init_model(preset, tmp_path_factory.mktemp("models") / preset)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama-3-style model folder (hidden 64, 2 layers, <|eot_id|> chat format), seed 0."""
    return _init("tiny-llama", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-style model folder (ChatML, q/k/v biases, vocab padded to 64; untied), seed 0."""
    return _init("tiny-qwen2", tmp_path_factory)


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """../shared/assets next to the repository, or skip: those files are not part of the repository."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"{SHARED_ASSETS} is absent (the shared offline assets live next to the repository, not in it)")
    return SHARED_ASSETS


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests (opt-in: `-m gpu`) skip with a reason where torch sees no CUDA device, instead of failing
    at their first .cuda()."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a gpu-marked test; torch sees no CUDA device)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
