"""`tuneforge estimate`: trainable parameters and memory per GPU for each fine-tuning method, before running it.

    tuneforge estimate --model llama-7b
    tuneforge estimate --model ./my-model --methods full,lora,qlora --batch-size 4 --seq-len 1024 --gpus 8 --zero 3
    tuneforge estimate --model qwen2.5-7b --method lora --lora-rank 16 --lora-targets q_proj,v_proj --json

Everything is computed analytically from the model's shapes (`estimate.shapes.ModelShape`); no model is built.
1 GB = 1e9 bytes throughout.

Memory model (per GPU, bytes; e = bytes per element of --dtype: 2 for bf16/fp16, 4 for fp32; N_t = trainable params)
- weights: every parameter in --dtype (e bytes); QLoRA stores the linear projections of the blocks in NF4 with
  double quantization (`NF4_BITS` = 4 + 8/64 + 32/(64*256) = 4.127 bits/param: 4-bit codes, one 8-bit absmax per
  64-weight block, one fp32 absmax per 256 blocks; Dettmers et al. 2023, "QLoRA", section 3) while embeddings,
  LM head, norms, biases and the adapters stay in --dtype (bitsandbytes quantizes only nn.Linear, and transformers
  keeps lm_head unquantized).
- gradients: N_t * e.
- fp32 master weights: N_t * 4 when --dtype is 16-bit, 0 for fp32 (mixed precision of Micikevicius et al. 2018,
  "Mixed Precision Training").
- optimizer states per trainable param: AdamW 8 (two fp32 moments), 8-bit AdamW 2 * (1 + 4/256) (two uint8 moments
  plus an fp32 absmax per 256-value block; Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization";
  the paged variant has the same size but can page to CPU), plain SGD 0.
  So mixed-precision AdamW costs 2 + 2 + 4 + 8 = 16 bytes per trainable param, the K = 12 accounting of
  Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models". (TuneForge's own
  loop and PEFT keep trainable weights in fp32 instead: 4 + 4 + 8, the same 16 bytes, no separate master copy.)
- ZeRO over --gpus N: stage 1 divides master weights + optimizer states by N, stage 2 also gradients, stage 3 also
  weights (ZeRO paper, section 5). Activations are per GPU (each GPU runs its own --batch-size micro-batch).
  --distributed names the engine instead: ddp = stage 0, zero2 = 2, zero3 = 3, fsdp = 3 (PyTorch FSDP2's full
  shard keeps 1/N of every parameter, gradient and optimizer state per GPU; its fp32 sharded parameters are the
  master weights). So full fine-tuning with mixed-precision AdamW needs 16 * N_params / N bytes per GPU before
  activations under zero3/fsdp, (2 + 14 / N) * N_params under zero2. Stage 3 also gathers whole blocks to compute
  them: 2 * (one block's weights) * e more per GPU (current + prefetched block), given in the notes.
- activations: see `layer_activation_bytes` (per-layer tensors saved for backward, derived for a Llama-style block the
  way Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", derive
  s*b*h*(34 + 5*a*s/h) for a GPT block) and `logits_bytes`; with gradient checkpointing (recompute per block, as
  transformers' `gradient_checkpointing_enable`) only each block's input (s*b*h*e) is kept, plus one block's full
  activations while it is recomputed.
  Blocks below the lowest trainable one (freeze's last N, llama_adapter's top layers) keep nothing: backward
  stops there (`grad_path`).
- total per GPU: the peak of one optimizer step. Weights, master weights and optimizer states stay the whole step;
  gradients (set to None after each step) fill during backward while the activations are freed, so with
  --grad-accum 1 the total is weights + master + states + max(activations + the LM head's gradient, gradients +
  the tied embedding's two accumulation temporaries); with --grad-accum > 1 the gradients of the earlier
  micro-batches stay through the next one's activations, so it is the sum of the rows (`step_peak`). Not counted:
  the CUDA context and kernels' workspace (~0.5-1 GB), allocator fragmentation, and the one moment-sized temporary
  (4 bytes per trainable param) that torch's default foreach AdamW allocates during `step()` (fused AdamW, which
  TuneForge uses, avoids it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from tuneforge.configs.typed import opt
from tuneforge.errors import UserError, did_you_mean
from tuneforge.estimate.shapes import PRESETS, ModelShape, resolve_shape

GB = 1e9
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127: QLoRA NF4 codes + double-quantized absmax constants
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2 * (1 + 4 / 256), "paged_adamw_8bit": 2 * (1 + 4 / 256), "sgd": 0.0}
DEFAULT_METHODS = ("full", "freeze", "lora", "qlora", "prompt_tuning")
LORA_FAMILY = ("lora", "rslora", "dora", "pissa", "olora", "lora_plus", "qlora", "loftq")
QUANTIZED = ("qlora", "loftq")  # 4-bit NF4 base
PROMPT_INPUT_METHODS = ("prompt_tuning", "p_tuning")  # the virtual tokens lengthen the input sequence


@dataclass
class EstimateArgs:
    """`tuneforge estimate` options (also usable from Python: `estimate(EstimateArgs(model="llama-7b"))`)."""

    model: str = opt(help="A preset (llama-7b, llama2-13b, llama3-8b, llama3-70b, qwen2-7b, qwen2.5-0.5b, qwen2.5-7b, "
                          "mistral-7b, smollm2-135m), a folder with config.json, or a Hub id when the Hub is reachable.")
    method: str | None = opt(None, "One method to estimate (shortcut for --methods).")
    methods: str | None = opt(None, "Comma-separated methods shown side by side. Default: "
                                    + ",".join(DEFAULT_METHODS) + ".")
    batch_size: int = opt(1, "Micro-batch size per GPU.")
    seq_len: int = opt(2048, "Tokens per sequence.")
    dtype: Literal["bf16", "fp16", "fp32"] = opt("bf16", "Compute/storage dtype; bf16/fp16 imply fp32 master weights.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"] = opt("adamw", "Optimizer (sets state size).")
    gpus: int = opt(1, "Number of GPUs (data parallel).")
    zero: int = opt(0, "ZeRO stage 0-3: 1 shards optimizer states, 2 also gradients, 3 also weights across --gpus.")
    distributed: Literal["ddp", "fsdp", "deepspeed", "zero2", "zero3"] | None = opt(
        None, "The engine of `training.distributed`, sharding over --gpus as it does: ddp a full copy per GPU, "
              "zero2 (DeepSpeed ZeRO-2) gradients + optimizer states, zero3 and fsdp (PyTorch FSDP2, full shard) "
              "also the weights. Sets --zero. zero2/zero3 are `training.distributed=deepspeed` with "
              "`training.deepspeed` 2/3 (without offload); deepspeed is zero2, training's default stage.")
    offload: Literal["none", "optimizer", "all"] = opt(
        "none", "As `training.deepspeed_offload`: optimizer keeps the master weights and optimizer states in CPU "
                "memory (0 on the GPU; their CPU size goes in the notes), all the weights too (ZeRO-3 only).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step (training.grad_accum). Above 1 the gradients stay "
                              "while the next micro-batch's activations are built, so the total adds them.")
    gradient_checkpointing: bool = opt(False, "Count activations with gradient checkpointing in the total (both "
                                              "variants are always shown).")
    lora_rank: int = opt(8, "LoRA rank r (LoRA family and QLoRA).")
    lora_targets: str = opt("all-linear", "Comma-separated modules to adapt (q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                          "up_proj,down_proj) or all-linear (TuneForge's lora default).")
    freeze_layers: int = opt(2, "`freeze`: the last N blocks train; negative: the first |N| (as TuneForge's "
                                "freeze.trainable_layers, default 2).")
    num_virtual_tokens: int = opt(20, "Virtual tokens of prompt_tuning, p_tuning, prefix_tuning and p_tuning_v2.")
    encoder_hidden: int = opt(128, "Hidden size of the p_tuning / prefix_tuning re-parameterisation MLP (TuneForge's "
                                   "default 128; 0: PEFT's default, the token dim: hidden for p_tuning, kv_dim for "
                                   "prefix_tuning).")
    adapter_bottleneck: int = opt(64, "`adapter`: bottleneck width of each Houlsby adapter.")
    llama_adapter_len: int = opt(10, "`llama_adapter`: adaption-prompt tokens per adapted layer (paper: 10).")
    llama_adapter_layers: int = opt(0, "`llama_adapter`: adapted top layers (paper: 30 of 32; 0: all, TuneForge's "
                                       "default; capped at the depth).")
    attention: Literal["sdpa", "eager"] = opt("sdpa", "Attention kernel: sdpa/flash keeps no s*s matrix; eager "
                                                       "saves the softmax probabilities (a*s*s per sequence and layer).")
    json: bool = opt(False, "Print JSON (bytes and counts) instead of the table.")


# ---- trainable parameters ------------------------------------------------------------------------------------------

@dataclass
class Params:
    """Trainable-parameter count of one method on one model. `added`: parameters the method adds to the base model
    (adapters, soft prompts); `trainable_base`: base parameters it unfreezes (full, freeze, bitfit)."""

    added: int = 0
    trainable_base: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return self.added + self.trainable_base


def lora_targets(shape: ModelShape, spec: str) -> list[str]:
    """The adapted projection names; `all-linear` is every projection in the blocks (PEFT excludes the LM head)."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    valid = shape.linears()
    if names == ["all-linear"]:
        return list(valid)
    if not names:
        raise UserError("`--lora-targets` is empty; use all-linear or names like q_proj,v_proj.")
    for n in names:
        if n not in valid:
            raise UserError(f"`--lora-targets`: `{n}` is not a projection of this model."
                            f"{did_you_mean(n, valid, list_choices=False)} Valid: {', '.join(valid)} or all-linear.")
    return list(dict.fromkeys(names))


