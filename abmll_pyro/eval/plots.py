"""PNG figures: reliability diagrams per method and metric curves for ablations.

Matplotlib is an optional dependency (``pip install abmll-pyro[plots]``), imported only when a plot
is drawn. Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, so
no pyplot global state or interactive backend is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from abmll_pyro.eval.metrics import ReliabilityDiagram

__all__ = ["plot_reliability", "plot_reliability_overlay", "plot_metric_curve", "plot_rank_histograms"]


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


def _bins_of(diagram: ReliabilityDiagram) -> tuple[list[float], list[float], list[float], list[float], list[int]]:
    """``(lefts, widths, accuracies, confidences, counts)`` of the non-empty bins."""
    edges = diagram.edges.tolist()
    full = (diagram.count > 0).tolist()
    keep = [i for i, f in enumerate(full) if f]
    lefts = [edges[i] for i in keep]
    widths = [edges[i + 1] - edges[i] for i in keep]
    return (lefts, widths, [diagram.accuracy.tolist()[i] for i in keep],
            [diagram.confidence.tolist()[i] for i in keep], [int(diagram.count.tolist()[i]) for i in keep])


def _title(name: str, diagram: ReliabilityDiagram, floor: float | None) -> str:
    floor_text = "" if floor is None else f", floor {floor:.3f}"
    return f"{name}  (ECE {diagram.ece:.3f}{floor_text}, n={diagram.n})"


def _check_diagrams(diagrams: Mapping[str, ReliabilityDiagram], floors: Mapping[str, float] | None) -> None:
    if not diagrams:
        raise ValueError("plot_reliability needs at least one diagram, got an empty mapping")
    for name, diagram in diagrams.items():
        if not isinstance(diagram, ReliabilityDiagram):
            raise TypeError(f"method {name!r}: expected ReliabilityDiagram, got {type(diagram).__name__}")
    unknown = sorted(set(floors or {}) - set(diagrams))
    if unknown:
        raise ValueError(f"floors has methods {unknown} not among the diagrams {sorted(diagrams)}")


def plot_reliability(diagrams: Mapping[str, ReliabilityDiagram], path: str | Path,
                     floors: Mapping[str, float] | None = None) -> Path:
    """One panel per method: bars of per-bin accuracy (empty bins left out) with each bin's example
    count written above it, the per-bin mean confidence as points, the diagonal ``accuracy =
    confidence`` of perfect calibration, and in the title the ECE beside its noise floor (``floors``:
    the ECE a perfectly calibrated predictor scores at the same n, where given).

    Returns the written path.
    """
    _check_diagrams(diagrams, floors)
    fig = _figure(4.0 * len(diagrams), 4.4)
    axes = fig.subplots(1, len(diagrams), squeeze=False)[0]
    for ax, (name, diagram) in zip(axes, diagrams.items()):
        lefts, widths, accs, confs, counts = _bins_of(diagram)
        ax.bar(lefts, accs, width=widths, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        centers = [lo + w / 2 for lo, w in zip(lefts, widths)]
        for x, y, c in zip(centers, accs, counts):
            ax.text(x, min(y + 0.02, 0.97), str(c), ha="center", va="bottom", fontsize=6)
        ax.plot(centers, confs, "o", color="tab:red", markersize=4, label="mean confidence")
        ax.plot([0.0, 1.0], [0.0, 1.0], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_aspect("equal")
        ax.set_title(_title(name, diagram, None if floors is None else floors.get(name)), fontsize="small")
        ax.set_xlabel("top-class confidence (numbers: examples per bin)")
        ax.set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability_overlay(diagrams: Mapping[str, ReliabilityDiagram], path: str | Path,
                             floors: Mapping[str, float] | None = None) -> Path:
    """Every method on one plot: per-bin accuracy against per-bin mean confidence (a line per method,
    the legend giving its ECE and floor) above a panel of examples per bin. Returns the written path."""
    _check_diagrams(diagrams, floors)
    fig = _figure(6.0, 7.0)
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.plot([0.0, 1.0], [0.0, 1.0], "--", color="gray", label="perfect calibration")
    width = 1.0 / max(len(diagrams), 1)
    for j, (name, diagram) in enumerate(diagrams.items()):
        lefts, widths, accs, confs, counts = _bins_of(diagram)
        floor = None if floors is None else floors.get(name)
        label = f"{name} (ECE {diagram.ece:.3f}" + ("" if floor is None else f", floor {floor:.3f}") + ")"
        line = top.plot(confs, accs, marker="o", markersize=3, label=label)[0]
        bottom.bar([lo + j * w * width for lo, w in zip(lefts, widths)], counts, width=[w * width for w in widths],
                   align="edge", color=line.get_color())
    top.set_xlim(0.0, 1.0)
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("accuracy in bin")
    top.legend(fontsize="x-small", loc="upper left")
    bottom.set_xlabel("top-class confidence")
    bottom.set_ylabel("examples")
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
    categorical: bool = False,
) -> Path:
    """One line per method of ``ys_by_method[method]`` against ``xs`` (e.g. accuracy vs. ``kl_beta``),
    with symmetric error bars ``yerr[method]`` where given; ``yscale`` as matplotlib's (``"log"``,
    ``"symlog"``). ``categorical``: the xs are labels (shots 0, 1, 2, 4, ...), placed evenly with one tick
    each. A linear y axis shows scientific notation once, as a common factor, not on every tick.
    Returns the written path."""
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
    positions = list(range(len(xs))) if categorical else xs
    for name, ys in ys_by_method.items():
        errs = yerr.get(name)
        ax.errorbar(positions, list(ys), yerr=None if errs is None else list(errs), marker="o", capsize=3, label=name)
    if categorical:
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if yscale != "linear":
        ax.set_yscale(yscale)
    else:
        from matplotlib.ticker import ScalarFormatter

        formatter = ScalarFormatter(useMathText=True)
        formatter.set_powerlimits((-3, 4))  # beyond these, one ×10ⁿ factor on the axis
        ax.yaxis.set_major_formatter(formatter)
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
