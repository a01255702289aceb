"""PNG plots beside the report tables: each metric against the missing rate, and the seven fixed
conditions as bars. Titles carry the data source; axes carry units; published values are drawn
where they exist (dashed line or black marker)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dataloader.atomic import write_atomic  # noqa: E402
from dataloader.datasets import get_spec  # noqa: E402
from MoMKE.results.rows import (METRIC_NAMES, PERCENT_METRICS, Row, cell,  # noqa: E402
                                published_value, router_table, variant)
from MoMKE.selection import RULE_LABELS, RULES  # noqa: E402

RULE_STYLE = {"best_test": "tab:red", "best_val": "tab:blue", "last": "tab:gray"}


def _save(figure: plt.Figure, path: Path) -> None:
    """The PNG through memory and an atomic write: a full disk leaves no half image."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_atomic(path, buffer.getbuffer())


def _unit(metric: str) -> str:
    return f"{METRIC_NAMES[metric]} (%)" if metric in PERCENT_METRICS else f"{METRIC_NAMES[metric]}"


def _title(dataset: str, source: str, what: str) -> str:
    data = "SYNTHETIC data, not comparable with the paper" if source == "synthetic" else "real data"
    return f"{dataset} ({data})\n{what}"


def plot_group(key: tuple[str, str, str], results: list[dict], rows: list[Row], out: Path,
               prefix: str) -> list[Path]:
    dataset, source, _ = key
    written = []
    routers = router_table([r for r in results if variant(r) == "MoMKE"])
    if routers:
        written.append(_router_heatmap(dataset, source, routers, out / f"{prefix}_router.png"))
    rate_rows = [r for r in rows if r.protocol == "random" and r.key is not None]
    if len(rate_rows) > 1:
        for metric in get_spec(dataset).metrics:
            written.append(_rate_plot(dataset, source, rate_rows, metric, out / f"{prefix}_rate_{metric}.png"))
    fixed_rows = [r for r in rows if r.protocol == "fixed" and r.key is not None]
    if fixed_rows:
        written.append(_condition_plot(dataset, source, fixed_rows, out / f"{prefix}_conditions.png"))
    return written


def _rate_plot(dataset: str, source: str, rows: list[Row], metric: str, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    rates = [float(r.key) for r in rows]
    for rule in RULES:
        values = [cell(r, rule, metric) for r in rows]
        if all(v is None for v in values):
            continue
        mean = np.array([v[0] if v else np.nan for v in values])
        std = np.array([v[1] if v else np.nan for v in values])
        axis.errorbar(rates, mean, yerr=std, marker="o", capsize=3, color=RULE_STYLE[rule],
                      label=RULE_LABELS[rule])
    refs = [(float(r.key), published_value(dataset, r, metric)) for r in rows]
    refs = [(x, p) for x, p in refs if p is not None]
    if refs:
        axis.plot([x for x, _ in refs], [p.value for _, p in refs], "k--", marker="s",
                  label=f"published MoMKE [{refs[0][1].source}]")
    axis.set_xlabel("missing rate (fraction of missing modality entries)")
    axis.set_ylabel(_unit(metric))
    axis.set_title(_title(dataset, source, f"{METRIC_NAMES[metric]} vs missing rate"), fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    _save(figure, path)
    return path


def _condition_plot(dataset: str, source: str, rows: list[Row], path: Path) -> Path:
    metrics = [m for m in get_spec(dataset).metrics if m in PERCENT_METRICS][:2]
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    labels = [r.label for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(RULES)
    for axis, metric in zip(axes[0], metrics):
        for k, rule in enumerate(RULES):
            values = [cell(r, rule, metric) for r in rows]
            if all(v is None for v in values):
                continue
            axis.bar(x + (k - 1) * width, [v[0] if v else 0 for v in values], width,
                     yerr=[v[1] if v else 0 for v in values], color=RULE_STYLE[rule],
                     label=RULE_LABELS[rule], capsize=2)
        refs = [(i, published_value(dataset, r, metric)) for i, r in enumerate(rows)]
        refs = [(i, p) for i, p in refs if p is not None]
        if refs:
            axis.scatter([i for i, _ in refs], [p.value for _, p in refs], color="black",
                         marker="_", s=300, zorder=3, label=f"published [{refs[0][1].source}]")
        shown = [v[0] for r in rows for rule in RULES if (v := cell(r, rule, metric))]
        shown += [p.value for _, p in refs]
        axis.set_ylim(max(0.0, min(shown) - 10), min(100.0, max(shown) + 5))  # bars cut below
        axis.set_xticks(x, labels)
        axis.set_xlabel("available modalities (fixed test condition)")
        axis.set_ylabel(_unit(metric))
        axis.set_title(_title(dataset, source, METRIC_NAMES[metric]), fontsize=9)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    _save(figure, path)
    return path


def _router_heatmap(dataset: str, source: str, routers: dict, path: Path) -> Path:
    labels = [f"{c}: {m}" for c, by_m in routers.items() for m in by_m]
    weights = np.array([w for by_m in routers.values() for w in by_m.values()])
    figure, axis = plt.subplots(figsize=(4.5, 0.35 * len(labels) + 1.5))
    image = axis.imshow(weights, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(weights):
        axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if value < 0.6 else "black")
    axis.set_xticks(range(3), ["expert a", "expert t", "expert v"])
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.set_ylabel("condition: modality whose router it is")
    axis.set_title(_title(dataset, source, "mean router weights (test, last epoch)"), fontsize=8)
    figure.colorbar(image, ax=axis, label="weight (fraction)")
    figure.tight_layout()
    _save(figure, path)
    return path


def heatmap_png(dataset: str, source: str, what: str, values: np.ndarray, rows: list[str],
                columns: list[str], outlined: list[tuple[int, int]], path: Path) -> Path:
    """A matrix of percentages as a heatmap with its values written in, the cells of
    `outlined` (row, column) boxed, and empty cells (NaN) left blank."""
    figure, axis = plt.subplots(figsize=(0.75 * len(columns) + 2.5, 0.4 * len(rows) + 1.8))
    image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    middle = np.nanmean(values) if np.isfinite(values).any() else 0.0
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            axis.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                      color="white" if value < middle else "black")
    for i, j in outlined:
        axis.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red",
                                     linewidth=1.5))
    axis.set_xticks(range(len(columns)), columns, fontsize=7, rotation=45, ha="right")
    axis.set_yticks(range(len(rows)), rows, fontsize=7)
    axis.set_xlabel("evaluated on")
    axis.set_ylabel("trained on")
    axis.set_title(_title(dataset, source, what + " (red: own setting)"), fontsize=8)
    figure.colorbar(image, ax=axis, label="%")
    figure.tight_layout()
    _save(figure, path)
    return path