def lora_params(shape: ModelShape, rank: int, targets: list[str], dora: bool = False) -> int:
    """LoRA (Hu et al. 2021): each adapted W (out x in) gets A (r x in) and B (out x r): r*(in+out) per layer.
    rsLoRA, PiSSA and LoRA+ change scaling, init or learning rate, not the count. DoRA (Liu et al. 2024) adds a
    magnitude vector of out_features per adapted layer."""
    per_layer = sum(rank * (i + o) + (o if dora else 0) for i, o in (shape.linears()[t] for t in targets))
    return shape.layers * per_layer


def _lora(shape, args, method) -> Params:
    targets = lora_targets(shape, args.lora_targets)
    n = lora_params(shape, args.lora_rank, targets, dora=method == "dora")
    notes = [f"{method}: r={args.lora_rank} on {','.join(targets)}: sum of r*(in+out)"
             + (" + out (DoRA magnitude)" if method == "dora" else "") + f" x {shape.layers} layers"]
    if method in QUANTIZED:
        notes.append(f"{method}: block projections in NF4 + double quantization ({NF4_BITS:.3f} bits/param); "
                     f"embeddings, LM head, norms and biases stay in {args.dtype}")
    return Params(added=n, notes=notes)


def _full(shape, args, method) -> Params:
    return Params(trainable_base=shape.total_params())


