"""The CLI surface: --version, one --help layout for every verb, quiet broken pipes, and the README's first demo."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge import __version__
from tuneforge.cli import VERBS
from tuneforge.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    assert cli_main([flag]) == 0
    assert capsys.readouterr().out == f"tuneforge {__version__}\n"
    assert cli_main(["--help"]) == 0 and "--version" in capsys.readouterr().out


@pytest.mark.parametrize("verb", [v.name for v in VERBS])
def test_every_verb_has_the_same_help_layout(verb, capsys):
    assert cli_main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    described = next(v for v in VERBS if v.name == verb).help
    # usage line, the verb's one-line description, the options block, then examples from its module docstring
    assert out.startswith(f"usage: tuneforge {verb} "), out[:200]
    assert f"\n\n{described}\n\n" in out
    assert re.search(r"\noptions:\n  -h, --help", out)
    assert f"\nexamples:\n  tuneforge {verb}" in out


def test_chat_help_lists_the_conversation_commands(capsys):
    assert cli_main(["chat", "--help"]) == 0
    out = capsys.readouterr().out
    assert "/reset" in out and "/exit" in out and "--adapter" in out


def test_methods_refuses_unknown_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["methods", "--bogus"])
    assert exit_.value.code == 2 and "tuneforge methods: error: unrecognized arguments: --bogus" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv, meant", [(["data", "synth", "self_instruct", "--out", "x", "--num-instrucions", "5"],
                                          "--num-instructions"),
                                         (["eval", "--modle", "x"], "--model"), (["chat", "--promt", "hi"], "--prompt")])
def test_a_misspelt_flag_gets_the_flag_it_meant_not_the_usage_block(argv, meant, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"did you mean `{meant}`?" in err and "usage:" not in err and "--help` lists every option" in err


def test_a_closed_pipe_ends_quietly():
    """`tuneforge train --help | head -1`: the reader goes away before we write; no traceback, no 'Exception
    ignored' from the interpreter's final flush."""
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # before the child has imported anything, so its first write hits a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


def test_broken_pipe_inside_a_verb_is_quiet(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, _text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli_main(["methods"]) == 141
    assert capsys.readouterr().err == ""


def _readme_demo() -> list[list[str]]:
    """The `tuneforge ...` commands of the first bash block under README's "Using it"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Using it\n\n```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith("tuneforge "):
            commands.append(shlex.split(line)[1:])
    return commands


def test_readme_first_demo_answers_with_text(tmp_path, monkeypatch, capsys):
    """The README's first demo, run as written (outputs redirected to a temp folder): the tiny model trained by it
    must answer the demo's question with visible text, not the blank line an untrained model gives."""
    commands = _readme_demo()
    assert [c[0] for c in commands][:3] == ["init-model", "train", "chat"], commands
    monkeypatch.chdir(ROOT)  # the demo names examples/ and the bundled data relative to the repository root
    swap = {"runs/": f"{tmp_path}/runs/", "outputs/": f"{tmp_path}/outputs/"}

    def local(arg: str) -> str:
        for old, new in swap.items():
            arg = arg.replace(old, new) if arg.startswith(old) else arg
        return arg

    init, train, chat = ([local(a) for a in c] for c in commands[:3])
    assert cli_main(init) == 0
    config = train[1]
    out_dir = f"{tmp_path}/outputs/demo"
    assert cli_main([*train, f"model.name_or_path={init[init.index('--out') + 1]}", f"output_dir={out_dir}",
                     "training.progress_bar=false", "training.plot_loss=false"]) == 0
    chat[chat.index("--model") + 1] = out_dir
    capsys.readouterr()
    assert cli_main(chat) == 0
    answer = capsys.readouterr().out.strip()
    assert re.search(r"\w", answer), f"{config}: the demo's chat answered {answer!r}"
    for rest in commands[3:]:  # the remaining lines (estimate, --help, --version) run as written
        assert cli_main(rest) == 0, rest


def test_bitsandbytes_cpu_kernel_notice_is_filtered_and_nothing_else(caplog):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward ..." on avx512_bf16 CPUs whenever PEFT imports it
    (every LoRA run); importing tuneforge drops that one message from that one logger."""
    import logging

    cli_main(["--version"])
    cli_main(["--version"])
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    assert len(log.filters) == 1  # main() run twice adds it once


def test_python_users_do_not_see_the_bitsandbytes_notice_either():
    """A script or notebook that imports tuneforge (no CLI) gets the same quiet import of bitsandbytes."""
    def stderr_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr

    if "gemm_4bit_forward" not in stderr_of("import bitsandbytes"):
        pytest.skip("this CPU's bitsandbytes prints no kernel notice")
    assert "gemm_4bit_forward" not in stderr_of("import tuneforge, bitsandbytes")


@pytest.mark.parametrize("logger, notice", [
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than the specified maximum "
                                             "sequence length for this model (9048 > 8192)."),
])
def test_library_notices_that_contradict_what_happens_are_filtered_and_nothing_else(caplog, logger, notice):
    """DeepSpeed's "Setting accelerator to CPU" (every export without a GPU) and transformers' "will result in
    indexing errors" for long rows (TuneForge cuts rows and checks prompts itself): only those go."""
    import logging

    cli_main(["--version"])
    log = logging.getLogger(logger)
    with caplog.at_level(logging.WARNING, logger=logger):
        log.warning(notice)
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == logger] == ["something else"]


def test_data_help_lists_its_sub_verbs(capsys):
    """`tuneforge data --help` is where a user looks for what follows `data`: its usage line and a list name them."""
    from tuneforge.data.curate import SUBVERBS

    assert cli_main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tuneforge data <sub-verb> [options]")
    for name, (_, _, help_) in SUBVERBS.items():
        assert f"  {name:<8} {help_}" in out, name


def _as_torchrun_worker(monkeypatch, tmp_path, local_rank: int):
    """The variables torchrun gives each worker: its error file sits in <attempt folder>/<local rank>/."""
    (tmp_path / str(local_rank)).mkdir(exist_ok=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / str(local_rank) / "error.json"))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")


def test_under_torchrun_a_user_error_every_process_hits_is_printed_once(monkeypatch, tmp_path, capsys):
    from tuneforge.cli import _print_user_error

    _as_torchrun_worker(monkeypatch, tmp_path, 0)
    _print_user_error("data.yaml: row 2 has no `output`.")
    _as_torchrun_worker(monkeypatch, tmp_path, 1)
    _print_user_error("data.yaml: row 2 has no `output`.")
    assert capsys.readouterr().err == "error: data.yaml: row 2 has no `output`.\n"


def test_under_torchrun_an_error_of_one_process_alone_is_still_printed(monkeypatch, tmp_path, capsys):
    from tuneforge.cli import _print_user_error

    _as_torchrun_worker(monkeypatch, tmp_path, 0)
    _print_user_error("rank 0's problem")
    _as_torchrun_worker(monkeypatch, tmp_path, 1)
    _print_user_error("rank 1's own problem")
    assert capsys.readouterr().err == "error: rank 0's problem\nerror (rank 1): rank 1's own problem\n"
    (tmp_path / "tuneforge_error_local_rank0.txt").unlink()  # rank 0 did not fail: nothing to compare with
    _print_user_error("only rank 1 failed", wait_s=0.1)
    assert capsys.readouterr().err == "error (rank 1): only rank 1 failed\n"
