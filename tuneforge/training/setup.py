"""The setup steps every recipe runs, in order: runtime, model + method, data, trainer, final save.

Components, not a recipe: recipes call these top to bottom and add only what is specific to their stage.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from tuneforge.configs.schema import TrainConfig
from tuneforge.errors import UserError, counted
from tuneforge.kernels.onednn_linear import checkpointing_kwargs
from tuneforge.methods import METHODS, get_method
from tuneforge.methods.base import Method
from tuneforge.training.checkpoint import atomic_dir, check_same_run, find_resume, run_fingerprint
from tuneforge.training.interrupt import StopRequest
from tuneforge.training.metrics import fmt
from tuneforge.training.model_card import finish_output_folder
from tuneforge.training.output_dir import check_output_dir
from tuneforge.training.runtime import Runtime, seed_everything, setup_runtime


def setup_run(cfg: TrainConfig, log=print) -> Runtime:
    """Runtime and seeds, and the output_dir check (nothing is written there until training starts)."""
    runtime = setup_runtime(cfg.training.device, cfg.training.precision, cfg.training.distributed)
    notes = []
    if runtime.engine == "deepspeed":
        from tuneforge.training.distributed import check_deepspeed

        notes += check_deepspeed(cfg, runtime)
    # every rank checks, after the process group is up: no rank can have started writing the folder yet
    check_output_dir(cfg)
    if cfg.training.eval_suite:  # its task files before the model loads, not at the first eval step
        from tuneforge.eval.during_training import check_suite_files
        from tuneforge.training.distributed import check_eval_suite_unsharded

        check_eval_suite_unsharded(cfg.training, runtime)
        check_suite_files(cfg.training.eval_suite)
    resume_from = find_resume(cfg.training.resume, Path(cfg.output_dir))
    if resume_from is not None:  # settings now, before a long model load; the data is compared once encoded
        check_same_run(resume_from, run_fingerprint(cfg, runtime.world_size, None), runtime.world_size)
        if runtime.engine == "deepspeed":  # before the model loads, not in the engine's load_checkpoint after it
            from tuneforge.training.deepspeed_zero import check_same_process_count

            check_same_process_count(resume_from, runtime.world_size)
    seed_everything(cfg.seed)
    if runtime.is_main:
        t = cfg.training
        asked = f" (training.device: {t.device}, training.precision: {t.precision})"
        engine = f" ({runtime.engine})" if runtime.engine != "none" else ""
        log(f"runtime: device {runtime.device}, precision {runtime.precision}, {runtime.world_size} process(es)"
            + engine + (asked if "auto" in (t.device, t.precision) else ""))
        if runtime.engine == "fsdp" and t.fsdp_cpu_offload and runtime.device.type == "cpu":
            log("note: training.fsdp_cpu_offload: this run trains on the CPU, where the shards already are; nothing "
                "to offload (the setting applies on GPUs)")
        for note in [*notes, compile_note(cfg, runtime)]:
            if note:
                log(note)
        ignored = getattr(cfg, "ignored_sections", [])
        if ignored:
            log(f"note: method {cfg.method} reads none of the options under {', '.join(f'`{s}:`' for s in ignored)}: "
                f"they are ignored (and left out of tuneforge_config.yaml)")
    return runtime


def compile_note(cfg: TrainConfig, runtime: Runtime) -> str | None:
    """`training.compile` on CPU switches off the CPU paths left at auto (see use_onednn_matmul, use_fused_layers and
    setup_data), which on their own measured as fast: without this the run would lose them without a word."""
    from tuneforge.kernels import onednn_linear

    t = cfg.training
    if not t.compile or runtime.device.type != "cpu" or runtime.sharded:
        return None  # on GPU nothing is turned off; the sharded engines have none of these paths anyway
    lost = [name for name, applies in (
        ("oneDNN linears (training.cpu_matmul)", t.cpu_matmul == "auto" and runtime.dtype == torch.float32
         and onednn_linear.available() and onednn_linear.faster_here()),
        ("fused layers (training.fused_layers)", t.fused_layers == "auto"),
        ("padding-free rows attended per sequence (model.attn_implementation)", cfg.model.attn_implementation
         == "auto" and not t.rdrop_alpha and not t.neftune_alpha)) if applies]
    if not lost:
        return None
    return (f"note: training.compile turns off the CPU defaults {', '.join(lost)}. Measured against them, compile "
            f"gained nothing: 0.96x per step after warm-up, plus its compile time (LoRA on tiny-llama widened to "
            f"hidden 256, 4 layers, 2 CPU threads; bench/RESULTS.md, `training.compile` on CPU). Leave "
            f"training.compile off on CPU unless you have measured a gain")


def setup_model(cfg: TrainConfig, runtime: Runtime, extend=None, log=None):
    """Load the base model in the compute dtype, apply the method, keep trainable weights in fp32; then the
    distributed engine (DDP, FSDP2) wraps it from outside. `extend`: a stage's addition to the model (rm: a scalar
    head), `extend(model) -> model`, applied before the wrapping. With `log`, the main process logs what is
    trained (describe_model)."""
    from tuneforge.training.distributed import build_strategy, check_method_supported
    from tuneforge.training.loop import describe_model

    check_method_supported(runtime.engine, cfg.method)
    model, tokenizer, method = build_model(cfg, runtime, runtime.device, extend)
    if cfg.training.compile:  # torchtitan's order: compile the blocks, then shard/replicate
        compile_blocks(model)
    model = build_strategy(cfg, runtime).wrap(model, runtime)
    model.tuneforge_extend = extend  # the FSDP export rebuilds the plain model the same way
    if log is not None and runtime.is_main:
        log(describe_model(model, method, tokenizer, cfg))
    return model, tokenizer, method


def compile_blocks(model) -> None:
    """torch.compile each decoder block in place: the blocks are identical, so one compiled graph serves all, and
    the loss, sampling and optimizer code stays eager (no recompiles when batch shapes change between steps)."""
    from tuneforge.training.distributed import decoder_blocks

    blocks = decoder_blocks(model)
    if not blocks:
        raise UserError("training.compile: found no decoder blocks to compile in this model (no "
                        "`_no_split_modules`); set `training.compile=false`.")
    for block in blocks:
        block.compile(dynamic=True)


def build_model(cfg: TrainConfig, runtime: Runtime, device: torch.device, extend=None):
    """The model as one process trains it (no distributed wrapper), its tokenizer and method."""
    from tuneforge.models.loading import load_model_and_tokenizer

    method = get_method(cfg.method)
    opts = cfg.options(method.section) if method.section else None
    load_kwargs = getattr(method, "load_kwargs", lambda _o, _c: {})(opts, cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=runtime.dtype, device=device, **load_kwargs)
    return prepare_model(cfg, model, method, device, extend), tokenizer, method


def prepare_model(cfg: TrainConfig, model, method: Method, device: torch.device, extend=None):
    """A loaded base model made ready to train: no KV cache, optional activation checkpointing, the method applied,
    the stage's extension, trainable weights in fp32. Split from `build_model` so the GPU benchmark
    (bench/bench_gpu.py) trains a random-init model built from a config through exactly these steps."""
    opts = cfg.options(method.section) if method.section else None
    model.config.use_cache = False
    if cfg.training.gradient_checkpointing:
        # transformers 5.x renamed gradient_checkpointing_enable (the old name warns); keep both for older versions
        kwargs = checkpointing_kwargs()
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model = method.apply(model, opts, cfg)
    if extend is not None:
        model = extend(model)
    for p in model.parameters():  # fp32 master copies of what trains; frozen weights stay in the compute dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.to(device)
    if use_fused_layers(cfg.training, device):
        from tuneforge.kernels.lora_linear import fuse_lora_linears
        from tuneforge.kernels.rms_norm import fuse_rms_norms

        fuse_rms_norms(model)
        fuse_lora_linears(model)
    return model


def use_fused_layers(t, device: torch.device) -> bool:
    """`training.fused_layers`. auto leaves out what it is not measured or tested with: GPUs, compiled blocks
    (Inductor fuses these itself) and the sharded engines (they swap parameters around the forward)."""
    if t.fused_layers != "auto":
        return t.fused_layers == "always"
    return device.type == "cpu" and not t.compile and t.distributed not in ("fsdp", "deepspeed")


def read_data(cfg: TrainConfig):
    """Read and validate every data row before the model loads: a bad row fails in seconds, not after the load."""
    from tuneforge.data.build import read_datasets

    return read_datasets(cfg.data, stage=cfg.stage)


def setup_data(cfg: TrainConfig, tokenizer, stage: str, runtime: Runtime, log=print, read=None):
    from tuneforge.data import build_datasets, collate_for
    from tuneforge.training.padding_free import use_padding_free

    data_cfg = cfg.data
    if stage == "pt" and data_cfg.packing is None and not METHODS[cfg.method].packs:
        data_cfg = dataclasses.replace(data_cfg, packing=False)  # see Method.packs: a packed row mixes examples
        if runtime.is_main:
            log(f"note: stage pt packs by default, but method {cfg.method} puts virtual tokens before each input: "
                f"examples are not packed (one per row)")
    train, evals, report = build_datasets(data_cfg, tokenizer, stage, chat_template=cfg.model.chat_template,
                                          read=read)
    if runtime.is_main:
        for line in report.lines():
            log(f"data: {line}")
        log(f"data: {report.sizes_line(len(train), len(evals))}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # one row per micro-batch where it applies: training/padding_free.py. On CPU the `auto` attention attends such
    # a row per sequence (models/attention.py, no row x row mask is built); not under R-Drop (two copies of the
    # row), torch.compile (its per-call branches) or NEFTune (its noise scales with 1/sqrt(row length): a joined row
    # would get less than the padded batch)
    t = cfg.training
    cpu_auto = (runtime.device.type == "cpu" and cfg.model.attn_implementation == "auto" and not t.compile
                and not t.rdrop_alpha and not t.neftune_alpha)
    collate = collate_for(stage, use_padding_free(t.padding_free, cfg.stage, cfg.method,
                                                  cfg.model.attn_implementation, cpu_auto))

    def collate_fn(items):
        return collate(items, pad_id)

    return train, evals, collate_fn


def save_final(cfg: TrainConfig, model, method: Method, tokenizer, runtime: Runtime, write=None) -> Path | None:
    """The method's export (HF model folder or PEFT adapter) plus the tokenizer, written into output_dir file by
    file through a temp folder so a crash never leaves a half-written model. `write(folder, plain)`: a stage's own
    export instead (rm: a sequence-classification model), of `plain`, the model gathered to rank 0 first when it is
    sharded (FSDP, ZeRO)."""
    from tuneforge.training.distributed import build_strategy

    # A first Ctrl-C / SIGTERM waits for the save (the run is trained: losing it to a signal is the worst outcome);
    # a second one (also after a first during the final evaluation) aborts, and the temp folder goes with it.
    with StopRequest(StopRequest.FINAL_NOTICE) as stop:
        extend = getattr(model, "tuneforge_extend", None)
        plain = build_strategy(cfg, runtime).export_model(
            model, lambda: build_model(cfg, runtime, torch.device("cpu"), extend)[0])
        if not runtime.is_main:
            runtime.barrier()
            return None
        out = Path(cfg.output_dir)
        tmp = atomic_dir(out / "final")
        try:
            _write_final(cfg, method, tokenizer, plain, tmp, out, write)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stop.notice = StopRequest.STEP_NOTICE  # consumed: nothing is handed on past the save
    runtime.barrier()
    return out


def _write_final(cfg: TrainConfig, method: Method, tokenizer, plain, tmp: Path, out: Path, write) -> None:
    if write is not None:
        write(tmp, plain)
    else:
        method.save(plain, tmp)
        tokenizer.save_pretrained(tmp)
    finish_output_folder(cfg, method, tmp, out / "metrics.jsonl")  # portable base reference + model card
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def run_stage(cfg: TrainConfig, data_kind: str, stage, log=print):
    """The whole run of a stage whose only specific part is its `Stage` (the loss): runtime, model + method, data
    (`data_kind`: "pt" or "sft" rendering), train, save. Stages that need more (a reference model, generation)
    call the steps above themselves."""
    from tuneforge.training.loop import Trainer

    runtime = setup_run(cfg, log)
    rows = read_data(cfg)
    model, tokenizer, method = setup_model(cfg, runtime, log=log)
    train, evals, collate = setup_data(cfg, tokenizer, data_kind, runtime, log, read=rows)
    trainer = Trainer(cfg, runtime, model, method, train, evals, collate, stage, log)
    trainer.tokenizer = tokenizer
    result = trainer.train()
    if result.finished:
        save_final(cfg, model, method, tokenizer, runtime)
        if runtime.is_main:
            log(done_line(result, cfg.output_dir))
    return result


def done_line(result, output_dir, saved: str = "saved to") -> str:
    """A stage's last line: its steps, last training loss and last eval loss (where it evaluated), and where it
    saved; every stage says the same things the same way."""
    losses = "".join(f", {label} {fmt('loss', value)}" for label, value in
                     (("final loss", result.final_loss), ("eval loss", result.eval_loss)) if value is not None)
    return f"done: {counted(result.steps, 'step')}{losses}; {saved} {output_dir}"
