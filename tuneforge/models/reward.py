"""Reward models: a causal LM's transformer + a scalar head read at each sequence's last real token.

    scorer = load_reward_model("outputs/rm_tiny")                 # a folder written by `stage: rm`
    scorer.score(["<rendered conversation>", ...])                # tensor [N] of rewards, padded batches inside
    scorer.score_ids([[1, 2, 3], [4, 5]])

The folder `stage: rm` writes is a plain Hugging Face sequence classifier (`XForSequenceClassification`, one label),
so `AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)` loads it too and gives the same
scores. Why TuneForge scores with the attention mask rather than through that class's forward: the class finds a
row's last token as the last one that is not the pad token, which is wrong when the pad token is also the token a
text ends with (Llama 3 fine-tunes end every turn with the eos token they also pad with). The folder's pad token is
chosen so that both ways agree (`pick_pad_token`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.losses import last_token_index


def transformer_of(model) -> torch.nn.Module:
    """The decoder stack under a causal LM (or a PEFT model around one): it returns hidden states, not logits."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def pooled_scores(transformer, score: torch.nn.Linear, input_ids, attention_mask=None, position_ids=None,
                  sequence_ids=None) -> torch.Tensor:
    """One scalar per sequence: the head applied to the hidden state of its last real token. Padded rows
    (`attention_mask`), or one padding-free row (`position_ids`, `sequence_ids`: training/padding_free.py)."""
    hidden = transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
    if sequence_ids is None:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    else:  # each sequence ends where the next begins
        last = hidden[0, torch.bincount(sequence_ids[0]).cumsum(0) - 1]
    # a fresh tensor, not a view of the head's output: FSDP warns once per rank about a module returning a view
    return score(last.to(score.weight.dtype))[:, 0].float().contiguous().clone()


class RewardModel(torch.nn.Module):
    """What `stage: rm` trains: the (method-prepared) causal LM, used for its hidden states only, plus `score`."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        peft_config = getattr(lm, "active_peft_config", None)
        if peft_config is not None and peft_config.is_prompt_learning:
            raise UserError("Stage rm reads the transformer's hidden states directly; prompt-learning methods "
                            "(prompt/prefix/p-tuning) add virtual tokens that way would skip. Use lora or full.")
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.score = torch.nn.Linear(hidden, 1, bias=False, device=next(lm.parameters()).device)
        torch.nn.init.normal_(self.score.weight, std=1 / (hidden + 1) ** 0.5)  # as TRL's reward trainer starts

    @property
    def base_model(self) -> torch.nn.Module:
        """The decoder stack, as transformers' task models name it: where the loop's padding-free (varlen) hook and
        its FlashAttention check look (training/padding_free.py `decoder_of`)."""
        return transformer_of(self.lm)

    def forward(self, input_ids, attention_mask=None, position_ids=None, sequence_ids=None):
        return pooled_scores(self.base_model, self.score, input_ids, attention_mask, position_ids, sequence_ids)


def pick_pad_token(tokenizer, last_ids: set[int]) -> int | None:
    """A pad token id that is none of `last_ids` (the tokens texts end with), so the sequence-classification
    forward of transformers (last token that is not pad) finds the same token as the attention mask: the
    tokenizer's own pad token when it qualifies, else its first special token that does. None if none does."""
    candidates = [tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.all_special_ids]
    return next((i for i in candidates if i is not None and i not in last_ids), None)


