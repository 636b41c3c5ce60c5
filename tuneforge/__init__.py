"""TuneForge: from base weights to a fine-tuned, aligned, evaluated and served LLM."""

import logging

__version__ = "0.1.0"


def _not_the_bnb_cpu_kernel_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes (imported by PEFT's LoRA on every run) logs "Failed to load CPU gemm_4bit_forward" on CPUs with
    avx512_bf16 unless the `kernels` package fetches a hub kernel, which only 4-bit CPU inference would use."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def _not_the_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    """DeepSpeed, when installed, warns "Setting accelerator to CPU" whenever transformers asks it anything on a
    machine without a GPU (every `export`), although nothing of DeepSpeed runs: a CPU run knows it is on the CPU."""
    return not str(record.msg).startswith("Setting accelerator to CPU")


def _not_the_tokenizer_length_notice(record: logging.LogRecord) -> bool:
    """transformers warns "Token indices sequence length is longer than the specified maximum ... will result in
    indexing errors" when it tokenizes a long row or prompt; TuneForge cuts rows to data.max_length itself and refuses
    a prompt past the context with its own error, so the warning only contradicts what happens."""
    return not str(record.msg).startswith("Token indices sequence length is longer")


def _quiet_notices_that_contradict_what_happens() -> None:
    """On import, not in the CLI only: a notebook or script that calls TuneForge sees the same output as the CLI.
    Each filter drops one message from one logger; adding the same function twice keeps one (same object)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_bnb_cpu_kernel_notice)
    logging.getLogger("DeepSpeed").addFilter(_not_the_deepspeed_cpu_notice)
    logging.getLogger("transformers.tokenization_utils_base").addFilter(_not_the_tokenizer_length_notice)


_quiet_notices_that_contradict_what_happens()