def freeze_trains(shape: ModelShape, n: int) -> list[bool]:
    """Which blocks TuneForge's `freeze.trainable_layers: n` trains (`methods.full.Freeze.trainable_blocks`): the
    last n, or for negative n the first |n|."""
    return [i >= shape.layers - n if n > 0 else i < -n for i in range(shape.layers)]


def _freeze(shape, args, method) -> Params:
    """TuneForge's `freeze`: the last N blocks train (first |N| if negative); embeddings, final norm and LM head
    stay frozen."""
    n = args.freeze_layers
    where = f"last {n}" if n > 0 else f"first {-n}"
    return Params(trainable_base=abs(n) * shape.layer_params(),
                  notes=[f"freeze: {where} of {shape.layers} blocks train"])


def _bitfit(shape, args, method) -> Params:
    """BitFit (Ben Zaken et al. 2022): only the bias terms train."""
    n = shape.layers * shape.biases_per_layer()
    if n:
        return Params(trainable_base=n, notes=["bitfit: bias terms only"])
    norms = shape.layers * shape.norms_per_layer() + shape.hidden
    return Params(notes=[f"bitfit: this model has no bias terms, so nothing trains; bitfit.include_norms would "
                         f"train the {norms:,} norm weights"])


def _prompt_tuning(shape, args, method) -> Params:
    """Prompt tuning (Lester et al. 2021): a soft prompt of num_virtual_tokens x hidden."""
    return Params(added=args.num_virtual_tokens * shape.hidden,
                  notes=[f"prompt_tuning: {args.num_virtual_tokens} virtual tokens x hidden"])


def _p_tuning(shape, args, method) -> Params:
    """P-tuning (Liu et al. 2021, "GPT Understands, Too") as PEFT's PromptEncoder with the MLP re-parameterisation:
    the prompt embedding plus Linear(h, e) -> Linear(e, e) -> Linear(e, h), with biases."""
    h, e = shape.hidden, args.encoder_hidden or shape.hidden
    mlp = (h * e + e) + (e * e + e) + (e * h + h)
    return Params(added=args.num_virtual_tokens * h + mlp,
                  notes=[f"p_tuning: soft prompt + MLP encoder ({mlp:,} params, dropped after training)"])


def _prefix(shape, args, method) -> Params:
    """Prefix tuning (Li & Liang 2021): learned keys and values at every layer, num_virtual_tokens x layers x 2 x
    kv_dim (PEFT sizes them by the key/value heads for grouped-query attention: token dim t = kv_dim). `prefix_tuning`
    trains them through PEFT's re-parameterisation MLP, a t-wide embedding -> Linear(t, e) -> tanh ->
    Linear(e, layers*2*t) with e = t by default, as in the paper; `p_tuning_v2` (Liu et al. 2022) trains the deep
    prompts directly."""
    t = shape.kv_dim
    prefix = args.num_virtual_tokens * shape.layers * 2 * t
    if method == "p_tuning_v2":
        return Params(added=prefix, notes=["p_tuning_v2: virtual tokens x layers x 2 x kv_dim"])
    e, out = args.encoder_hidden or t, shape.layers * 2 * t
    trained = args.num_virtual_tokens * t + (t * e + e) + (e * out + out)
    return Params(added=trained, notes=[f"prefix_tuning: MLP re-parameterisation while training; the saved prefix "
                                        f"is {prefix:,} params"])


def _adapter(shape, args, method) -> Params:
    """Houlsby et al. 2019 bottleneck adapters: two per block (after attention, after the MLP), each down h->m and
    up m->h with biases: 2*h*m + m + h."""
    h, m = shape.hidden, args.adapter_bottleneck
    return Params(added=shape.layers * 2 * (2 * h * m + m + h),
                  notes=[f"adapter: 2 Houlsby adapters per block, bottleneck {m}"])


IA3_TARGETS = {"llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
               "qwen2": ("q_proj", "v_proj", "down_proj"), "qwen3": ("q_proj", "v_proj", "down_proj")}


def _ia3(shape, args, method) -> Params:
    """(IA)^3 (Liu et al. 2022): learned vectors rescaling attention outputs (out_features each) and the
    feed-forward down projection's input (in_features). Targets are PEFT's defaults for the model type."""
    targets = IA3_TARGETS[shape.model_type]
    lin = shape.linears()
    n = sum(lin[t][0] if t == "down_proj" else lin[t][1] for t in targets)
    return Params(added=shape.layers * n, notes=[f"ia3: vectors on {','.join(targets)}"])


