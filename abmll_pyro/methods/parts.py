"""Priors and guides by name, for the ``prior`` / ``guide`` config keys and ``--prior`` / ``--guide``.

Resolution goes through :mod:`abmll_pyro.registry` (built-in names, ``"package.module:Name"`` or
``"path/file.py:Name"``); import failures become ``ValueError`` so the CLI reports them as bad input.
"""

from __future__ import annotations

from typing import Any

from ..guides.base import TaskGuide
from ..models.priors import TaskPrior
from ..registry import resolve_guide, resolve_prior

__all__ = ["make_prior", "make_guide"]


def make_prior(spec: str, adapter: Any = None) -> TaskPrior:
    try:
        return resolve_prior(spec, adapter=adapter)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"prior {spec!r}: {err}") from None


def make_guide(spec: str, adapter: Any = None) -> TaskGuide:
    try:
        return resolve_guide(spec, adapter=adapter)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"guide {spec!r}: {err}") from None
