"""What a saved model or adapter says about itself: a portable base reference and a model card.

    save_final -> finish_output_folder(cfg, method, folder, metrics_file)

PEFT records the base as the folder `from_pretrained` read, which for `builtin:` models is an absolute cache path on
the training machine, and writes an empty model card template. We record the base as the user named it
(`builtin:smollm2-135m-instruct`, a hub id, or the path as given), so `tuneforge chat --adapter DIR` finds it on
another machine, and write a README.md that says what was trained: base, method and options, data, steps, final
losses, NEFTune and R-Drop when the run used them, and the TuneForge version.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from tuneforge.configs.schema import TrainConfig
from tuneforge.methods.base import Method

ADAPTER_CONFIG = "adapter_config.json"
# where a built-in model comes from, for the model card's `base_model` (Hugging Face reads it as a hub id)
HUB_ORIGIN = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def finish_output_folder(cfg: TrainConfig, method: Method, folder: Path, metrics_file: Path) -> None:
    """Called by save_final on the folder the method's export was written to, before it is moved into place."""
    record_base(folder, cfg.model.name_or_path)
    rows = _read_rows(metrics_file)
    _write(folder / "README.md", model_card(cfg, method, rows, library=_library(folder)))


def record_base(folder: Path, base: str) -> None:
    """Put the base model as the user named it into adapter_config.json (PEFT and TuneForge adapters alike)."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        return  # a full model folder: its model card and tuneforge_config.yaml name the base
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    _write(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _library(folder: Path) -> str:
    from tuneforge.methods.adapters import tuneforge_adapter_method

    if tuneforge_adapter_method(folder):
        return "tuneforge"
    return "peft" if (folder / ADAPTER_CONFIG).is_file() else "transformers"


def _read_rows(metrics_file: Path) -> list[dict]:
    if not metrics_file.is_file():
        return []
    rows = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the card is still worth writing
            continue
    return rows


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _options(cfg: TrainConfig, method: Method) -> str:
    sections = getattr(method, "uses_sections", None) or ((method.section,) if method.section else ())
    parts = []
    for section in sections:
        for key, value in asdict(cfg.options(section)).items():
            parts.append(f"{section}.{key}={_num(value)}")
    return ", ".join(parts) or "no options"


def _data(cfg: TrainConfig) -> str:
    specs = [s.path + (f" (first {s.max_samples})" if s.max_samples else "") for s in cfg.data.train]
    text = ", ".join(f"`{s}`" for s in specs)
    if cfg.data.registry:
        text += f" (registry `{cfg.data.registry}`)"
    return text


def _tricks(t) -> list[tuple[str, str]]:
    """NEFTune and R-Drop change what the model learned, so a card without them describes another run."""
    out = []
    if t.neftune_alpha > 0:
        out.append(("NEFTune", f"training.neftune_alpha={_num(t.neftune_alpha)} (uniform noise on the input "
                               f"embeddings while training, scaled by alpha/sqrt(L*d))"))
    if t.rdrop_alpha > 0:
        out.append(("R-Drop", f"training.rdrop_alpha={_num(t.rdrop_alpha)} (two dropout passes per batch, symmetric "
                              f"KL between them weighted by alpha)"))
    return out


def _results(rows: list[dict]) -> list[tuple[str, str]]:
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    out = [("optimizer steps", str(train[-1]["step"]) if train else "unknown (no metrics.jsonl)")]
    if train:
        out.append(("final training loss", f"{_num(train[-1]['loss'])} (step {train[-1]['step']})"))
    if evals:
        out.append(("final eval loss", f"{_num(evals[-1]['eval_loss'])} (step {evals[-1]['step']})"))
    accuracy = [r for r in rows if "eval_pairwise_accuracy" in r]
    if accuracy:
        out.append(("eval pairwise accuracy", f"{_num(accuracy[-1]['eval_pairwise_accuracy'])} (share of held-out "
                                              f"pairs whose chosen reply scores higher)"))
    return out


def _use_it(cfg: TrainConfig, library: str) -> list[str]:
    """How to use the folder: chat with a generator; score with a reward model (it cannot generate text)."""
    if cfg.stage == "rm":
        return ["```yaml", f"ppo: {{reward: {{{cfg.output_dir}: 1.0}}}}   # the reward of a tuneforge PPO/GRPO run",
                "```", "", "```python", "from tuneforge.models.reward import load_reward_model",
                f"scores = load_reward_model({str(cfg.output_dir)!r}).score(texts)  # texts rendered with the chat "
                f"template", "```", "",
                "It is a plain transformers sequence-classification model (one output: the reward): "
                "`AutoModelForSequenceClassification.from_pretrained(this_folder)` loads it."]
    use = (f"tuneforge chat --adapter {cfg.output_dir}" if library != "transformers"
           else f"tuneforge chat --model {cfg.output_dir}")
    return ["```bash", use, "```"]


def model_card(cfg: TrainConfig, method: Method, rows: list[dict], library: str) -> str:
    from tuneforge import __version__

    base = cfg.model.name_or_path
    t = cfg.training
    table = [("base model", f"`{base}`"), ("stage", cfg.stage), ("method", f"`{method.name}`: {method.summary}"),
             ("method options", _options(cfg, method)), ("data", _data(cfg)),
             ("max length", f"{cfg.data.max_length} tokens"),
             ("batch", f"{t.batch_size} per device x {t.grad_accum} accumulation"),
             ("learning rate", f"{_num(t.lr)}, {t.scheduler} schedule"), ("precision", t.precision),
             *_tricks(t), *_results(rows), ("TuneForge version", __version__)]
    hub_base = HUB_ORIGIN.get(base, base if _looks_like_hub_id(base) else None)
    front = ["---", f"library_name: {library}", "tags: [tuneforge, " + f"{method.name}, {cfg.stage}]"]
    front += [f"base_model: {hub_base}"] if hub_base else []
    lines = front + ["---", "", f"# {Path(cfg.output_dir).name}: `{method.name}` fine-tune of `{base}`", "",
                     f"Trained with TuneForge {__version__}. `tuneforge_config.yaml` in this folder is the resolved "
                     f"config of the run: `tuneforge train tuneforge_config.yaml output_dir=NEW_FOLDER` repeats it.",
                     "",
                     "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in table], "", "## Use it", "",
                     *_use_it(cfg, library)]
    if library == "peft":
        lines += ["", "It is a plain PEFT adapter: `peft.PeftModel.from_pretrained(base_model, this_folder)` loads it "
                      "onto the base model above."]
    return "\n".join(lines) + "\n"


def _looks_like_hub_id(name: str) -> bool:
    from tuneforge.models.loading import HUB_ID

    return bool(HUB_ID.match(name)) and "/" in name and not Path(name).exists()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