def _llama_adapter(shape, args, method) -> Params:
    """LLaMA-Adapter (Zhang et al. 2023) as PEFT's adaption prompt: per adapted top layer, adapter_len x hidden
    prompt vectors plus one zero-initialised gate scalar."""
    layers = llama_adapter_layers(shape, args)
    notes = [f"llama_adapter: {args.llama_adapter_len} prompt tokens on the top {layers} layers"]
    from tuneforge.methods.llama_adapter import supported_model_types  # PEFT's list, as training checks it

    if shape.model_type not in supported_model_types():
        notes.append(f"llama_adapter: PEFT's adaption prompt supports model types "
                     f"{', '.join(supported_model_types())}, not {shape.model_type}")
    return Params(added=layers * (args.llama_adapter_len * shape.hidden + 1), notes=notes)


def llama_adapter_layers(shape: ModelShape, args: EstimateArgs) -> int:
    return min(args.llama_adapter_layers or shape.layers, shape.layers)


TRAINABLE = {"full": _full, "freeze": _freeze, **{m: _lora for m in LORA_FAMILY}, "bitfit": _bitfit,
             "prompt_tuning": _prompt_tuning, "p_tuning": _p_tuning, "prefix_tuning": _prefix,
             "p_tuning_v2": _prefix, "adapter": _adapter, "ia3": _ia3, "llama_adapter": _llama_adapter}


def trainable_params(shape: ModelShape, method: str, args: EstimateArgs) -> Params:
    return TRAINABLE[method](shape, args, method)


# ---- activations ---------------------------------------------------------------------------------------------------

def layer_activation_bytes(shape: ModelShape, e: int, trains: bool) -> int:
    """Bytes one Llama-style block saves for backward, per token, with SDPA/flash attention (no s*s term).

    Derived like Korthikanti et al. 2022 (section 4.1), who get 34*s*b*h bytes + 5*a*s^2*b for a GPT block, but for
    RMSNorm (computed in fp32 by transformers), SwiGLU with intermediate size I, grouped-query attention
    (q_dim = heads*head_dim, kv_dim = kv_heads*head_dim) and no dropout. Per token:
    - each of the 2 RMSNorms: its fp32 input (4h; saved by pow/mul) + the normalised value and the output
      (2*e*h; needed only for the norm weight's and the projections' weight gradients);
    - attention: q, k, v after RoPE and the SDPA output (e*(2*q_dim + 2*kv_dim)), 4 bytes of logsumexp per head,
      and the o_proj input copy (e*q_dim; weight gradient only);
    - SwiGLU: gate output (SiLU backward), SiLU output and up output (the product's backward) and the product
      (down_proj input; weight gradient only): 4*e*I.
    A frozen block (`trains=False`) skips what only weight gradients need (PyTorch saves a tensor only when the
    gradient it serves is required): 2*4h + e*(2*q_dim + 2*kv_dim) + 3*e*I.
    Against the paper's 34*s*b*h (LayerNorm inputs 4, attention 11, MLP 19, in 16-bit): RMSNorm keeps fp32
    internals, SwiGLU has one more I-wide tensor than GeLU, there are no dropout masks, and flash attention saves
    its output and logsumexp instead of the s*s probabilities (`eager_attention_bytes` adds those back).
    Measured in fp32 on CPU (full and LoRA, saved bytes from torch.profiler's allocation events): within 7% of
    what the blocks hold (bench/bench_estimate_cpu.py). Not yet measured on a GPU (`pytest -m gpu` holds the check
    that would: tests/test_estimate.py)."""
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    if trains:
        return 2 * (4 + 2 * e) * h + e * (3 * q + 2 * kv) + 4 * e * i + 4 * shape.heads
    return 2 * 4 * h + e * (2 * q + 2 * kv) + 3 * e * i + 4 * shape.heads


def eager_attention_bytes(shape: ModelShape, e: int, seq: int) -> int:
    """Per token and layer, eager attention also saves the fp32 softmax output and (16-bit runs) its cast copy:
    heads * seq * (4 + e) (the a*s^2 term of Korthikanti et al.; flash/SDPA recompute it instead)."""
    return shape.heads * seq * (4 + (e if e < 4 else 0))


def logits_bytes(shape: ModelShape, e: int) -> tuple[int, int]:
    """Per token: (held, backward). Held from the loss into backward: only the fp32 log-probabilities cross-entropy
    saves, 4V. The logits themselves (e*V, the model output) die when the loss has been computed: TuneForge's
    `Stage.loss` returns the loss alone (so does Hugging Face's Trainer), and neither log_softmax nor the fp32 cast
    saves its input. Added in backward: the two fp32 gradients of that size that exist at once in log_softmax's
    backward, 8V. The forward's own moment in the loss (logits + their fp32 copy + the log-probabilities, (e + 8)V
    at most) stays under that 12V in every dtype. (Korthikanti et al. count 4V for fp32 logits only.) Measured on
    CPU with torch.profiler's allocation events (tests/test_estimate.py; bench/bench_estimate_cpu.py): the loss adds
    12V per token above the blocks in fp32; the same autograd graph runs on GPUs, not yet measured there."""
    return shape.vocab * 4, shape.vocab * 8


