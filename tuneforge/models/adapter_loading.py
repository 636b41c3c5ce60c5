"""Putting a trained adapter folder on a base model, with the base it records: what `chat` and `eval` load.

    base, template = base_for(adapter="outputs/run", model=None, chat_template=None)   # the recorded base
    model = load_adapter(model, "outputs/run", base)

A base of another shape is refused by its config.json before loading (a 7B model takes minutes), and PEFT's
size-mismatch tracebacks become one UserError naming both models. `export` and `serve` call the same checks
(`check_base_matches` before loading, `load_error` when PEFT still fails), so all four verbs say the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import UserError

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
LEAVE_OUT = "Leave out --model to use the recorded base, or pass the model it was trained on."  # chat, eval, export
# config.json fields that must agree between the model an adapter was trained on and the one it is put on
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")


def adapter_folder(adapter: str | Path, full_model_hint: str = "chat with it directly: `tuneforge chat --model {folder}`.",
                   prefix: str = "") -> Path:
    """The adapter folder, checked; anything else gets an error saying what it is. One check for chat, eval, export
    and serve: each passes what to do with a full-model folder instead (`{folder}` is filled in) and, for serve, a
    prefix naming the adapter."""
    folder = Path(adapter).expanduser()
    if folder.is_file():
        raise UserError(f"{prefix}{adapter} is a file, not an adapter folder. Pass the folder that holds "
                        f"adapter_config.json: the output_dir of a LoRA (or other adapter) training run.")
    if not folder.is_dir():
        raise UserError(f"{prefix}Adapter folder {adapter} does not exist. Pass the output_dir of a LoRA (or other "
                        f"adapter) training run, which holds adapter_config.json.")
    if (folder / "adapter_config.json").is_file():
        return folder
    if (folder / "config.json").is_file():
        raise UserError(f"{prefix}{folder} holds a full model (config.json), not an adapter: "
                        + full_model_hint.format(folder=folder))
    unfinished = training_run_note(folder)
    if unfinished:
        raise UserError(prefix + unfinished)
    raise UserError(f"{prefix}{folder} has no adapter_config.json, so it is not a PEFT adapter folder. Pass the "
                    f"output_dir of an adapter training run (lora, ia3, prompt_tuning, ...).")


def training_run_note(folder: Path) -> str | None:
    """What to do with a training run's output_dir that holds checkpoints but no final output (the run stopped), or
    with one of its checkpoint-N folders; None for other folders. A checkpoint holds the trainable tensors under the
    training-time names with the optimizer state (training/checkpoint.py), not an adapter folder: only resuming
    turns it into one."""
    from tuneforge.training.checkpoint import list_checkpoints

    is_checkpoint = (folder / "trainer_state.json").is_file()
    run = folder.parent if is_checkpoint else folder
    latest = (list_checkpoints(run) or [None])[-1]
    if latest is None:
        return None
    step, total = _steps(latest)
    if is_checkpoint and ((run / "adapter_config.json").is_file() or (run / "config.json").is_file()):
        return (f"{folder} is a training checkpoint (step {_steps(folder)[0]} of {total}), not a model or adapter "
                f"folder; its run finished and wrote its output to {run}. Pass {run} instead.")
    what = f"a checkpoint (step {_steps(folder)[0]}) of an" if is_checkpoint else "an"
    return (f"{folder} is {what} unfinished training run: it stopped at step {step} of {total} ({latest.name}), "
            f"and a checkpoint holds training state (weights and optimizer), not a model or adapter. Finish it with "
            f"`{_resume_command(run)}`; the adapter (or model) is written to {run} when training ends. To use it as "
            f"it is at step {step}, end the run there: add `training.max_steps={step}` to that command.")


def check_model_folder(model: str) -> None:
    """A --model that is a stopped run's output_dir (checkpoints, no model yet) or one of its checkpoint-N folders
    gets what to do with it, not the loader's "no config.json, point at a save_pretrained folder"."""
    folder = Path(model).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return  # a model or adapter folder, a hub id, builtin:<name>, or missing: the loader says what is wrong
    note = training_run_note(folder)
    if note:
        raise UserError(note)


def _steps(checkpoint: Path) -> tuple[object, object]:
    """(step, total steps) a checkpoint's trainer_state.json records ("?" where it cannot be read)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return state.get("step", "?"), state.get("total_steps", "?")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "?", "?"


def _resume_command(run: Path) -> str:
    """`tuneforge train <the run's saved config> training.resume=auto`, as training prints it when stopped
    (training/interrupt.py resume_command); resuming refuses overwrite_output_dir=true, which the config may set."""
    import shlex

    import yaml

    config = run / "tuneforge_config.yaml"
    args = ["tuneforge", "train", str(config), "training.resume=auto"]
    try:
        if (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("overwrite_output_dir"):
            args.append("overwrite_output_dir=false")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return shlex.join(args)


def recorded_base(folder: Path) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path`: how the user named it, for TuneForge
    adapters; whatever the trainer wrote, for other PEFT adapters)."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def _shape_of(name_or_path: str) -> dict | None:
    """The shape fields of a model's config.json, when it is on disk (never downloads or converts anything)."""
    if name_or_path.startswith("builtin:"):
        from tuneforge.models.builtin import cache_root

        folder = cache_root() / name_or_path.removeprefix("builtin:")
    else:
        folder = Path(name_or_path).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config", config)
    return {k: config.get(k) for k in SHAPE_FIELDS}


