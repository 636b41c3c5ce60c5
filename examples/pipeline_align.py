"""The alignment pipeline end to end: SFT, then a reward model and PPO against it, and DPO beside them.

    tuneforge init-model tiny-qwen2 --out runs/tiny-qwen2 && python examples/pipeline_align.py [OUT] [key=value ...]

Every stage starts from the SFT model (trained with method full, so it is a plain model folder the next stages load
as `model.name_or_path`): sft -> rm -> ppo (reward: the rm folder) and sft -> dpo. Extra key=value overrides apply to
every stage (e.g. training.max_steps=2 for a quick run; a test runs it so in the default suite), except
`model.name_or_path=M`, the model SFT starts from (default runs/tiny-qwen2), and `output_dir=D`, the same as OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.configs.schema import load_train_config
from tuneforge.train import run_config

EXAMPLES = Path(__file__).resolve().parent


def run_pipeline(out: str | Path = "outputs/pipeline_align", model: str = "runs/tiny-qwen2",
                 overrides: list[str] | None = None, log=print) -> dict[str, Path]:
    out, extra, folders = Path(out), list(overrides or []), {}

    def stage(name: str, example: str, base_model: str, *more: str) -> Path:
        folders[name] = out / name
        cfg = load_train_config(str(EXAMPLES / example), [f"model.name_or_path={base_model}",
                                                          f"output_dir={folders[name]}", *more, *extra])
        log(f"== {name}: tuneforge train examples/{example} ({cfg.method}) -> {folders[name]}")
        result = run_config(cfg, log=log)
        if not result.finished:
            raise SystemExit(f"stage {name} stopped early; see {folders[name]}")
        return folders[name]

    sft = str(stage("sft", "sft_lora_tiny.yaml", model, "method=full", "training.lr=1e-3"))
    rm = stage("rm", "rm_tiny.yaml", sft)
    stage("ppo", "ppo_rm_tiny.yaml", sft, f"ppo.reward={{{rm}: 1.0}}")
    stage("dpo", "dpo_tiny.yaml", sft)
    return folders


def main(args: list[str]) -> int:
    """The command line: OUT and key=value overrides. `model.name_or_path=M` is the model the pipeline starts from
    and `output_dir=D` is OUT: applied to every stage they would replace the SFT model the later stages start from
    (or put all four runs in one folder). A user mistake is one paragraph, as `tuneforge train` prints it."""
    from tuneforge.errors import UserError

    positional = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    model = [a.partition("=")[2] for a in overrides if a.startswith("model.name_or_path=")]
    out = [a.partition("=")[2] for a in overrides if a.startswith("output_dir=")] + positional
    overrides = [a for a in overrides if not a.startswith(("model.name_or_path=", "output_dir="))]
    try:
        run_pipeline(out[-1] if out else "outputs/pipeline_align", *(model[-1:]), overrides=overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
