"""Model FLOPs per token against a count by hand, and every run logging MFU."""

from __future__ import annotations

import pytest
import torch

from tests.test_training import losses, train
from tuneforge.training import flops
from tuneforge.training.metrics import read_metrics


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def test_flops_per_token_of_a_full_fine_tune_by_hand():
    # per layer: q 8x8=64, k 8x4=32 (1 kv head of dim 4), v 32, o 64, gate/up/down 8x16=128 each -> 576;
    # 2 layers 1152 + lm_head 32x8=256 (tied to the embedding, but a matmul all the same) -> N = 1408
    model = tiny_llama()
    assert flops.matmul_weights(model) == (1408, 1408)
    layers, hidden = flops.model_shape(model)
    # 6N + attention 12 * L * d * S at S = 10: 8448 + 1920
    assert flops.flops_per_token(1408, 1408, layers, hidden, 10) == 6 * 1408 + 12 * 2 * 8 * 10 == 10368


def test_flops_per_token_of_lora_by_hand():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    # LoRA A (8 -> 2) and B (2 -> out) on q (out 8) and v (out 4): 16+16 + 16+8 = 56 per layer, 112 in all
    n, trainable = flops.matmul_weights(model)
    assert (n, trainable) == (1408 + 112, 112)
    assert flops.model_shape(model) == (2, 8)
    # forward 2N + backward through activations 2N + weight gradients of the adapters 2T + attention
    assert flops.flops_per_token(n, trainable, 2, 8, 10) == 4 * 1520 + 2 * 112 + 1920 == 8224
    # DPO/KTO with a live reference: one more forward pass over the same tokens, 2N + a third of the attention
    assert flops.flops_per_token(n, trainable, 2, 8, 10, extra_forwards=1) == 8224 + 2 * 1520 + 4 * 2 * 8 * 10


def test_lm_head_is_charged_only_where_its_logits_are_read():
    """lm_head (32x8 = 256 of N = 1408) runs at label positions only: at a quarter of the tokens it costs a quarter
    of its 6 FLOPs per weight; with every token labelled the count is the plain 6N + attention."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    assert flops.head_weights(model) == (256, 256)
    full = flops.flops_per_token(1408, 1408, 2, 8, 10, head=(256, 256), head_share=0.25)
    assert full == 6 * (1408 - 256) + 0.25 * 6 * 256 + 1920
    assert flops.flops_per_token(1408, 1408, 2, 8, 10, head=(256, 256)) == flops.flops_per_token(1408, 1408, 2, 8, 10)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert flops.head_weights(lora) == (256, 0)  # frozen: forward and backward through it, no weight gradient
    # a live reference forward runs the head at the same positions: 2H per head position
    assert (flops.flops_per_token(1520, 112, 2, 8, 10, 1, head=(256, 0), head_share=0.5)
            == 4 * 1264 + 2 * 112 + 1920 + 0.5 * 4 * 256 + 2 * 1264 + 2 * 256 * 0.5 + 4 * 2 * 8 * 10)


def test_fed_counts_take_both_sides_of_a_pair_and_each_document_of_a_packed_row():
    from tuneforge.data import Encoded, EncodedPair
    from tuneforge.data.packing import PackedRow

    pair = EncodedPair(Encoded([1] * 5, [1] * 5), Encoded([1] * 3, [1] * 3))
    packed = PackedRow([1] * 6, [1] * 6, position_ids=[0, 1, 2, 3, 0, 1])
    assert flops.fed_counts([pair]) == (8, 25 + 9)  # len(pair) is 5: the padded width, not the work
    assert flops.fed_counts([packed, Encoded([1] * 2, [1] * 2)]) == (8, 16 + 4 + 4)
    tally = flops.WorkTally()
    tally.add(8, 34, 2)
    assert tally.seq_len == 34 / 8 and tally.head_share == 0.25


def test_gpu_peaks_come_from_the_datasheet_table():
    assert flops.gpu_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.gpu_peak("NVIDIA H100 PCIe") == 756e12
    assert flops.gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.gpu_peak("NVIDIA GeForce RTX 4090") == 165e12
    assert flops.gpu_peak("Some Future Accelerator") is None


def test_cpu_peak_is_probed_once_and_cached(tmp_path, monkeypatch):
    assert flops.probe_cpu_peak(torch.float32, size=64, seconds=0.01) > 0
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(flops, "probe_cpu_peak", lambda dtype, **kw: calls.append(dtype) or 1e11)
    assert flops.cpu_peak(torch.float32) == 1e11 and flops.cpu_peak(torch.float32) == 1e11
    assert calls == [torch.float32] and (tmp_path / "cpu_probes.json").is_file()


def test_a_day_old_peak_is_probed_again_and_never_lowered(tmp_path, monkeypatch):
    """A peak probed once on a busy CPU used to stand for good (and overstate every later MFU): a day on, the probe
    runs again, and the better of the two figures is kept."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    probes = iter([1e11, 3e11, 2e11])
    monkeypatch.setattr(flops, "probe_cpu_peak", lambda dtype, **kw: next(probes))
    clock = [1_000_000.0]
    monkeypatch.setattr(flops.time, "time", lambda: clock[0])
    assert flops.cpu_peak(torch.float32) == 1e11
    clock[0] += flops.PEAK_MAX_AGE_S - 1
    assert flops.cpu_peak(torch.float32) == 1e11  # fresh enough: no probe
    clock[0] += 2
    assert flops.cpu_peak(torch.float32) == 3e11  # a day old: probed again, higher
    clock[0] += flops.PEAK_MAX_AGE_S + 1
    assert flops.cpu_peak(torch.float32) == 3e11  # probed again, lower: the better figure stays
    clock[0] += flops.PEAK_MAX_AGE_S - 1
    assert flops.cpu_peak(torch.float32) == 3e11  # that probe restarted the day: no probe (none is left to run)


