"""What a run tells its user: the loss of a log line is the mean of its logging window, the resolved device and
precision are printed and saved, and numbers are rounded for reading (metrics.jsonl keeps them whole)."""

from __future__ import annotations

import re

import pytest

from tests.test_training import config, losses, train
from tuneforge.train import run_config
from tuneforge.training.metrics import format_metrics, read_metrics

FAST = ["training.max_steps=4", "training.batch_size=2", "data.max_length=64", "training.scheduler=constant"]


def test_logged_loss_is_the_mean_over_the_logging_window(tiny_llama_dir, tmp_path):
    train(tiny_llama_dir, tmp_path / "every", *FAST)
    every = losses(tmp_path / "every")
    train(tiny_llama_dir, tmp_path / "window", *FAST, "training.logging_steps=2")
    rows = [r for r in read_metrics(tmp_path / "window" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["loss"] for r in rows] == pytest.approx([(every[0] + every[1]) / 2, (every[2] + every[3]) / 2],
                                                       abs=1e-7)
    assert every[1] != pytest.approx((every[0] + every[1]) / 2, abs=1e-7)  # the last step alone would differ


def test_window_resumes_mid_way(tiny_llama_dir, tmp_path):
    """A run stopped inside a logging window logs the same window mean after resume as an unbroken run."""
    common = [*FAST, "training.logging_steps=4", "training.save_total_limit=3"]
    train(tiny_llama_dir, tmp_path / "straight", *common)
    out = tmp_path / "resumed"
    train(tiny_llama_dir, out, *common, "training.stop_after_steps=3")
    train(tiny_llama_dir, out, *common, "training.resume=auto")
    assert losses(out) == losses(tmp_path / "straight") and len(losses(out)) == 1


def test_resolved_device_and_precision_are_printed_and_saved(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    logs = []
    cfg = config(tiny_llama_dir, out, *FAST, "training.precision=auto", "training.device=auto",
                 "training.progress_bar=false")
    run_config(cfg, log=logs.append)
    import torch

    from tuneforge.training.runtime import resolve_precision

    want = resolve_precision("auto", torch.device("cpu"))
    assert logs[0] == (f"runtime: device cpu, precision {want}, 1 process(es) (training.device: auto, "
                       f"training.precision: auto)")
    saved = (out / "tuneforge_config.yaml").read_text().splitlines()[0]
    assert saved == f"# resolved at the start of this run: device cpu, precision {want}, 1 process(es)"


def test_numbers_are_rounded_for_reading(tiny_llama_dir, tmp_path):
    logs = []
    run_config(config(tiny_llama_dir, tmp_path / "run", *FAST, "training.progress_bar=false", "data.eval_ratio=0.1"),
               log=logs.append)
    steps = [line for line in logs if line.startswith("step ")]
    assert len(steps) == 4
    number = r"(\d+(?:\.\d+)?)"
    small = r"(\d+(?:\.\d+)?(?:e-\d\d)?)"  # .4g: a tiny model on a busy machine runs under 1e-4 TFLOP/s
    pattern = (rf"step 4/4: loss {number}, grad_norm {number}, lr (\d\.\d\de[-+]\d\d), tokens_per_s (\d+), "
               rf"mfu (\d+\.\d)%, model_tflops {small}$")
    match = re.match(pattern, steps[-1])
    assert match, steps[-1]
    assert len(match.group(1).replace(".", "").lstrip("0")) <= 4  # 4 significant digits
    done = [line for line in logs if line.startswith("done:")]
    assert done and re.match(r"done: 4 steps, final loss \d\.\d{3}, eval loss \d\.\d{3}; saved to ", done[0]), done
    raw = read_metrics(tmp_path / "run" / "metrics.jsonl")[-2]
    assert len(str(raw["loss"]).split(".")[1]) > 3  # the file keeps full precision for plots and analysis


def test_format_metrics_rounds_each_kind():
    line = format_metrics(3, 10, {"loss": 2.345678, "grad_norm": 0.123456, "lr": 0.0002, "tokens_per_s": 1234.56,
                                  "eval_loss": 12.34567})
    assert line == "step 3/10: loss 2.346, grad_norm 0.1235, lr 2.00e-04, tokens_per_s 1235, eval_loss 12.35"


def test_metrics_file_keeps_small_numbers_significant(tmp_path):
    """A tiny model's model_tflops (~1e-4) and a decayed lr (~1e-9) keep their digits in metrics.jsonl: eight
    decimals would leave 4 significant digits of the one and 0 for the other."""
    from tuneforge.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, total_steps=1, start_step=0, progress_bar=False)
    logger.log(1, {"lr": 1.234567891e-9, "model_tflops": 9.297648615598922e-07, "loss": 2.0})
    logger.close(plot=False)
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert row["lr"] == pytest.approx(1.234567891e-9, rel=1e-8)
    assert row["model_tflops"] == pytest.approx(9.297648615598922e-07, rel=1e-8)


def test_examples_past_the_last_full_batch_are_announced(tiny_llama_dir, tmp_path):
    """10 examples, batch 4: each epoch trains 8; the two that sit out used to go unmentioned."""
    import json

    rows = tmp_path / "ten.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(10)))
    logs = []
    run_config(config(tiny_llama_dir, tmp_path / "run", f"data.train=[{rows}]", "training.batch_size=4",
                      "training.max_steps=1"), log=logs.append)
    assert any("2 of the 10 training examples do not fill a global batch (4 training examples)" in line
               for line in logs), logs
    assert any(line.startswith("done: 1 step, final loss") for line in logs), logs  # it said "1 steps"
    logs = []  # packed, a batch holds rows of several examples: the note counts rows, as the batch does
    run_config(config(tiny_llama_dir, tmp_path / "packed", f"data.train=[{rows}]", "training.batch_size=2",
                      "data.packing=true", "training.max_steps=1"), log=logs.append)
    # one row left: "1 of the 3 packed rows does not fill ... and sits out" (it said "do not fill ... sit out")
    assert any(re.search(r"\b(1 of the \d packed rows does not fill a global batch \(2 packed rows\) and sits"
                         r"|[2-9] of the \d packed rows do not fill a global batch \(2 packed rows\) and sit) out",
                         line) for line in logs), logs
    logs = []
    run_config(config(tiny_llama_dir, tmp_path / "run2", f"data.train=[{rows}]", "training.batch_size=5",
                      "training.max_steps=1"), log=logs.append)
    assert not any("not fill a global batch" in line for line in logs)


def test_a_max_length_past_the_models_positions_is_said(tiny_llama_dir, tmp_path):
    logs = []
    run_config(config(tiny_llama_dir, tmp_path / "run", "data.max_length=4096", "training.max_steps=1"),
               log=logs.append)
    assert any("data.max_length 4096 is past the model's 2048 positions" in line for line in logs), logs
    logs = []
    run_config(config(tiny_llama_dir, tmp_path / "run2", "training.max_steps=1"), log=logs.append)
    assert not any("positions (max_position_embeddings)" in line for line in logs)


def test_a_diverged_run_stops_instead_of_saving_a_nan_model(tiny_llama_dir, tmp_path):
    """An infinite learning rate turns the weights to inf after step 1, so step 2's loss is nan: the run stops
    there with an error naming the step, and no final model (an all-nan adapter) is written."""
    from tuneforge.errors import UserError

    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"Step 2: the loss is nan, so training stopped before saving a broken model "
                                        r"\(no checkpoint was saved\).*training.lr inf"):
        train(tiny_llama_dir, out, *FAST, "training.lr=inf")
    assert not (out / "adapter_model.safetensors").exists()


