"""Priors and task guides by name, at the CLI / config boundary (library code passes objects).

A *spec* names what to build:

* a registered name: ``"hierarchical"`` (hyperprior centred on the adapter's init_std),
  ``"hierarchical-abml"`` (ABML's Gamma(1, 0.01)), ``"fixed"``, ``"student-t"``; ``"mean-field"``,
  ``"point-mass"``, ``"amortized"``;
* an import path ``"package.module:Name"`` (``Name`` may be dotted: ``"mod:Outer.Inner"``);
* a file path ``"path/to/file.py:Name"``, loaded with :mod:`importlib.util` (once per file);
* an object: a class or factory (called), or an instance (returned as is).

``resolve_prior(spec, **kwargs)`` / ``resolve_guide(spec, **kwargs)`` build it with ``kwargs`` and
check the interface: every method of :class:`~abmll_pyro.models.priors.TaskPrior` (``hyperprior``,
``global_values``, ``task_distribution``) or of :class:`~abmll_pyro.guides.base.TaskGuide`
(``init_task_params``, ``task_distribution``) must be implemented (not the base class's stub).

Trust: a file plug-in is Python code. A spec read from a run directory's stored config (``evaluate
--run``, ``predict --run``, ``train --resume``) goes through :func:`check_trusted` first, which refuses
file plug-ins unless the user passed ``--trust-plugins``; registered names and importable modules
(installed code) load as always.

Convention: a builder whose signature has an ``adapter`` parameter (a guide that owns parameters
sized by the adapter, like :class:`~abmll_pyro.guides.amortized.AmortizedGuide`) receives the
``adapter=`` passed to ``resolve_*``; other builders never see it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from .guides.amortized import AmortizedGuide
from .guides.base import TaskGuide
from .guides.low_rank import LowRankPrecisionGuide
from .guides.mean_field import MeanFieldGuide, PointMassGuide
from .models.priors import FixedPrior, HierarchicalPrior, StudentTPrior, TaskPrior

__all__ = [
    "Registry", "PRIORS", "GUIDES", "register_prior", "register_guide", "resolve_prior", "resolve_guide",
    "load_object", "PluginError", "PluginTypeError", "UntrustedPluginError", "is_file_spec", "check_trusted",
]


class PluginError(ValueError):
    """A prior or guide spec that cannot be loaded or built; the message names the spec."""


class PluginTypeError(PluginError, TypeError):
    """A plug-in of the wrong kind (a guide where a prior is expected) or with the wrong arguments."""


class UntrustedPluginError(PluginError):
    """A stored config names a file plug-in and the user has not passed ``--trust-plugins``."""


def is_file_spec(spec: Any) -> bool:
    """Whether ``spec`` names a Python file (``"path/to/file.py:Name"``): code outside installed packages."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    module_part = spec.rpartition(":")[0]
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


def check_trusted(specs: dict[str, Any], source: str, trust: bool) -> None:
    """Refuse the file plug-ins among ``specs`` (key → spec, e.g. ``{"prior": "helper.py:P"}``) read
    from ``source`` unless ``trust``: :class:`UntrustedPluginError` says what would run and how to allow it."""
    files = {k: v for k, v in specs.items() if is_file_spec(v)}
    if files and not trust:
        k, v = next(iter(files.items()))
        path = Path(v.rpartition(":")[0]).expanduser().resolve()
        raise UntrustedPluginError(
            f"{source} names the plug-in file {v!r} as {k}: loading it would import and execute {path}; "
            f"a run directory does not run code unless you pass --trust-plugins")


