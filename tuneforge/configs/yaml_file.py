"""Reading a config YAML file into a mapping, with the mistakes users make reported as one paragraph.

PyYAML's own error is several lines that name `<unicode string>` instead of the file and end at a caret; it also
silently keeps the last of two equal keys (`lr:` written twice), so one of the user's settings is dropped unseen.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tuneforge.errors import ConfigError


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, line: int):
        super().__init__(key, first, line)
        self.key, self.first, self.line = key, first, line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (a `<<: *anchor` merge may still be overridden)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}  # key -> the line it was first written on
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not (key is None or isinstance(key, (str, int, float, bool))):
            continue  # a list or mapping as a key: never one of ours
        if key in seen:  # named as written: `on:` and `yes:` are both the key True to YAML
            raise _DuplicateKey(getattr(key_node, "value", key), seen[key], key_node.start_mark.line + 1)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _syntax_hint(problem: str, context: str) -> str:
    """What to do about the commonest YAML slips, in the user's words rather than the parser's."""
    if "'\\t'" in problem:
        return "YAML indents with spaces only: replace the tab at the start of that line with spaces."
    if "quoted scalar" in context:
        return "A quoted value is not closed: add the closing quote (or drop the opening one)."
    if "mapping values are not allowed" in problem:
        return ("Line that key up with the other keys of its section (same number of spaces), and quote a value "
                "that itself contains `: `.")
    if "expected <block end>" in problem or "could not find expected ':'" in problem:
        return "Check the indentation of that line against the lines above it, and that each key ends with `:`."
    return "Fix that line (keys are `name: value`, nested keys indented with spaces) and run again."


def _yaml_error_text(path: str, err: yaml.YAMLError) -> str:
    problem = (getattr(err, "problem", None) or str(err)).strip()
    context = (getattr(err, "context", None) or "").strip()
    # an unclosed quote is reported at the end of the file; the line where the quote opens is the useful one
    mark = getattr(err, "context_mark", None) if "quoted scalar" in context else None
    mark = mark or getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{path} is not valid YAML{where}: {problem}. {_syntax_hint(problem, context)}"


def read_yaml_mapping(path: str, what: str, example: str) -> dict:
    """The top-level mapping of the YAML file `path` (an empty file gives {}). `what` names the file in messages
    ("Config file"), `example` is a file to copy from. Every problem is a ConfigError naming the file and the fix."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a YAML file. Pass the YAML file itself, e.g. {example}.")
    if not p.is_file():
        raise ConfigError(f"{what} {path} does not exist. Pass a YAML file, e.g. {example}.")
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: a BOM written by Windows editors is not a key character
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8 and run again.") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{path} sets `{e.key}` twice in the same section (lines {e.first} and {e.line}); YAML "
                          f"would keep only the last value. Delete the one you do not want.") from None
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error_text(path, e)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        kind = "a list" if isinstance(loaded, list) else f"a single value ({type(loaded).__name__})"
        raise ConfigError(f"{path} holds {kind} at the top level, but a config is a mapping of `key: value` lines "
                          f"(no leading `- `). See {example}.")
    return loaded