def method_extra_bytes(shape: ModelShape, method: str, args: EstimateArgs, e: int) -> int:
    """Per token and adapted layer, what the method's own modules save beyond the frozen block."""
    lin = shape.linears()
    if method in LORA_FAMILY:
        targets = lora_targets(shape, args.lora_targets)
        if e < 4:  # autocast casts each module's input separately for the fp32 adapter weights
            inputs = sum(lin[t][0] for t in targets)
        else:  # fp32: modules that read the same tensor (q/k/v, gate/up) share it
            groups = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
            inputs = sum({groups.get(t, t): lin[t][0] for t in targets}.values())
        dora = sum(2 * 4 * lin[t][1] for t in targets) if method == "dora" else 0  # base and LoRA outputs, fp32
        return e * (inputs + len(targets) * args.lora_rank) + dora
    if method == "adapter":
        return 2 * e * (shape.hidden + 2 * args.adapter_bottleneck)  # input, pre- and post-activation, x2
    if method == "ia3":
        return e * sum(lin[t][0] if t == "down_proj" else lin[t][1] for t in IA3_TARGETS[shape.model_type])
    if method == "llama_adapter":
        return 2 * e * shape.q_dim  # the adaption-prompt attention's query and output
    return 0


def activation_bytes(shape: ModelShape, method: str, args: EstimateArgs, checkpointing: bool) -> float:
    """Peak activation memory of one micro-batch (T tokens): blocks, final norm and the loss over the logits.

    Without checkpointing the peak is at the start of backward: T * (sum of blocks + final norm + 12V).
    With checkpointing, forward keeps each block's input (e*h per token); backward first peaks in the loss (final
    norm + 12V), then while one block is recomputed (its full activations; nothing vocabulary-sized is left by then):
    T * (layers*e*h + max(final norm + 12V, largest block)). Both measured on CPU against torch.profiler's
    allocation events (bench/bench_estimate_cpu.py, tests/test_estimate.py); not yet measured on a GPU."""
    e = DTYPE_BYTES[args.dtype]
    seq = args.seq_len + (args.num_virtual_tokens if method in PROMPT_INPUT_METHODS else 0)
    tokens = args.batch_size * seq
    blocks = block_activation_bytes(shape, method, args, e, seq)
    path = sum(grad_path(shape, method, args))
    final_norm = (4 + 2 * e if method == "full" else 4) * shape.hidden
    held, backward = logits_bytes(shape, e)
    loss_phase = final_norm + held + backward
    if not checkpointing:
        return float(tokens * (sum(blocks) + loss_phase))
    return float(tokens * (path * e * shape.hidden + max(loss_phase, max(blocks))))


def grad_path(shape: ModelShape, method: str, args: EstimateArgs) -> list[bool]:
    """The blocks backward runs through: from the lowest one holding trainable weights up. Below it nothing needs a
    gradient, so autograd saves nothing there (frozen embeddings; checkpointing is non-reentrant): with
    `freeze` on the last 2 of 32 blocks, 30 blocks keep no activations."""
    if method == "freeze":
        trains = freeze_trains(shape, args.freeze_layers)
    elif method == "llama_adapter":
        trains = [i >= shape.layers - llama_adapter_layers(shape, args) for i in range(shape.layers)]
    else:
        return [True] * shape.layers
    lowest = trains.index(True)
    return [i >= lowest for i in range(shape.layers)]


def block_activation_bytes(shape: ModelShape, method: str, args: EstimateArgs, e: int, seq: int) -> list[int]:
    """Per token, each block's saved activations: trainable or frozen block + the method's own modules; 0 for the
    blocks below the gradient path."""
    trains = [False] * shape.layers
    if method == "full":
        trains = [True] * shape.layers
    elif method == "freeze":
        trains = freeze_trains(shape, args.freeze_layers)
    adapted = [True] * shape.layers
    if method == "llama_adapter":
        adapted = [i >= shape.layers - llama_adapter_layers(shape, args) for i in range(shape.layers)]
    attention = eager_attention_bytes(shape, e, seq) if args.attention == "eager" else 0
    extra = method_extra_bytes(shape, method, args, e)
    return [(layer_activation_bytes(shape, e, t) + attention + (extra if a else 0)) if on else 0
            for t, a, on in zip(trains, adapted, grad_path(shape, method, args))]


# ---- memory table --------------------------------------------------------------------------------------------------

@dataclass
class Column:
    """One method's estimate. Byte fields are per GPU after ZeRO sharding; `*_unsharded` keep the whole-model sizes."""

    method: str
    total_params: int
    trainable_params: int
    trainable_share: float  # percent
    weights: float
    gradients: float
    master_weights: float
    optimizer_states: float
    activations: float
    activations_checkpointed: float
    total: float
    notes: list[str]
    weights_unsharded: float
    gradients_unsharded: float
    optimizer_unsharded: float  # master weights + optimizer states

    @property
    def before_activations(self) -> float:
        return self.weights + self.gradients + self.master_weights + self.optimizer_states