def load_object(path: str) -> Any:
    """``"package.module:Name"`` or ``"path/to/file.py:Name"`` → the object (errors name what failed)."""
    module_part, sep, attr = path.rpartition(":")
    if not sep or not module_part or not attr:
        raise ValueError(f"{path!r} is not an import path; expected 'package.module:Name' or 'path/to/file.py:Name'")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _load_file(module_part)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise ImportError(f"cannot import module {module_part!r} (from {path!r}): {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise AttributeError(f"module {module_part!r} has no attribute {attr!r}; it defines {public}")
        obj = getattr(obj, part)
    return obj


def _load_file(file: str):
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"plug-in file {file!r} does not exist (resolved to {path})")
    # one module per file, cached, so classes keep their identity across resolutions
    name = f"abmll_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PluginError(f"plug-in file {file!r} fails to load: {type(err).__name__}: {err}") from err
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _takes_adapter(builder: Callable) -> bool:
    try:
        return "adapter" in inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class Registry:
    """Named builders of one kind of object, with the interface every built object must implement.

    ``base`` is the documented base class; ``methods`` the methods it declares. An object implements
    a method when it has a callable of that name that is not ``base``'s own stub.
    """

    def __init__(self, kind: str, base: type, methods: tuple[str, ...]):
        self.kind, self.base, self.methods = kind, base, methods
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, builder: Callable[..., Any] | None = None):
        """Register ``builder`` (a class or factory) under ``name``; usable as a decorator."""
        if builder is None:
            return lambda b: self.register(name, b) or b
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':' or surrounding spaces, got {name!r}")
        if name in self._builders:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._builders[name]!r})")
        if not callable(builder):
            raise TypeError(f"the builder of {self.kind} {name!r} must be a class or callable, got {builder!r}")
        self._builders[name] = builder
        return builder

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise KeyError(self._unknown(name))
        return self._builders[name]

    def _unknown(self, name: str) -> str:
        return (f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())} "
                f"(or an import path 'package.module:Name' or 'path/to/file.py:Name')")

    def missing_methods(self, obj: Any) -> list[str]:
        missing = []
        for method in self.methods:
            fn = getattr(type(obj), method, None)
            if not callable(fn) or fn is getattr(self.base, method, None):
                missing.append(method)
        return missing

    def check(self, obj: Any, spec: Any = None) -> Any:
        """Return ``obj`` if it implements the interface, else raise a TypeError naming what is missing."""
        missing = self.missing_methods(obj)
        if missing:
            where = f" (from {spec!r})" if spec is not None else ""
            raise PluginTypeError(
                f"{type(obj).__name__}{where} is not a {self.kind}: it does not implement {', '.join(missing)} "
                f"(the {self.kind} interface is {', '.join(self.methods)}; see docs/extending.md)"
            )
        return obj

    def resolve(self, spec: Any, adapter: Any = None, **kwargs: Any) -> Any:
        """Build ``spec`` (name, import path, class, factory or instance) with ``kwargs``; check it."""
        if isinstance(spec, str):
            if ":" in spec:
                target = load_object(spec)
            elif spec in self._builders:
                target = self._builders[spec]
            else:
                raise ValueError(self._unknown(spec))
        else:
            target = spec
        if not (inspect.isclass(target) or inspect.isroutine(target) or isinstance(target, functools.partial)):
            if kwargs:  # an instance: used as is
                raise PluginTypeError(f"{self.kind} {spec!r} is an instance; it takes no arguments, got {sorted(kwargs)}")
            return self.check(target, spec)
        if adapter is not None and _takes_adapter(target):
            kwargs = {"adapter": adapter, **kwargs}
        try:
            obj = target(**kwargs)
        except TypeError as e:
            raise PluginTypeError(f"cannot build {self.kind} {spec!r} with arguments {sorted(kwargs)}: {e}") from e
        return self.check(obj, spec)


PRIORS = Registry("prior", TaskPrior, ("hyperprior", "global_values", "task_distribution"))
GUIDES = Registry("guide", TaskGuide, ("init_task_params", "task_distribution"))

PRIORS.register("hierarchical", HierarchicalPrior)
PRIORS.register("hierarchical-abml", HierarchicalPrior.abml)
PRIORS.register("fixed", FixedPrior)
PRIORS.register("student-t", StudentTPrior)
GUIDES.register("mean-field", MeanFieldGuide)
GUIDES.register("point-mass", PointMassGuide)
GUIDES.register("amortized", AmortizedGuide)
GUIDES.register("low-rank-precision", LowRankPrecisionGuide)


def register_prior(name: str, builder: Callable[..., TaskPrior] | None = None):
    """Add a prior under ``name`` (duplicate → ValueError); decorator when ``builder`` is omitted."""
    return PRIORS.register(name, builder)


def register_guide(name: str, builder: Callable[..., TaskGuide] | None = None):
    """Add a task guide under ``name`` (duplicate → ValueError); decorator when ``builder`` is omitted."""
    return GUIDES.register(name, builder)


def resolve_prior(spec: Any, adapter: Any = None, **kwargs: Any) -> TaskPrior:
    """A prior from a registered name, ``"package.module:Name"``, ``"file.py:Name"`` or an object."""
    return PRIORS.resolve(spec, adapter=adapter, **kwargs)


def resolve_guide(spec: Any, adapter: Any = None, **kwargs: Any) -> TaskGuide:
    """A task guide from a registered name, ``"package.module:Name"``, ``"file.py:Name"`` or an object;
    ``adapter`` reaches builders that take one (e.g. ``"amortized"``)."""
    return GUIDES.resolve(spec, adapter=adapter, **kwargs)
