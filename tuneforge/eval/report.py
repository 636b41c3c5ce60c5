"""results.json, report.md and report.html: models side by side, deltas against the baseline, bar charts.

    write_reports(out_dir, results, baseline="base", notes=["MMLU: 5-shot, no chat template"])

`results` is {model: {task: {metric: value}}}. The main table holds each task's headline metrics (names without a
"/"); per-subject, per-category and per-category-of-prompt values follow in a details table. The HTML embeds its
charts as base64 PNG so the one file can be mailed or attached to a run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

SKIP = {"questions", "examples", "prompts", "tokens", "shots", "chat_template", "pairs", "wins", "ties",
        "losses"}  # counts and settings (the rates show the counts)


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _rows(results: dict, detail: bool) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for tasks in results.values():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if (number or value is None) and metric not in SKIP:  # None: no rate could be made ("-")
                    if ("/" in metric) == detail:
                        seen[(task, metric)] = None
    # a task's rows together, in task order: the judge's rates are added after every model ran, and the baseline
    # has none, so first-seen order put them after every later task's rows
    order = list(dict.fromkeys(task for task, _ in seen))
    return sorted(seen, key=lambda row: order.index(row[0]))


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def table(results: dict, baseline: str | None, detail: bool = False) -> list[list[str]]:
    """Header + rows: task, metric, each model's value, and each other model's delta against the baseline."""
    models = list(results)
    others = [m for m in models if m != baseline] if baseline in results else []
    out = [["task", "metric", *models, *[f"{m} - {baseline}" for m in others]]]
    for task, metric in _rows(results, detail):
        values = [results[m].get(task, {}).get(metric) for m in models]
        base = results.get(baseline, {}).get(task, {}).get(metric) if others else None
        deltas = []
        for m in others:
            v = results[m].get(task, {}).get(metric)
            counts = isinstance(v, int) and isinstance(base, int)
            deltas.append("-" if v is None or base is None else f"{v - base:+d}" if counts else f"{v - base:+.4f}")
        out.append([task, metric, *[_fmt(v) for v in values], *deltas])
    return out


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def chart_png(results: dict, task: str) -> bytes | None:
    """One grouped bar chart of a task's headline metrics, models side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for t, m in _rows(results, False) if t == task]
    if not metrics:
        return None
    models = list(results)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(metrics) * len(models)), 3))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        # no value (the baseline's own win_rate, a rate no reply could make) is no bar, not a bar at 0
        values = [_number(results[model].get(task, {}).get(m)) for m in metrics]
        ax.bar([x + i * width for x in range(len(metrics))], values, width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(metrics))], metrics)
    ax.set_title(task)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table border=1 cellspacing=0 cellpadding=4><tr>{head}</tr>{body}</table>"


def write_results(out_dir, results: dict) -> Path:
    path = Path(out_dir) / "results.json"
    atomic_write(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return path


def write_reports(out_dir, results: dict, baseline: str | None, notes: list[str]) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"json": write_results(out, results), "md": out / "report.md", "html": out / "report.html"}
    main, details = table(results, baseline), table(results, baseline, detail=True)
    tasks = list(dict.fromkeys(t for t, _ in _rows(results, False)))
    charts = {t: chart_png(results, t) for t in tasks}
    md = ["# Evaluation report", "", *[f"- {n}" for n in notes], "", markdown_table(main), ""]
    page = ["<html><head><meta charset='utf-8'><title>TuneForge evaluation</title></head><body>",
            "<h1>Evaluation report</h1><ul>", *[f"<li>{html.escape(n)}</li>" for n in notes], "</ul>",
            _html_table(main)]
    for task, png in charts.items():
        if png is None:
            continue
        name = "chart-" + "".join(c if c.isalnum() else "_" for c in task) + ".png"
        atomic_write(out / "charts" / name, png)
        md.append(f"![{task}](charts/{name})")
        page.append(f"<h3>{html.escape(task)}</h3><img src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    if len(details) > 1:
        md += ["", "## Details", "", markdown_table(details)]
        page += ["<h2>Details</h2>", _html_table(details)]
    atomic_write(paths["md"], "\n".join(md) + "\n")
    atomic_write(paths["html"], "\n".join(page + ["</body></html>"]) + "\n")
    return paths