def test_nan_in_a_config_number_is_refused_by_key():
    from tuneforge.configs.typed import coerce
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"`dpo.beta` must be a number, got nan"):
        coerce("nan", float, "dpo.beta")
    with pytest.raises(ConfigError, match=r"`training.batch_size` must be an integer, got nan"):
        coerce(float("nan"), int, "training.batch_size")


def test_a_lora_rank_as_wide_as_a_layer_is_said(tiny_llama_dir, tmp_path):
    """tiny-llama's k/v projections are 64x32: rank 32 is no longer low-rank there, rank 8 is."""
    found = {}
    for rank in (32, 8):
        logs = []
        run_config(config(tiny_llama_dir, tmp_path / f"r{rank}", "training.max_steps=1", f"lora.rank={rank}"),
                   log=logs.append)
        found[rank] = [line for line in "\n".join(logs).splitlines() if "is at least the smaller side of" in line]
    assert len(found[32]) == 1 and "lora.rank 32" in found[32][0] and "k_proj (64x32)" in found[32][0]
    assert "q_proj" not in found[32][0] and not found[8]  # q_proj is 64x64: rank 32 is still low-rank there


def test_stage_pt_does_not_pack_for_a_prompt_method(tiny_llama_dir, tmp_path):
    """pt packs by default; a prompt method's virtual tokens would reach only a packed row's first example."""
    from pathlib import Path

    from tuneforge.configs.schema import load_train_config

    root = Path(__file__).resolve().parents[2]
    logs = {}
    for method in ("prompt_tuning", "lora"):
        logs[method] = []
        cfg = load_train_config(str(root / "examples" / "pt_tiny.yaml"),
                                [f"model.name_or_path={tiny_llama_dir}", f"output_dir={tmp_path / method}",
                                 f"method={method}", "training.max_steps=1", "training.progress_bar=false"])
        run_config(cfg, log=logs[method].append)
    assert any("examples are not packed" in line for line in logs["prompt_tuning"])
    assert not any("packed into" in line for line in logs["prompt_tuning"])
    assert any("packed into" in line for line in logs["lora"])  # the default still packs for the others


def test_a_section_the_method_does_not_read_is_said(tiny_llama_dir, tmp_path):
    """sft_lora_tiny.yaml with method=full keeps its `lora:` section: trained without a word before."""
    logs = []
    run_config(config(tiny_llama_dir, tmp_path / "full", "method=full", "training.max_steps=1",
                      "prompt_tuning.num_virtual_tokens=10"), log=logs.append)
    said = [line for line in logs if "reads none of the options" in line]
    assert said == ["note: method full reads none of the options under `lora:`, `prompt_tuning:`: they are ignored "
                    "(and left out of tuneforge_config.yaml)"]
    logs = []
    run_config(config(tiny_llama_dir, tmp_path / "dora", "method=dora", "training.max_steps=1"), log=logs.append)
    assert not [line for line in logs if "reads none of the options" in line]  # dora reads `lora:`