def save_reward_model(transformer, score: torch.nn.Linear, lm_config, tokenizer, out_dir: Path,
                      pad_id: int) -> None:
    """Write `transformer` + `score` as an `XForSequenceClassification` folder with one label, and the tokenizer
    with `pad_id` as its pad token."""
    from transformers import AutoModelForSequenceClassification

    config = lm_config.__class__.from_dict(lm_config.to_dict())
    config.num_labels, config.pad_token_id = 1, pad_id
    config.architectures = [lm_config.architectures[0].replace("ForCausalLM", "ForSequenceClassification")]
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    dtype = next(transformer.parameters()).dtype
    model.to_empty(device="cpu").to(dtype)
    model.base_model.load_state_dict({k: v.detach().cpu() for k, v in transformer.state_dict().items()})
    with torch.no_grad():
        model.score.weight.copy_(score.weight.detach().cpu().to(dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    tokenizer.save_pretrained(out_dir)


class RewardScorer:
    """Scores texts or token ids with a reward-model folder (see the module docstring)."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device

    def score(self, texts: list[str]) -> torch.Tensor:
        """Rewards of rendered texts (chat-template output: its special tokens are spelled in the text)."""
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return self.score_ids(ids)

    @torch.no_grad()
    def score_ids(self, ids: list[list[int]]) -> torch.Tensor:
        out = []
        pad = self.model.config.pad_token_id or 0
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=self.device)
            out.append(pooled_scores(self.model.base_model, self.model.score, input_ids, mask).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_reward_model(folder: str | Path, device: str = "cpu", batch_size: int = 8) -> RewardScorer:
    """A `RewardScorer` for a folder written by `stage: rm`; a clear error for any other kind of folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_folder(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).to(device)
    return RewardScorer(model, AutoTokenizer.from_pretrained(folder), batch_size)


GENERATORS = ("ForCausalLM", "ForConditionalGeneration")  # architectures that generate text


def check_reward_folder(folder: str | Path) -> None:
    """UserError unless `folder` holds a reward model (a sequence classifier with one output), saying what it holds
    instead; reads config files only, so PPO checks its rewards in a second, before any model loads."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} is not a reward-model folder: it has no config.json. {_adapter_hint(folder)}")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if not arch.endswith("ForSequenceClassification"):
        what = ("a model that generates text and cannot score replies" if arch.endswith(GENERATORS)
                else "not a sequence classifier")
        raise UserError(f"{folder} is not a reward model: it holds a {arch}{_made_by(folder)}, {what}. A reward model is the output folder of a "
                        f"`stage: rm` run (an XForSequenceClassification with 1 output); train one on preference "
                        f"pairs, starting from this model if you like (`model.name_or_path: {folder}`).")
    n_labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if n_labels != 1:
        raise UserError(f"{folder} is not a reward model: it holds a {arch} classifier with {n_labels} outputs; a "
                        f"reward model gives one score (1 output). Train one with `stage: rm`.")


def _adapter_hint(folder: Path) -> str:
    """What to pass instead of a folder without config.json."""
    if folder.name.startswith("checkpoint-") and (folder / "trainer_state.json").is_file():
        done = (folder.parent / "config.json").is_file()
        return (f"It is a training checkpoint (what `training.resume` continues from, not a model): pass the run's "
                f"output folder {folder.parent}" + (" instead." if done else ", once that run has finished (its "
                                                    "final model is written there; `training.resume=auto` continues "
                                                    "it)."))
    if not (folder / "adapter_config.json").is_file():
        return "Train a reward model with `stage: rm` and pass its output folder."
    parent = folder.parent / "config.json"
    if folder.name == "adapter" and parent.is_file() and "ForSequenceClassification" in parent.read_text("utf-8"):
        return (f"It is the adapter that `stage: rm` keeps beside its merged reward model: pass the run's output "
                f"folder {folder.parent} instead.")
    return (f"It holds an adapter{_made_by(folder)} (adapter_config.json), which generates text and cannot score "
            f"replies: a reward model is the output folder of a `stage: rm` run. Train one with `stage: rm` on "
            f"preference pairs and pass that run's output folder.")


def _made_by(folder: Path) -> str:
    """The words " written by a `stage: sft` run" when the folder's tuneforge_config.yaml says so, else ''."""
    import yaml

    try:
        stage = yaml.safe_load((folder / "tuneforge_config.yaml").read_text(encoding="utf-8")).get("stage")
    except Exception:  # noqa: BLE001 - no record, or not ours: the message just says less
        return ""
    return f" written by a `stage: {stage}` run" if isinstance(stage, str) else ""
