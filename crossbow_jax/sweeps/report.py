"""Summaries of a sweep's rows: a markdown table (`<name>.md`) and a plot (`<name>.png`).

A config's `table` is `{"group": [keys...], "figures": [figures...]}`: one table
line per group, each figure as mean ± std over seeds with the count of runs.
Its `plots` is a list of panels, each either

    {"x": key, "y": figure, "series": key, "title": ..., "logx": bool, "where": {...},
     "ylim": (low, high)}

(the mean over seeds with a std error bar, one line per series; with `"cap": c`
a group where no run has the figure is marked by a triangle at c) or

    {"kind": "curve", "series": key, "where": {...}, "title": ...}

(test accuracy of the central model against epochs, one thin line per run).
Its optional `ratios` is a list of matrices, each

    {"figure": f, "split": key, "over": (a, b), "rows": key, "cols": key,
     "where": {...}, "title": ...}

(one cell per (rows, cols) value: the mean of `f` over rows with
`split == a` divided by its mean over rows with `split == b`).
Keys are looked up in a row's labels, then its settings, then its figures;
`where` keeps only the rows whose keys have those values.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

_MISSING = object()


def value(row: dict[str, Any], key: str) -> Any:
    """A row's value for `key`: its labels, then settings, then figures (None if absent)."""
    for part in ("labels", "settings", "figures"):
        got = row.get(part, {}).get(key, _MISSING)
        if got is not _MISSING:
            return got
    return row.get(key)


def select(rows: list[dict[str, Any]], where: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [r for r in rows if all(value(r, k) == v for k, v in (where or {}).items())]


def numbers(rows: list[dict[str, Any]], figure: str) -> list[float]:
    """The numeric values of `figure` over `rows` (runs without it, e.g. unreached, left out)."""
    return [v for r in rows if isinstance(v := value(r, figure), (int, float))]


def groups(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by the values of `keys`, in the order first seen."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(value(row, k) for k in keys), []).append(row)
    return out


def _number(x: float, figure: str) -> str:
    if "accuracy" in figure:
        return f"{x:.4f}"
    if "per_second" in figure:
        return f"{x:,.0f}"
    return f"{x:.2f}" if "epoch" in figure else f"{x:.1f}"


def summarise(rows: list[dict[str, Any]], figure: str) -> str:
    """One table cell: mean ± std (n) of a figure over runs; notes runs that failed it."""
    n = len(rows)
    diverged = sum(value(r, "status") == "diverged" for r in rows)
    found = numbers(rows, figure)
    if not found:
        if diverged:
            return f"diverged ({diverged}/{n})"
        return f"not reached (0/{n})" if "target" in figure else f"not recorded (0/{n})"
    mean = statistics.fmean(found)
    text = _number(mean, figure)
    if len(found) > 1:
        text += f" ± {_number(statistics.stdev(found), figure)}"
    text += f" ({len(found)}/{n})" if len(found) < n or figure.endswith("to_target") else ""
    if diverged:
        text += f", {diverged} diverged"
    return text


def caption(config: dict[str, Any]) -> str:
    """The config's caption, marked when the runs use synthetic data (a check, not a result)."""
    text = config.get("caption", config["name"])
    if config["fixed"].get("dataset") == "synthetic" and config["measure"] == "train":
        text += " [synthetic data: a CI check, not a result]"
    return text


def _order(item: tuple[tuple, Any]) -> tuple:
    """Sorts table groups by their key values: numbers by value, then others as text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in item[0])


def table(config: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The markdown table of a sweep (n = runs, i.e. seeds, in the group), groups sorted."""
    spec = config["table"]
    head = [*spec["group"], "n", *spec["figures"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, members in sorted(groups(rows, spec["group"]).items(), key=_order):
        cells = [str(k) for k in key] + [str(len(members))]
        cells += [summarise(members, f) for f in spec["figures"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratio_matrix(spec: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A markdown matrix of mean(figure | split = a) / mean(figure | split = b) per cell."""
    rows = select(rows, spec.get("where"))
    a, b = spec["over"]
    row_keys = list(groups(rows, [spec["rows"]]))
    col_keys = list(groups(rows, [spec["cols"]]))

    def mean(part: Any, r: Any, c: Any) -> float | None:
        where = {spec["split"]: part, spec["rows"]: r, spec["cols"]: c}
        got = numbers(select(rows, where), spec["figure"])
        return statistics.fmean(got) if got else None

    head = [f"{spec['rows']} \\ {spec['cols']}", *(str(c[0]) for c in col_keys)]
    lines = [f"{spec.get('title', '')}\n", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for (r,) in row_keys:
        cells = []
        for (c,) in col_keys:
            top, bottom = mean(a, r, c), mean(b, r, c)
            cells.append(f"{top / bottom:.2f}" if top is not None and bottom else "")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _panel(ax, spec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    rows = select(rows, spec.get("where"))
    series = spec.get("series")
    if spec.get("kind") == "curve":
        colours: dict[Any, str] = {}
        for row in rows:
            s = value(row, series) if series else ""
            curve = value(row, "curve") or []
            if curve:
                new = s not in colours
                colour = colours.setdefault(s, f"C{len(colours)}")
                xs, ys = zip(*curve, strict=True)
                ax.plot(xs, ys, color=colour, lw=1, alpha=0.8, label=str(s) if new else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy of z")
    else:
        for i, (s, members) in enumerate(groups(rows, [series] if series else []).items()):
            points, missed = [], []
            for x, group in groups(members, [spec["x"]]).items():
                ys = numbers(group, spec["y"])
                if ys:
                    sd = statistics.stdev(ys) if len(ys) > 1 else 0.0
                    points.append((x[0], statistics.fmean(ys), sd))
                else:
                    missed.append(x[0])
            colour = f"C{i}"
            if points:
                xs, ys, sds = zip(*sorted(points), strict=True)
                ax.errorbar(
                    xs,
                    ys,
                    yerr=sds,
                    marker="o",
                    capsize=3,
                    color=colour,
                    label=str(s[0]) if s else None,
                )
            if missed and spec.get("cap") is not None:
                ax.scatter(
                    missed,
                    [spec["cap"]] * len(missed),
                    marker="^",
                    color=colour,
                    label=f"{s[0] if s else ''} not reached by {spec['cap']}",
                )
        ax.set_xlabel(spec["x"])
        ax.set_ylabel(spec.get("ylabel", spec["y"]))
        if spec.get("logx"):
            ax.set_xscale("log", base=2)
    if spec.get("ylim"):
        ax.set_ylim(*spec["ylim"])
    ax.set_title(spec.get("title", ""), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc=spec.get("legend", "best"))


def plot(config: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> Path:
    """Draws the config's panels side by side into a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = config.get("plots", [])
    width = max(7.0, 4.6 * len(panels))  # room for the caption above one panel
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.6), squeeze=False)
    for ax, spec in zip(axes[0], panels, strict=True):
        _panel(ax, spec, rows)
    fig.suptitle(caption(config), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def render(config: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Writes `<out>/<name>.md` (table) and `<out>/<name>.png` (plot); returns their paths."""
    out = Path(out)
    md = out / f"{config['name']}.md"
    matrices = "".join(f"\n{ratio_matrix(spec, rows)}" for spec in config.get("ratios", ()))
    md.write_text(f"# {config['name']}\n\n{caption(config)}\n\n{table(config, rows)}{matrices}")
    written = [md]
    if config.get("plots"):
        written.append(plot(config, rows, out / f"{config['name']}.png"))
    return written