def test_cpu_peak_probe_takes_the_faster_of_mkl_and_onednn(monkeypatch):
    from tuneforge.kernels import onednn_linear

    products = []
    monkeypatch.setattr(flops, "_best_rate", lambda product, n, s: products.append(product()) or 1e9 * len(products))
    peak = flops.probe_cpu_peak(torch.float32, size=8)
    if onednn_linear.available():  # both products computed a @ b (oneDNN: a @ b.T of the same FLOPs)
        assert len(products) == 2 and peak == 2e9 and products[0].shape == products[1].shape == (8, 8)
    before = len(products)
    flops.probe_cpu_peak(torch.bfloat16, size=8)
    assert len(products) == before + 1  # bf16: torch's own matmul only


@pytest.mark.parametrize("cores, local, threads, share", [
    (2, 2, 2, 0.5),   # two 2-thread processes on 2 cores: one core each, half of what one probe showed
    (8, 2, 2, 1.0),   # a core per thread for both: each counts its whole probe
    (2, 4, 1, 0.5),   # more processes than cores: half a core each
    (2, 1, 4, 1.0),   # one oversubscribed process: its probe already ran on all the cores there are
])
def test_processes_sharing_a_cpu_count_their_share_of_its_cores(tmp_path, monkeypatch, cores, local, threads,
                                                                 share):
    """N processes on one machine do not have N probes' worth of peak: together they are bounded by its cores, so
    each counts the probe's per-core rate x min(threads, cores / processes)."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    monkeypatch.setattr(flops.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(flops.torch, "get_num_threads", lambda: threads)
    probed = 1e9 * min(threads, cores)  # a rate of 1 GFLOP/s per busy core
    monkeypatch.setattr(flops, "probe_cpu_peak", lambda dtype, **kw: probed)
    peak, _ = flops.device_peak(torch.device("cpu"), torch.float32)
    assert peak == pytest.approx(1e9 * min(threads, cores / local)) == pytest.approx(probed * share)
    meter = flops.EfficiencyMeter(tiny_llama(), torch.device("cpu"), torch.float32, world_size=local)
    assert meter.peak == pytest.approx(local * 1e9 * min(threads, cores / local))
    assert meter.peak <= 1e9 * cores  # never more than the machine's cores can do


def test_every_run_logs_mfu(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_llama_dir, out, "training.max_steps=2")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses(out)) == 2
    assert all(0 < r["mfu"] < 1 and r["model_tflops"] > 0 for r in rows), rows
    # mfu is achieved/peak: recompute it from the logged throughput and the cached probe
    peak = flops.cpu_peak(torch.float32)
    assert rows[-1]["mfu"] == pytest.approx(rows[-1]["model_tflops"] * 1e12 / peak, rel=1e-3)


def test_a_peak_probed_on_a_busy_cpu_is_raised_to_what_a_run_achieves(tmp_path, monkeypatch):
    """A probe measured under load caches too low a peak (MFU read 270%): the first run that achieves more raises
    the cached peak to that rate, so MFU never exceeds 100% and the cache never goes down."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(flops, "probe_cpu_peak", lambda dtype, **kw: 1e6)  # a probe that ran on a very busy machine
    meter = flops.EfficiencyMeter(tiny_llama(), torch.device("cpu"), torch.float32, world_size=1)
    achieved = meter.flops_per_token(16) * 1000.0
    assert achieved > 1e6
    assert meter.metrics(1000.0, seq_len=16)["mfu"] == pytest.approx(1.0)
    assert flops.cpu_peak(torch.float32) == pytest.approx(achieved)  # cached for the next run
    assert meter.metrics(500.0, seq_len=16)["mfu"] == pytest.approx(0.5)
    flops.raise_cpu_peak(torch.float32, 1.0)  # a lower rate never lowers the cached peak
    assert flops.cpu_peak(torch.float32) == pytest.approx(achieved)