def check_base_matches(folder: Path, recorded: str | None, given: str, advice: str = LEAVE_OUT) -> None:
    """Refuse an adapter on a base of another shape before PEFT fails with a size-mismatch traceback. advice: what
    to do instead (serve has no recorded-base default, so it says so)."""
    if recorded is None or recorded == given:
        return
    want, have = _shape_of(recorded), _shape_of(given)
    if want is None or have is None:
        return  # one of them is not on disk: the load itself is the check (see load_adapter)
    diff = {k: (want[k], have[k]) for k in SHAPE_FIELDS if want[k] is not None and want[k] != have[k]}
    if diff:
        shown = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
        raise UserError(_mismatch(folder, recorded, given, shown, advice))


def _mismatch(folder: Path, recorded: str | None, given: str, detail: str, advice: str = LEAVE_OUT) -> str:
    trained = f"was trained on `{recorded}`" if recorded else "records no base model"
    return f"The adapter {folder} does not fit the base model `{given}` ({detail}): it {trained}. {advice}"


def load_adapter(model, adapter: str, given: str | None = None):
    """Put an adapter folder (PEFT or TuneForge format) on `model` (loaded from `given`); a base of another shape
    is a UserError naming both models, never PEFT's size-mismatch traceback."""
    folder = adapter_folder(adapter)
    recorded = recorded_base(folder)
    if given is not None:
        check_base_matches(folder, recorded, given)
    from tuneforge.methods.adapters import load_adapter_folder

    try:
        return load_adapter_folder(model, folder)  # PEFT folders and TuneForge's own (bottleneck adapters)
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, missing target modules, unknown keys
        raise load_error(folder, given, e) from e


def load_error(folder: Path, given: str | None, error: Exception, advice: str = LEAVE_OUT) -> UserError:
    """PEFT's failure to put the adapter on a base (a ~30-line size-mismatch list) as one UserError naming both
    models; only its last line is kept, which shows one mismatched tensor."""
    detail = str(error).strip().splitlines()
    return UserError(_mismatch(folder, recorded_base(folder), given or "the given model",
                               detail[-1].strip().rstrip(".")[:300] if detail else type(error).__name__, advice))


def base_for(adapter: str | None, model: str | None, chat_template: str | None) -> tuple[str, str | None]:
    """(base model to load, chat template override): `model`, else the adapter's recorded base, else the default.
    A template override the run was trained with is kept unless `chat_template` says otherwise."""
    if not adapter:
        return model or DEFAULT_MODEL, chat_template
    folder = adapter_folder(adapter)
    template = chat_template or trained_template(folder)
    if model:
        return model, template
    base = recorded_base(folder)
    if base is None:
        raise UserError(f"The adapter {folder} does not say which base model it was trained on "
                        f"(no base_model_name_or_path in adapter_config.json). Pass it with --model.")
    from tuneforge.models.loading import looks_local

    if looks_local(base) and not Path(base).expanduser().exists():
        raise UserError(f"The adapter {folder} was trained on the model folder `{base}`, which does not exist here "
                        f"(a relative path counts from where training ran). Pass the base model with --model.")
    return base, template


def trained_template(folder: Path) -> str | None:
    """The `model.chat_template` override recorded in the run's tuneforge_config.yaml (None without one), in a form
    that works from any directory: a .jinja path becomes the template text the run saved with its tokenizer, as a
    relative path counts from where training ran and the run folder may have been moved or copied since. An adapter
    another tool trained (LLaMA-Factory, TRL: no tuneforge_config.yaml) gets the template saved beside it, which is
    the one it trained with (LLaMA-Factory writes its `template` there; TRL its ChatML for a base without one)."""
    from tuneforge.data.templates import names_a_file

    if not (folder / "tuneforge_config.yaml").is_file():
        return saved_template(folder)
    recorded = recorded_template(folder)
    if not recorded or not names_a_file(recorded):
        return recorded  # a built-in name or the Jinja source itself
    saved = saved_template(folder)
    if saved:
        return saved  # exactly what was trained, even if the .jinja file changed or moved since
    path = Path(recorded).expanduser()
    if path.is_file():  # a run saved before its tokenizer (stopped early), or by another tool
        return str(path.resolve())
    raise UserError(f"{folder / 'tuneforge_config.yaml'} records `model.chat_template: {recorded}`, a template "
                    f"file that does not exist here (a relative path counts from where training ran), and {folder} "
                    f"holds no saved copy of it (chat_template.jinja). Copy the .jinja file to that path, or pass "
                    f"it to `tuneforge chat` / `tuneforge serve` with --chat-template PATH.")


def recorded_template(folder: Path) -> str | None:
    """`model.chat_template` as the run's tuneforge_config.yaml wrote it (a name, a path or Jinja source), or None."""
    import yaml

    try:
        config = yaml.safe_load((folder / "tuneforge_config.yaml").read_text(encoding="utf-8"))
        return (config.get("model") or {}).get("chat_template")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def saved_template(folder: Path) -> str | None:
    """The chat template a run saved with its tokenizer (transformers writes chat_template.jinja, older versions a
    `chat_template` string in tokenizer_config.json), or None."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return template if isinstance(template, str) and template else None
