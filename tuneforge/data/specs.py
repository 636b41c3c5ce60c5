"""Checks of the dataset specs and `data.mix` themselves, before any file is read: a mistyped spec is a config
mistake, reported with its key and the fix together with the config's other mistakes (configs/schema.py asks here),
not later as a puzzling count of bad rows.

    problems = data_config_problems(cfg.data)   # [] when every spec makes sense
"""

from __future__ import annotations

from tuneforge.data.formats import COLUMN_ROLES
from tuneforge.errors import did_you_mean

ALL_ROLES = tuple(dict.fromkeys(role for roles in COLUMN_ROLES.values() for role in roles))  # format auto


def data_config_problems(data_cfg) -> list[str]:
    """Every problem of `data.train`, `data.eval` and `data.mix`, each naming its key."""
    problems = spec_problems(data_cfg.train, "data.train") + spec_problems(data_cfg.eval, "data.eval")
    return problems + mix_problems(data_cfg.mix)


def check_data_config(data_cfg) -> None:
    from tuneforge.configs.typed import config_error

    problems = data_config_problems(data_cfg)
    if problems:
        raise config_error(problems, where="the data config")


def spec_problems(specs: list, key: str) -> list[str]:
    problems = []
    for i, spec in enumerate(specs):
        where = f"`{key}[{i}]` ({spec.path})"
        if spec.max_samples is not None and spec.max_samples < 1:
            problems.append(f"{where}: `max_samples` must be at least 1; leave it out to read every row (got "
                            f"{spec.max_samples}).")
        problems += [column_role_problem(where, spec.format, role) for role in spec.columns
                     if role not in COLUMN_ROLES.get(spec.format, ALL_ROLES)]
    return problems


def column_role_problem(where: str, fmt: str, role: str) -> str:
    """`columns` maps our role names (keys) to the user's column names (values); a key that is no role is ignored
    by every adapter, so the column the user meant to map would be reported missing on every row."""
    roles = COLUMN_ROLES.get(fmt, ALL_ROLES)
    hint = did_you_mean(role, roles, list_choices=False)
    named = f"format {fmt}" if fmt in COLUMN_ROLES else "the formats (format auto)"
    return (f"{where}: `columns` maps the unknown role `{role}`; the roles of {named} are {', '.join(roles)} "
            f"(keys are these roles, values your column names).{hint}")


def mix_problems(mix) -> list[str]:
    """`data.mix`, checked key by key as `tuneforge data mix` checks its options."""
    from tuneforge.data.curate.mix import STRATEGIES

    if mix is None:
        return []
    problems = []
    if mix.strategy not in STRATEGIES:  # typed configs refuse it earlier; a DataConfig built in code may not
        problems.append(f"`data.mix.strategy` must be one of {', '.join(STRATEGIES)}; got {mix.strategy!r}."
                        + did_you_mean(str(mix.strategy), STRATEGIES, list_choices=False))
    if not mix.T > 0:
        problems.append(f"`data.mix.T` must be > 0 (1 = proportional, larger = closer to equal), got {mix.T}.")
    if mix.K is not None and mix.K < 1:
        problems.append(f"`data.mix.K` must be at least 1 row, got {mix.K}.")
    if mix.size is not None and mix.size < 1:
        problems.append(f"`data.mix.size` must be at least 1; leave it out for every row of every dataset, got "
                        f"{mix.size}.")
    return problems
