"""Priors and guides by name, for the ``prior`` / ``guide`` config keys and ``--prior`` / ``--guide``.

Resolution goes through :mod:`abmll_pyro.registry` (``resolve_prior(spec)``, ``resolve_guide(spec)``:
built-in names or ``"package.module:Name"`` import paths). Until that module exists, a small table of
the core's built-ins answers (and import paths still work), so the CLI never depends on it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ..guides import MeanFieldGuide, PointMassGuide
from ..models import FixedPrior, HierarchicalPrior, StudentTPrior
from ..models.priors import TaskPrior
from ..guides.base import TaskGuide

__all__ = ["make_prior", "make_guide"]

_PRIORS: dict[str, Callable[[], TaskPrior]] = {"hierarchical": HierarchicalPrior, "fixed": FixedPrior, "student-t": StudentTPrior}
_GUIDES: dict[str, Callable[[], TaskGuide]] = {"mean-field": MeanFieldGuide, "point-mass": PointMassGuide}


def _registry():
    try:
        return importlib.import_module("abmll_pyro.registry")
    except ModuleNotFoundError as err:
        if err.name != "abmll_pyro.registry":
            raise
        return None


def _import_path(spec: str, kind: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{kind} {spec!r}: cannot import ({err})") from None


def _instance(obj: Any, base: type, kind: str, spec: str) -> Any:
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, base)):
        obj = obj()
    if not isinstance(obj, base):
        raise ValueError(f"{kind} {spec!r} resolved to {type(obj).__name__}, not a {base.__name__}")
    return obj


def _resolve(spec: str, kind: str, table: dict, base: type, registry_fn: str) -> Any:
    registry = _registry()
    if registry is not None:
        return _instance(getattr(registry, registry_fn)(spec), base, kind, spec)
    if ":" in spec:
        return _instance(_import_path(spec, kind), base, kind, spec)
    if spec not in table:
        raise ValueError(f"unknown {kind} {spec!r}; built-in: {sorted(table)} (or 'package.module:Name')")
    return table[spec]()


def make_prior(spec: str) -> TaskPrior:
    return _resolve(spec, "prior", _PRIORS, TaskPrior, "resolve_prior")


def make_guide(spec: str) -> TaskGuide:
    return _resolve(spec, "guide", _GUIDES, TaskGuide, "resolve_guide")