def weight_bytes(shape: ModelShape, method: str, params: Params, e: int) -> float:
    """Base weights in the compute dtype (QLoRA: block projections in NF4) plus what the method adds."""
    base = shape.total_params()
    if method not in QUANTIZED:
        return float((base + params.added) * e)
    quantized = shape.layers * shape.linear_weights_per_layer()
    return quantized * NF4_BITS / 8 + (base - quantized + params.added) * e


def column(shape: ModelShape, method: str, args: EstimateArgs) -> Column:
    """The memory rows of one method, with ZeRO sharding applied over --gpus."""
    e = DTYPE_BYTES[args.dtype]
    params = trainable_params(shape, method, args)
    n_t, total = params.trainable, shape.total_params() + params.added
    weights, grads = weight_bytes(shape, method, params, e), float(n_t * e)
    master, states = float(n_t * 4 if e < 4 else 0), n_t * OPTIMIZER_BYTES[args.optimizer]
    n, z = args.gpus, args.zero
    col = Column(method=method, total_params=total, trainable_params=n_t, trainable_share=100.0 * n_t / total,
                 weights=weights / n if z >= 3 else weights, gradients=grads / n if z >= 2 else grads,
                 master_weights=master / n if z >= 1 else master, optimizer_states=states / n if z >= 1 else states,
                 activations=activation_bytes(shape, method, args, checkpointing=False),
                 activations_checkpointed=activation_bytes(shape, method, args, checkpointing=True),
                 total=0.0, notes=params.notes, weights_unsharded=weights, gradients_unsharded=grads,
                 optimizer_unsharded=master + states)
    if args.offload != "none":
        offload(col, args.offload)
    col.total = step_peak(shape, method, args, col)
    return col


def step_peak(shape: ModelShape, method: str, args: EstimateArgs, col: Column) -> float:
    """Per GPU, the peak of one optimizer step. The loop sets gradients to None after each step, so with one
    micro-batch they appear only during backward, as the activations are freed: the peak is at the start of
    backward (activations; for methods that train the LM head, its gradient, created first, rides along) or at its
    end (every gradient). A tied embedding gets its gradient twice, from the LM head and from the embedding: at the
    end, the embedding's dense gradient and the sum of the two exist beside the first (2*V*h more, measured). With
    gradient accumulation the gradients of the earlier micro-batches stay: the sum of the rows."""
    act = col.activations_checkpointed if args.gradient_checkpointing else col.activations
    if args.grad_accum > 1:
        return col.before_activations + act
    shard = col.gradients / col.gradients_unsharded if col.gradients_unsharded else 0.0  # ZeRO-2/3 share
    e = DTYPE_BYTES[args.dtype]
    head = shape.vocab * shape.hidden * e * shard if method == "full" else 0.0
    tied = 2 * head if shape.tied_embeddings else 0.0
    return col.weights + col.master_weights + col.optimizer_states + max(act + head, col.gradients + tied)


def offload(col: Column, what: str) -> None:
    """DeepSpeed's offload moves the (sharded) optimizer side, and with `all` the weight shards, to CPU memory."""
    cpu = col.master_weights + col.optimizer_states + (col.weights if what == "all" else 0.0)
    col.master_weights = col.optimizer_states = 0.0
    if what == "all":
        col.weights = 0.0
    col.notes = [*col.notes, f"{col.method}: offload={what} keeps {cpu / GB:.3g} GB per GPU process in CPU memory "
                             f"instead (not in the totals)."]


def parse_methods(args: EstimateArgs) -> list[str]:
    names = [m.strip() for m in (args.method or "").split(",") + (args.methods or "").split(",") if m.strip()]
    names = list(dict.fromkeys(names)) or list(DEFAULT_METHODS)
    for name in names:
        if name not in TRAINABLE:
            hint = did_you_mean(name, TRAINABLE, list_choices=False)
            raise UserError(f"`--methods`: unknown method `{name}`.{hint} Known: {', '.join(TRAINABLE)}.")
    return names


