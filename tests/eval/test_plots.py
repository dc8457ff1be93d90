"""Plots write non-empty PNG files; bad inputs and a missing matplotlib fail loudly."""

import sys

import pytest
import torch

from abmll_pyro.eval import plot_metric_curve, plot_reliability, reliability_diagram

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _diagram(seed: int):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(64, 4, generator=g), dim=1)
    return reliability_diagram(probs, torch.randint(0, 4, (64,), generator=g), num_bins=10)


def test_plot_reliability_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_reliability({"abmll": _diagram(0), "map": _diagram(1)}, tmp_path / "sub" / "rel.png")
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_metric_curve_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_metric_curve(
        [0.0, 0.1, 1.0],
        {"abmll": [0.6, 0.65, 0.62], "map": [0.55, 0.55, 0.55]},
        xlabel="kl_beta",
        ylabel="accuracy",
        path=tmp_path / "curve.png",
        yerr={"abmll": [0.01, 0.02, 0.01]},
    )
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_input_errors(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="empty"):
        plot_reliability({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="'m'.*ReliabilityDiagram"):
        plot_reliability({"m": 0.1}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'m' has 2 y values for 3 x values"):
        plot_metric_curve([1, 2, 3], {"m": [1, 2]}, "x", "y", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\['z'\] not in"):
        plot_metric_curve([1, 2], {"m": [1, 2]}, "x", "y", tmp_path / "x.png", yerr={"z": [0, 0]})
    with pytest.raises(ValueError, match="yerr of method 'm' has 1"):
        plot_metric_curve([1, 2], {"m": [1, 2]}, "x", "y", tmp_path / "x.png", yerr={"m": [0]})
    with pytest.raises(ValueError, match="at least one method"):
        plot_metric_curve([1, 2], {}, "x", "y", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_raises_clear_error(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import matplotlib...` raise ImportError, as if uninstalled.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="plotting needs matplotlib"):
        plot_reliability({"m": _diagram(0)}, tmp_path / "x.png")


def test_reliability_with_floors_and_the_overlay(tmp_path):
    pytest.importorskip("matplotlib")
    from abmll_pyro.eval import plot_reliability_overlay

    diagrams = {"abmll": _diagram(0), "lora": _diagram(1), "pretrained": _diagram(2)}
    floors = {"abmll": 0.05, "lora": 0.06}
    one = plot_reliability({"abmll": diagrams["abmll"]}, tmp_path / "one.png", {"abmll": 0.05})
    every = plot_reliability_overlay(diagrams, tmp_path / "all.png", floors)
    assert one.read_bytes()[:8] == PNG_MAGIC and every.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match=r"floors has methods \['z'\]"):
        plot_reliability_overlay(diagrams, tmp_path / "bad.png", {"z": 0.1})
    assert not (tmp_path / "bad.png").exists()


def test_categorical_axis_for_shots(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_metric_curve([0, 1, 2, 4, 8, 16], {"abmll": [6.4e-7, 5e-7, 4e-7, 3e-7, 2e-7, 1e-7]}, "shots",
                             "epistemic (nats)", tmp_path / "shots.png", categorical=True)
    assert path.read_bytes()[:8] == PNG_MAGIC
