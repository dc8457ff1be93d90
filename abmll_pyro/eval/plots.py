"""PNG figures: reliability diagrams per method and metric curves for ablations.

Matplotlib is an optional dependency (``pip install abmll-pyro[plots]``), imported only when a plot
is drawn. Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, so
no pyplot global state or interactive backend is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from abmll_pyro.eval.metrics import ReliabilityDiagram

__all__ = ["plot_reliability", "plot_metric_curve", "plot_rank_histograms"]


def _figure(width: float, height: float):
    """A new Agg-backed ``Figure``; raises ``ImportError`` with the install hint if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plotting needs matplotlib, which is not installed; "
            "install it with `pip install 'abmll-pyro[plots]'` or `pip install matplotlib`"
        ) from err
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_reliability(diagrams: Mapping[str, ReliabilityDiagram], path: str | Path) -> Path:
    """One panel per method: bars of per-bin accuracy (empty bins left out), the per-bin mean
    confidence as points, and the diagonal ``accuracy = confidence`` of perfect calibration.

    Returns the written path.
    """
    if not diagrams:
        raise ValueError("plot_reliability needs at least one diagram, got an empty mapping")
    for name, diagram in diagrams.items():
        if not isinstance(diagram, ReliabilityDiagram):
            raise TypeError(f"method {name!r}: expected ReliabilityDiagram, got {type(diagram).__name__}")
    fig = _figure(4.0 * len(diagrams), 4.2)
    axes = fig.subplots(1, len(diagrams), squeeze=False)[0]
    for ax, (name, diagram) in zip(axes, diagrams.items()):
        edges = diagram.edges.tolist()
        full = (diagram.count > 0).tolist()
        lefts = [lo for lo, keep in zip(edges[:-1], full) if keep]
        widths = [hi - lo for lo, hi, keep in zip(edges[:-1], edges[1:], full) if keep]
        accs = [a for a, keep in zip(diagram.accuracy.tolist(), full) if keep]
        confs = [c for c, keep in zip(diagram.confidence.tolist(), full) if keep]
        ax.bar(lefts, accs, width=widths, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        centers = [lo + w / 2 for lo, w in zip(lefts, widths)]
        ax.plot(centers, confs, "o", color="tab:red", markersize=4, label="mean confidence")
        ax.plot([0.0, 1.0], [0.0, 1.0], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_aspect("equal")
        ax.set_title(f"{name}  (ECE {diagram.ece:.3f}, n={diagram.n})")
        ax.set_xlabel("top-class confidence")
        ax.set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_metric_curve(
    xs: Sequence[float],
    ys_by_method: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    path: str | Path,
    yerr: Mapping[str, Sequence[float]] | None = None,
    yscale: str = "linear",
) -> Path:
    """One line per method of ``ys_by_method[method]`` against ``xs`` (e.g. accuracy vs. ``kl_beta``),
    with symmetric error bars ``yerr[method]`` where given; ``yscale`` as matplotlib's (``"log"``,
    ``"symlog"``). Returns the written path."""
    xs = list(xs)
    if not xs:
        raise ValueError("plot_metric_curve needs at least one x value, got none")
    if not ys_by_method:
        raise ValueError("plot_metric_curve needs at least one method, got an empty mapping")
    for name, ys in ys_by_method.items():
        if len(ys) != len(xs):
            raise ValueError(f"method {name!r} has {len(ys)} y values for {len(xs)} x values")
    yerr = dict(yerr or {})
    unknown = sorted(set(yerr) - set(ys_by_method))
    if unknown:
        raise ValueError(f"yerr has methods {unknown} not in ys_by_method {sorted(ys_by_method)}")
    for name, errs in yerr.items():
        if len(errs) != len(xs):
            raise ValueError(f"yerr of method {name!r} has {len(errs)} values for {len(xs)} x values")
    fig = _figure(5.5, 4.0)
    ax = fig.subplots()
    for name, ys in ys_by_method.items():
        errs = yerr.get(name)
        ax.errorbar(xs, list(ys), yerr=None if errs is None else list(errs), marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if yscale != "linear":
        ax.set_yscale(yscale)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_rank_histograms(histograms: Mapping[str, Sequence[int]], path: str | Path) -> Path:
    """One bar chart per entry (simulation-based calibration: counts of the truth's rank per bin),
    with the count a uniform rank would give as a dashed line."""
    fig = _figure(3.2 * max(len(histograms), 1), 3.0)
    for i, (name, counts) in enumerate(histograms.items()):
        ax = fig.add_subplot(1, len(histograms), i + 1)
        ax.bar(range(len(counts)), counts, color="tab:blue")
        ax.axhline(sum(counts) / len(counts), color="k", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("rank bin")
    fig.tight_layout()
    return _save(fig, path)