def validate(args: EstimateArgs, shape: ModelShape) -> list[str]:
    """Raise UserError for impossible settings; return notes for legal but pointless ones."""
    for key in ("batch_size", "seq_len", "grad_accum", "lora_rank", "num_virtual_tokens", "adapter_bottleneck",
                "llama_adapter_len"):
        if getattr(args, key) < 1:
            raise UserError(f"`--{key.replace('_', '-')}` must be at least 1, got {getattr(args, key)}.")
    if args.gpus < 1:
        raise UserError(f"`--gpus` must be at least 1, got {args.gpus}.")
    if args.zero not in (0, 1, 2, 3):
        raise UserError(f"`--zero` must be a ZeRO stage 0, 1, 2 or 3, got {args.zero}.")
    if args.offload != "none" and args.distributed in ("ddp", "fsdp"):
        raise UserError(f"`--offload {args.offload}` is DeepSpeed's offload (`training.deepspeed_offload`), which "
                        f"training accepts only with `training.distributed: deepspeed`: use --distributed zero2 or "
                        f"zero3, or drop --offload. (FSDP's `training.fsdp_cpu_offload` is not estimated.)")
    if args.offload != "none" and args.zero < (3 if args.offload == "all" else 1):
        need = "ZeRO-3 (--distributed zero3)" if args.offload == "all" else "a ZeRO stage (--distributed zero2|zero3)"
        raise UserError(f"`--offload {args.offload}` is DeepSpeed's offload of sharded state and needs {need}.")
    for key in ("encoder_hidden", "llama_adapter_layers"):
        if getattr(args, key) < 0:
            raise UserError(f"`--{key.replace('_', '-')}` must be 0 (the default size) or positive, "
                            f"got {getattr(args, key)}.")
    validate_freeze_layers(args.freeze_layers, shape)
    notes = [past_the_context(shape, args.seq_len)] if shape.context and args.seq_len > shape.context else []
    if args.zero and args.gpus == 1:
        engine = f"--distributed {args.distributed}" if args.distributed else f"ZeRO-{args.zero}"
        notes.append(f"{engine} with 1 GPU shards nothing: the numbers equal one process without sharding. "
                     f"Pass --gpus N.")
    if args.gpus > 1 and not args.zero:
        notes.append(f"{args.gpus} GPUs without ZeRO (plain data parallel): every GPU holds a full copy.")
    if args.dtype == "fp32" and args.attention == "sdpa":
        notes.append("fp32 on CUDA: flash SDPA kernels need 16-bit inputs, so PyTorch falls back to the math kernel "
                     "that stores the a*s^2 attention probabilities; add --attention eager to count them.")
    if args.optimizer == "paged_adamw_8bit":
        notes.append("paged_adamw_8bit: same size as adamw_8bit; its pages can move to CPU RAM under pressure.")
    if args.optimizer == "sgd":
        notes.append("sgd: plain SGD keeps no state (momentum would add 4 bytes per trainable param).")
    return notes


def past_the_context(shape: ModelShape, seq_len: int) -> str:
    """Legal (long-context fine-tuning does it on purpose) but usually a typo or a wrong model, so said next to the
    figures, as `tuneforge train` says it for data.max_length."""
    return (f"--seq-len {seq_len} is past the {shape.context} positions {shape.name} was built for "
            f"(max_position_embeddings): training at that length runs it at positions it has never seen. Lower "
            f"--seq-len to {shape.context} or less unless you extend the context on purpose (rope scaling); the "
            f"figures are the memory of {seq_len} tokens either way.")


def validate_freeze_layers(n: int, shape: ModelShape) -> None:
    """The values training's `freeze.trainable_layers` accepts on this model, less 0 (training allows 0 only next to
    `freeze.trainable_modules` patterns, which the estimator cannot count)."""
    if n == 0:
        raise UserError("`--freeze-layers 0` trains no block (training accepts it only with "
                        "`freeze.trainable_modules`, which the estimator does not count). Pass N to train the last "
                        "N blocks or -N for the first N.")
    if abs(n) > shape.layers:
        raise UserError(f"`--freeze-layers {n}`: the model has only {shape.layers} blocks. Pass N between 1 and "
                        f"{shape.layers} (the last N blocks train) or between -{shape.layers} and -1 (the first |N|).")


@dataclass
class Report:
    shape: ModelShape
    args: EstimateArgs
    columns: list[Column]
    notes: list[str]


ENGINE_ZERO = {"ddp": 0, "zero2": 2, "zero3": 3, "fsdp": 3}


def apply_engine(args: EstimateArgs) -> EstimateArgs:
    """--distributed as the ZeRO stage it shards like. FSDP2's full shard divides weights, gradients and optimizer
    state (its sharded fp32 parameters are the master weights) over the GPUs exactly as ZeRO-3 does. `deepspeed`
    is training's `distributed: deepspeed`: ZeRO-2, its default stage, or 3 with --zero 3 (`training.deepspeed: 3`)."""
    given = args.distributed
    if given is None:
        return args
    engine = ("zero3" if args.zero == 3 else "zero2") if given == "deepspeed" else given
    if engine not in ENGINE_ZERO:
        raise UserError(f"`--distributed` must be one of {', '.join(ENGINE_ZERO)} or deepspeed, got `{given}`.")
    stage = ENGINE_ZERO[engine]
    if args.zero not in (0, stage):
        raise UserError(f"`--distributed {given}` shards like ZeRO-{stage}, but `--zero {args.zero}` "
                        f"was given too; pass one of them.")
    return replace(args, distributed=engine, zero=stage)


def gathered_block_bytes(shape: ModelShape, args: EstimateArgs) -> float:
    """ZeRO-3/FSDP all-gather one block's weights (in --dtype) to compute it, and prefetch the next: two blocks'
    worth sit on each GPU on top of the shards (not in the total; listed in the notes)."""
    return 2.0 * shape.linear_weights_per_layer() * DTYPE_BYTES[args.dtype]


def estimate(args: EstimateArgs) -> Report:
    """The estimate for every requested method (the programmatic entry point)."""
    args = apply_engine(args)
    shape = resolve_shape(args.model)
    notes = validate(args, shape)
    if args.zero == 3 and args.gpus > 1:
        notes.append(f"{'FSDP' if args.distributed == 'fsdp' else 'ZeRO-3'}: each GPU also holds two blocks' "
                     f"gathered weights while it computes them (the current and the prefetched one): "
                     f"{gathered_block_bytes(shape, args) / GB:.2f} GB, not in the totals.")
    methods = parse_methods(args)
    columns = [column(shape, m, args) for m in methods]
    for c in columns:
        notes.extend(c.notes)
    notes += refused_by_training(shape, methods, args)
    return Report(shape=shape, args=args, columns=columns, notes=notes)


