"""Typed dataclass configs: one source of help text per field, strict parsing, `key=value` overrides.

We parse by hand instead of using pydantic/omegaconf because we need three things together: the field's
`help` metadata drives both `--help` and the web UI; unknown keys get a "did you mean" hint; and errors name the
full dotted key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from tuneforge.errors import ConfigError, did_you_mean

# Extra advice for an unknown key, (section prefix, key) -> " Did you mean ...?" or None; the training config sets
# it to name other tools' keys (foreign.py) while this module stays generic.
_UNKNOWN_KEY_HINT: ContextVar[Callable[[str, str], str | None] | None] = ContextVar("unknown_key_hint", default=None)


@contextmanager
def unknown_key_hints(hint: Callable[[str, str], str | None]) -> Iterator[None]:
    token = _UNKNOWN_KEY_HINT.set(hint)
    try:
        yield
    finally:
        _UNKNOWN_KEY_HINT.reset(token)


def config_error(problems: list[str], where: str = "") -> ConfigError:
    """One ConfigError for all `problems`, so a user fixes every key in one go instead of one per run."""
    problems = list(dict.fromkeys(problems))  # the same problem found twice is listed once
    if len(problems) == 1:
        named = where and not where.startswith("the ") and not problems[0].startswith(where)  # a file name
        err = ConfigError(f"{where}: {problems[0]}" if named else problems[0])
    else:
        where = f" in {where}" if where else ""
        err = ConfigError(f"{len(problems)} problems{where}:\n" + "\n".join(f"- {p}" for p in problems))
    err.problems = problems
    return err


def problems_of(err: ConfigError) -> list[str]:
    """The single problems an error (possibly a collected one) stands for."""
    return list(getattr(err, "problems", None) or [str(err)])


def opt(default: Any = MISSING, help: str = "", *, factory=None) -> Any:  # noqa: A002 - `help` mirrors argparse
    """A config field with its help text (the single source for CLI --help, README tables and the web UI)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def type_name(tp: Any) -> str:
    """A short, human-readable type for help output."""
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp) if a is not type(None)) + " (optional)"
    if origin is list:
        return f"list[{type_name(get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    if is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _resolved_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type, raising ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if _optional_of(tp) is not tp:  # X or nothing: X's own message names the bad key (inside a section too)
            return coerce(value, _optional_of(tp), key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"`{key}` must be {type_name(tp)}, got {value!r}.")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = did_you_mean(str(value), [str(c) for c in choices], list_choices=False)  # they are listed
            raise ConfigError(f"`{key}` must be one of {', '.join(map(str, choices))}; got {value!r}.{hint}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
            raise ConfigError(_unread_list(key, value.strip()))
        if isinstance(value, (str, dict)) and not isinstance(value, list):
            value = [value]  # a single item where a list is expected is a common, unambiguous shorthand
        if not isinstance(value, (list, tuple)):
            empty = f" For none, give the empty list: `{key}: []` (`{key}=[]` on the command line)." \
                if value is None else ""
            raise ConfigError(f"`{key}` must be a list, got {value!r}.{empty}")
        return _coerce_all(((i, v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)), list)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping (key: value), got {value!r}.")
        _, val_tp = get_args(tp) or (str, Any)
        return _coerce_all(((str(k), v, val_tp, f"{key}.{k}") for k, v in value.items()), dict)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and hasattr(tp, "from_str"):
            return tp.from_str(value)
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a section (mapping), got {value!r}.")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"`{key}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads `1e-4` (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"`{key}` must be a number, got {value!r}.")  # nan passes every `> 0` check
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"`{key}` must be a string, got {value!r}.")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _coerce_all(items, container):
    """Coerce (name, value, type, key) items into a list or dict, collecting every item's problems."""
    out, problems = {}, []
    for name, value, tp, key in items:
        try:
            out[name] = coerce(value, tp, key)
        except ConfigError as e:
            problems += problems_of(e)
    if problems:
        raise config_error(problems)
    return list(out.values()) if container is list else out


def unknown_key_message(prefix: str, key: str, valid) -> str:
    full = f"{prefix}.{key}" if prefix else str(key)
    hook = _UNKNOWN_KEY_HINT.get()
    hint = hook(prefix, key) if hook else None
    if hint is None:
        hint = did_you_mean(str(key), valid)
        if prefix and hint.startswith(" Did you mean"):  # name the full dotted key the user can paste
            hint = hint.replace("`", f"`{prefix}.", 1)
    return f"Unknown config key `{full}`.{hint}"


def from_dict(cls, data: dict, prefix: str = "", extra_sections: dict | None = None):
    """Build dataclass `cls` from a mapping, refusing unknown keys with the closest valid one. Every unknown key
    and bad value in the mapping (nested sections included) is reported in one ConfigError."""
    hints = _resolved_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    valid = names | set(extra_sections or {})
    unknown = [unknown_key_message(prefix, key, valid) for key in data if key not in valid]
    try:
        kwargs = _coerce_all(((key, value, hints[key], f"{prefix}.{key}" if prefix else key)
                              for key, value in data.items() if key in names), dict)
        problems = unknown
    except ConfigError as e:
        kwargs, problems = {}, unknown + problems_of(e)
    missing = [f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING
               and f.name not in data]
    problems += [f"Missing required config key `{(prefix + '.' if prefix else '') + name}`." for name in missing]
    if problems:
        raise config_error(problems)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"Invalid section `{prefix or cls.__name__}`: {e}") from e
    return obj


def valid_part(cls, data: dict) -> dict:
    """The keys of `data` that `from_dict(cls, ...)` accepts (known, and values of the right type), nested sections
    pruned the same way: what a config would be with its mistakes left out."""
    hints = _resolved_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    kept = {}
    for key, value in data.items():
        if key not in names:
            continue
        section = _optional_of(hints[key])
        if is_dataclass(section) and isinstance(value, dict):
            kept[key] = valid_part(section, value)
            continue
        try:
            coerce(value, hints[key], key)
        except ConfigError:
            continue
        kept[key] = value
    return kept


def _optional_of(tp: Any) -> Any:
    """X for `X | None`, else the type itself."""
    options = [arg for arg in get_args(tp) if arg is not type(None)]
    return options[0] if get_origin(tp) in (Union, types.UnionType) and len(options) == 1 else tp


def to_dict(obj) -> Any:
    """A plain-data view of a config (for YAML dumps)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# flags users bring from other tools, and the override that does what they meant
FLAG_HABITS = {"resume": "training.resume=auto", "resume_from_checkpoint": "training.resume=auto",
               "output_dir": "output_dir=runs/x", "overwrite_output_dir": "overwrite_output_dir=true",
               "max_steps": "training.max_steps=100", "learning_rate": "training.lr=1e-4"}


def _unread_list(key: str, text: str) -> str:
    """`freeze.trainable_modules=[*.mlp.*]` is not YAML (`*` starts an alias), so it arrived as the text; taken as one
    item, the glob `[*.mlp.*]` (any one of those characters) matched every parameter and freeze trained the whole
    model without a word."""
    items = ", ".join(f"'{item.strip()}'" for item in text[1:-1].split(",") if item.strip())
    return (f"`{key}` is the text `{text}`, not a list: YAML could not read it as one (a bare `*`, `&` or `:` is "
            f"YAML syntax), or it was quoted as a whole. Quote the items and, on the command line, the whole "
            f"argument: \"{key}=[{items}]\"; in a YAML file write them as a list.")


def _no_equals_error(item: str) -> ConfigError:
    """Why `item` (an override without `=`) is not one, in the words of the habit that most likely produced it."""
    if item.lstrip("-") == "help":
        return ConfigError("`help` is not an override: `--help` after the verb lists the options and every config "
                           "key, e.g. `tuneforge train --help`.")
    if item.startswith("-"):  # a Trainer / LLaMA-Factory habit: `--resume`, `--output_dir runs/x`
        name = item.lstrip("-").replace("-", "_")
        example = FLAG_HABITS.get(name, f"{name}=VALUE")
        return ConfigError(f"`{item}` is a command-line flag; overrides are config keys written key=value after "
                           f"the config file, e.g. `{example}`.")
    if item.endswith((".yaml", ".yml")):  # `tuneforge train a.yaml b.yaml`: configs do not stack
        return ConfigError(f"`{item}` looks like a second config file, but one config file is read: merge the "
                           f"two into one file, or give its keys as key=value overrides after the first.")
    if ":" in item:  # YAML's `key: value` typed on the command line
        key, value = (part.strip() for part in item.split(":", 1))
        return ConfigError(f"Override `{item}` has no `=`: on the command line write `{key}={value or 'VALUE'}`.")
    return ConfigError(f"Override `{item}` has no `=`: overrides are written key=value after the config file, "
                       f"e.g. `{item}=VALUE`.")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3). The value is read as YAML so lists, numbers and booleans work."""
    if "=" not in item:
        raise _no_equals_error(item)
    key, raw = item.split("=", 1)
    if key.startswith("-"):  # `--training.lr=1e-4`: a flag's dashes on a config key
        raise ConfigError(f"`{item}`: overrides are config keys without dashes: write `{key.lstrip('-')}={raw}`.")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _check_no_spaces_around_equals(overrides: list[str]) -> None:
    """`training.lr = 1e-4` reaches us as three arguments (the shell splits at spaces): name the joined form
    rather than complain that `training.lr` has no `=`."""
    for i, item in enumerate(overrides[:-1]):
        after = overrides[i + 1]
        spaced_before = "=" not in item and after.startswith("=")
        spaced_after = item.endswith("=") and "=" not in after
        if spaced_before or spaced_after:
            rest = overrides[i + 2] if spaced_before and after == "=" and i + 2 < len(overrides) else ""
            joined = (item + after + rest).replace(" ", "")
            raise ConfigError(f"Override `{' '.join(overrides[i:i + (3 if rest else 2)])}`: no spaces around `=` "
                              f"(the shell splits the argument there). Write `{joined}`.")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    _check_no_spaces_around_equals(overrides)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for depth, part in enumerate(path[:-1], start=1):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                key = ".".join(path[:depth])
                raise ConfigError(f"Override `{item}`: `{key}` is a single value, not a section with keys under "
                                  f"it. Set it as `{key}=VALUE`, or check the key's spelling in `--help`.")
            node = nxt
        node[path[-1]] = value
    return data


def field_help_rows(cls, prefix: str = ""):
    """(dotted key, type, default, help) for every field, recursing into sections."""
    hints = _resolved_hints(cls)
    for f in fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if is_dataclass(tp):
            yield from field_help_rows(tp, prefix=key + ".")
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        yield key, type_name(tp), default, help_of(f)