def test_r_drop_counts_both_copies_of_each_row(tiny_llama_dir, tmp_path):
    """R-Drop runs every row twice (two dropout masks) in one forward and backward: twice the model FLOPs per token
    of the same run without it, on the same batches."""
    per_token = []
    for overrides in ([], ["training.rdrop_alpha=1"]):  # both with LoRA dropout, which R-Drop needs
        out = tmp_path / f"run{len(per_token)}"
        train(tiny_llama_dir, out, "training.max_steps=2", "lora.dropout=0.1", *overrides)
        last = [r for r in read_metrics(out / "metrics.jsonl") if "mfu" in r][-1]
        per_token.append(last["model_tflops"] / last["tokens_per_s"])
    assert per_token[1] == pytest.approx(2 * per_token[0], rel=1e-6)


def test_an_rl_step_counts_its_epochs_and_forward_passes(tmp_path, monkeypatch):
    """GRPO/PPO: each epoch trains on the rollout's tokens again (`copies`); sampling, old-policy and reference
    log-probs are forward-only passes over them, each charged lm_head where it reads it; the reward model's own
    pass over its own tokens counts too. The step's FLOPs for the tiny Llama against a sum worked by hand."""
    from tuneforge.training.rl import Rollout, mean_over_ranks, rollout_work

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(flops, "probe_cpu_peak", lambda dtype, **kw: 1e9)
    meter = flops.EfficiencyMeter(tiny_llama(), torch.device("cpu"), torch.float32, world_size=1)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    roll = Rollout(torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), labels,
                   ["a", "b"], [[5, 6], [7]], [])
    # PPO-like: sampling (head at the 3 completion tokens), old policy + values (head everywhere), reference (head at
    # the completion tokens), and a reward model's pass worth 1000 FLOPs
    work = rollout_work(roll, 2, False, meter, [True, False, True], reward_flops=1000.0)
    body, head, attention = 1408 - 256, 256, 4 * 2 * 8 * (16 + 9)  # 7 tokens, sequences of 4 and 3
    sampling = 2 * body * 7 + 2 * head * 3 + attention
    old = 2 * body * 7 + 2 * head * 7 + attention
    reference = 2 * body * 7 + 2 * head * 3 + attention
    assert work == {"tokens": 7, "token_squares": 25, "train_copies": 2, "head_positions": 7,
                    "other_flops": sampling + old + reference + 1000}
    # the loop's count for the step: 2 training passes (6N + attention x 3 each) plus the forward-only work
    tally = flops.WorkTally()
    tally.add(work["tokens"], work["token_squares"], work["head_positions"], other_flops=work["other_flops"])
    achieved = meter.metrics(7.0, tally.seq_len, head_share=tally.head_share, copies=2,
                             other_flops_per_token=tally.other_flops_per_token)["model_tflops"] * 1e12
    assert achieved == pytest.approx(2 * (6 * 1408 * 7 + 3 * attention) + sampling + old + reference + 1000)
    assert rollout_work(roll, 1, True, meter, [])["head_positions"] == 3

    class TwoRanks:  # the other rank held the same counts
        distributed, world_size, device = True, 2, "cpu"

        def all_reduce_sum(self, value):
            return value * 2

    summed = mean_over_ranks(TwoRanks(), {**work, "reward": 0.5})
    assert summed == {"tokens": 14, "token_squares": 50, "train_copies": 2.0, "head_positions": 14,
                      "other_flops": 2 * work["other_flops"], "reward": 0.5}


def test_a_reward_model_counts_its_forward_over_its_own_tokens(tiny_llama_dir):
    """The reward model scores the rendered conversations with its own tokenizer: its backbone runs over every
    token, its score head (hidden x 1) at each sequence's last one; `Rewards.flops` holds the step's total."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from tuneforge.data.templates import resolve_chat_template
    from tuneforge.data.types import EncodedPrompt
    from tuneforge.models.reward import RewardScorer
    from tuneforge.training.rl import Rewards, _RewardModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = LlamaForSequenceClassification(LlamaConfig(  # tiny_llama's shapes, the tokenizer's vocabulary
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=0))
    rm = _RewardModel.__new__(_RewardModel)
    rm.scorer, rm.template = RewardScorer(model, tokenizer), resolve_chat_template(tokenizer, None)
    prompts = [EncodedPrompt(input_ids=[1], messages=[{"role": "user", "content": q}]) for q in ("hi", "2+2?")]
    values, counted = rm.batch(["hello there", "4"], prompts)
    assert len(values) == 2
    from tuneforge.data.encode import render

    lengths = [len(tokenizer(render(tokenizer, rm.template, [*p.messages, {"role": "assistant", "content": t}], None,
                                    add_generation_prompt=False), add_special_tokens=False)["input_ids"])
               for t, p in zip(["hello there", "4"], prompts)]
    # layers 1152 weights (see above) over every token, the score head's 8 weights once per sequence, attention
    assert counted == 2 * 1152 * sum(lengths) + 2 * 8 * 2 + 4 * 2 * 8 * sum(n * n for n in lengths)
    rewards = Rewards.__new__(Rewards)
    rewards.fns, rewards.section = {"rm": rm}, type("S", (), {"reward": {"rm": 1.0}})()
    rewards.score(["hello there", "4"], [[], []], prompts)
    assert rewards.flops == counted