def refused_by_training(shape, methods: list[str], args: EstimateArgs) -> list[str]:
    """The columns `tuneforge train` would refuse to run, said next to their figures: sizing a cluster for qlora
    under FSDP from the numbers alone would plan a run that cannot start (llama_adapter's model types are noted by
    its column)."""
    notes = []
    if "qlora" in methods and args.distributed == "fsdp":
        notes.append("qlora: training refuses fsdp (it cannot shard qlora's packed 4-bit weights); the qlora column "
                     "is what it would take. Use --distributed ddp for qlora, or lora with fsdp.")
    return notes


# ---- output --------------------------------------------------------------------------------------------------------

def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def fmt_gb(nbytes: float) -> str:
    gb = nbytes / GB
    if gb == 0:
        return "0"
    if gb >= 100:
        return f"{gb:.0f}"
    if gb >= 0.1:
        return f"{gb:.2f}"
    return f"{gb:.2g}"


def fmt_share(pct: float) -> str:
    return f"{pct:.2f}%" if pct >= 0.1 or pct == 0 else f"{pct:.2g}%"


def header_lines(report: Report) -> list[str]:
    s, a = report.shape, report.args
    kind = "preset" if s.source == "preset" else s.source
    prec = f"{a.dtype} mixed precision" if a.dtype != "fp32" else "fp32"
    engine = {"fsdp": "FSDP (= ZeRO-3)", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "ddp": "DDP"}
    sharding = f"{engine.get(a.distributed, f'ZeRO-{a.zero}')} over {a.gpus} GPU{'s' if a.gpus > 1 else ''}"
    return [f"tuneforge estimate: {s.name} ({kind}): {fmt_count(s.total_params())} params, {s.layers} layers, "
            f"hidden {s.hidden}, heads {s.heads}/{s.kv_heads} kv, intermediate {s.intermediate}, vocab {s.vocab}",
            f"setup: batch {a.batch_size} x seq {a.seq_len} per GPU, {prec}, {a.optimizer}, {sharding}, "
            f"{a.attention} attention",
            "memory in GB per GPU (1 GB = 1e9 bytes)"]


def table_rows(report: Report) -> list[tuple[str, list[str]]]:
    cs, ckpt = report.columns, report.args.gradient_checkpointing
    return [
        ("total params", [fmt_count(c.total_params) for c in cs]),
        ("trainable params", [fmt_count(c.trainable_params) for c in cs]),
        ("trainable share", [fmt_share(c.trainable_share) for c in cs]),
        ("weights", [fmt_gb(c.weights) for c in cs]),
        ("gradients", [fmt_gb(c.gradients) for c in cs]),
        ("fp32 master weights", [fmt_gb(c.master_weights) for c in cs]),
        ("optimizer states", [fmt_gb(c.optimizer_states) for c in cs]),
        ("subtotal before activations", [fmt_gb(c.before_activations) for c in cs]),
        ("activations, no checkpointing", [fmt_gb(c.activations) for c in cs]),
        ("activations, grad checkpointing", [fmt_gb(c.activations_checkpointed) for c in cs]),
        (f"total per GPU ({'with' if ckpt else 'no'} checkpointing)", [fmt_gb(c.total) for c in cs]),
    ]


def render_table(report: Report) -> str:
    rows = table_rows(report)
    label_w = max(len(label) for label, _ in rows) + 2
    col_w = max(10, *(len(c.method) + 2 for c in report.columns))
    lines = header_lines(report) + [""]
    lines.append(" " * label_w + "".join(f"{c.method:>{col_w}}" for c in report.columns))
    lines += [f"{label:<{label_w}}" + "".join(f"{v:>{col_w}}" for v in values) for label, values in rows]
    if report.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in report.notes]
    lines.append("  - total = weights + master weights + optimizer states + the larger of activations and gradients "
                 "(gradients fill as activations are freed; with --grad-accum > 1 the sum of the rows); add "
                 "~0.5-1 GB for the CUDA context.")
    return "\n".join(lines)


def report_dict(report: Report) -> dict:
    """JSON-ready: bytes (per GPU unless `_unsharded`) and counts; 1 GB = 1e9 bytes."""
    cols = {}
    for c in report.columns:
        d = asdict(c)
        d["before_activations"] = c.before_activations
        cols[c.method] = d
    shape = asdict(report.shape)
    shape["total_params"] = report.shape.total_params()
    return {"model": shape, "setup": asdict(report.args), "unit": "bytes", "gb": GB, "methods": cols,
            "notes": report.notes}


def estimate_cli(args: EstimateArgs) -> int:
    report = estimate(args)
    print(json.dumps(report_dict(report), indent=2) if args.json else render_table(report))
    return 0


__all__ = ["EstimateArgs", "estimate", "estimate_cli", "report_dict", "render_table", "PRESETS"]
