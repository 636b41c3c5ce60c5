"""User-facing errors.

A `UserError` is a mistake in the user's input (a config key, a data row, a path). The CLI prints its message as one
paragraph and exits with status 2, without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib


class UserError(Exception):
    """A problem the user can fix; the message names the file/key/row and the fix."""


class ConfigError(UserError):
    """A bad config key, type or combination."""


class DataError(UserError):
    """Bad rows or unreadable data files."""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 prompt`, `2 prompts`: a count with its noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def cannot_write(path, err: OSError, what: str = "") -> UserError:
    """The error for a folder or file at `path` that could not be created (`err`): the file that stands where a
    folder must be, else the system's reason, and the fix. One wording for every verb that writes."""
    from pathlib import Path

    path = Path(path)
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a folder" if blocker else (err.strerror or str(err)).lower()
    return UserError(f"Cannot write {what + ' ' if what else ''}{path}: {why}. Pick a path you can write to.")


def close_name_near(path, base_dirs=(), folders_only: bool = False) -> str:
    """' Did you mean `d/train.jsonl`?' for a missing `path` whose folder (from the current folder, or from each of
    `base_dirs` for a relative path) holds an entry of a close name (a typo, a wrong extension); else ''."""
    from pathlib import Path

    wanted = Path(path).expanduser()
    roots = [Path(".")] + ([Path(b) for b in base_dirs if b] if not wanted.is_absolute() else [])
    for folder in (root / wanted.parent for root in roots):
        if not folder.is_dir():
            continue
        names = [p.name for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() or not folders_only)]
        match = difflib.get_close_matches(wanted.name, names, n=1, cutoff=0.75)
        if match:
            return f" Did you mean `{folder / match[0] if str(folder) != '.' else match[0]}`?"
    return ""


def closest(name: str, candidates, n: int = 1) -> str | None:
    """The closest valid spelling of `name` among `candidates`, or None. A candidate that is a whole word of `name`
    (`lr` for `lr_rate`, `rank` for `lora_rank`) wins over one that is merely similar letter by letter."""
    candidates = list(candidates)
    words = set(name.lower().replace("-", "_").split("_"))
    whole = [c for c in candidates if len(c) >= 2 and c.lower() in words]
    if whole:
        return max(whole, key=len)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(name: str, candidates, list_choices: bool = True) -> str:
    """' Did you mean `x`?' or, when nothing is close, a list of valid names (or nothing, with `list_choices=False`,
    for messages that list the choices themselves)."""
    candidates = sorted(candidates)
    match = closest(name, candidates)
    if match:
        return f" Did you mean `{match}`?"
    if not list_choices:
        return ""
    shown = ", ".join(candidates[:25]) + (" ..." if len(candidates) > 25 else "")
    return f" Valid names: {shown}."


class ArgParser(argparse.ArgumentParser):
    """argparse's parser with a shorter error: the line that went wrong, the flag a misspelt one meant, and where
    the option list is (argparse printed the whole usage block first: dozens of lines for `data synth`)."""

    def error(self, message: str):
        hints = []
        if message.startswith("unrecognized arguments:"):
            known = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
            for flag in (a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("--")):
                match = closest(flag, known)
                hints += [f"`{flag}`: did you mean `{match}`?"] if match else []
        if "-h/--help: ignored explicit argument" in message:  # `-help`: argparse read it as -h with value `elp`
            typed = "-h" + message.rsplit(" ", 1)[-1].strip("'")
            message, hints = f"`{typed}` is not an option", ["For the help, write `--help` (two dashes) or `-h`."]
        hint = (" " + " ".join(hints)) if hints else ""
        self.exit(2, f"{self.prog}: error: {message}.{hint} (`{self.prog} --help` lists every option)\n")
