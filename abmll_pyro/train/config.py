"""The run configuration: one flat, validated dataclass that the CLI, config files and presets build.

This is the CLI/config boundary (registries only at the CLI/config boundary): it is flattened for files and flags, and it builds the
core's :class:`~abmll_pyro.config.AdapterConfig` and :class:`~abmll_pyro.config.MetaConfig`, which do
their own validation (so a knob's rules live in one place). Unknown keys are errors that list the
known ones.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ..config import (DTYPE_NAMES, INNER_OPTIMIZERS, MIXED_PRECISION_NAMES, OUTER_KL, STD_MAPS, AdapterConfig,
                      InnerLoopConfig, MetaConfig, dtype_name, mixed_precision_name)
from ..data.scoring import SCORE_REDUCTIONS
from ..data.tasks import unique_keys

__all__ = ["RunConfig", "load_config_file", "load_yaml", "ConfigError", "strict_json", "read_text_file"]


MAX_ECE_BINS = 10_000  # equal-width bins of confidence; the usual 15 resolves 1/15
MAX_SEED = 2**32 - 1  # numpy.random.seed's limit (pyro.set_rng_seed seeds NumPy too)
DEVICES = ("auto", "cpu", "cuda")
#: Accelerate's experiment trackers a run can report to (``report_to``); each needs its own package
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
#: the closed sets of string keys (``prior``, ``guide`` and ``method`` are registries, checked where they resolve);
#: the CLI offers them as its flags' choices
CHOICES: dict[str, tuple[str, ...]] = {
    "template": ("direct", "chat"),
    "score_reduction": SCORE_REDUCTIONS,
    "std_map": STD_MAPS,
    "inner_optimizer": INNER_OPTIMIZERS,
    "outer_kl": OUTER_KL,
    "scale_optimizer": ("adam", "sgd"),
    "subspace_init": ("svd", "random", "gradients"),
    "predict_mode": ("sample", "mean"),
    "eval_split": ("test", "dev"),
    "mixed_precision": MIXED_PRECISION_NAMES,
    "dtype": tuple(DTYPE_NAMES),
    "device": DEVICES,
    "report_to": ("none", *TRACKERS),
}


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message names the offending value."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``RunConfig.from_dict`` rejects unknown keys.

    Data: ``tasks`` (``debian-cls``, the default; ``bigbench``; a task-folder path; or a CrossFit/MetaICL split with ``data_dir``;
    ``train_tasks``/``dev_tasks``/``test_tasks`` name a folder's tasks by file stem, overriding its
    ``splits.json``),
    ``shots`` support and ``query_size`` query examples per training episode, ``eval_query_size``
    query examples per test task (all examples not used as support, up to this many),
    ``max_train_tasks``/``max_test_tasks`` (first N of each split),
    ``max_examples`` (per task file), ``max_length`` (tokens, prompt cut from the left; null: the model's
    context window; a value beyond that window is clipped to it with a warning; with
    ``drop_long_examples`` examples that do not fit are dropped instead, and tasks left too small); ``icl_max_length`` bounds prompts that carry demonstrations (default
    ``max_length·(shots + 1)``; demonstrations are cut from the left first).
    Optimization: ``steps`` outer steps of ``tasks_per_step`` episodes, ``grad_accum`` micro-batches
    per optimizer step; ``num_inner_steps`` at ``inner_lr`` for every method that adapts (train and
    test alike); ``reptile_step_size`` is Reptile's outer ε; ``ts_prior_std`` the standard deviation of
    ``lora-ts``'s Normal prior on log T (null: the unregularized fit; 0.25 chosen on cpu-long's dev
    tasks). The Bayesian-LoRA peers: ``laplace_logit_samples`` draws of the linearized Laplace predictive's
    option logits (``laplace-lora``), ``blob_prior_std`` (BLoB's prior σ_p on A) and ``blob_init_eps``
    (BLoB's ε: the scale factor G starts U(ε/√2, ε), σ = G²), ``ensemble_size`` members E of
    ``ensemble-lora``, ``mc_dropout_rate`` p of ``mc-dropout-lora`` (its passes are ``num_samples``).
    Prediction: ``num_samples`` draws of φ
    (``predict_mode="sample"``) or the posterior mean (``"mean"``). Scoring: ``score_reduction``
    (``sum``, ``mean`` per option token as MetaICL, ``char`` per character as lm-eval's ``acc_norm``)
    turns each option's token log-probs into its score, for every method alike. ``init_from_peft``:
    a PEFT LoRA adapter folder whose factors start θ's mean (same rank and target modules, checked). Evaluation:
    ``ece_bins`` equal-width bins of top-label confidence; ``eval_split`` the tasks a run is evaluated
    on at the end (``test``, or ``dev`` for tuning — never tune on test).
    Machinery: ``dtype`` of the LM's weights (KL, prior and likelihood terms stay float32) and
    ``mixed_precision`` (Accelerate's autocast) take one vocabulary (:data:`~abmll_pyro.config.DTYPE_NAMES`:
    ``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``) and are stored canonically;
    ``report_to`` names Accelerate trackers (:data:`TRACKERS`) a training run also logs to (default none);
    ``trunk_cache`` keeps the hidden states below the lowest adapted block per example, so passes
    run only the adapted blocks (exact; off to measure the difference).
    """

    method: str = "abmll"
    model: str = "tiny-llama"
    tasks: str = "debian-cls"
    data_dir: str | None = None
    train_tasks: tuple[str, ...] | None = None
    dev_tasks: tuple[str, ...] | None = None
    test_tasks: tuple[str, ...] | None = None
    seed: int = 0
    # data
    shots: int = 4
    query_size: int = 4
    eval_query_size: int = 64
    max_train_tasks: int | None = None
    max_test_tasks: int | None = None
    max_examples: int | None = None
    max_length: int | None = 256
    drop_long_examples: bool = False
    icl_max_length: int | None = None
    template: str = "direct"
    score_reduction: str = "char"  # chosen on dev tasks (docs/RESULTS.md, "Score reduction")
    # adapter
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    last_layers: int | None = None
    std_map: str = "softplus"
    init_std: float = 1e-3
    init_from_peft: str | None = None  # a PEFT LoRA folder: θ's mean factors start from it
    # objective and optimization
    kl_beta: float = 1e-8
    kl_gamma: float | None = None
    prior: str = "hierarchical"
    guide: str = "mean-field"
    steps: int = 100
    tasks_per_step: int = 2
    grad_accum: int = 1
    outer_lr: float = 1e-3
    grad_clip: float | None = 1.0
    num_inner_steps: int = 5
    inner_lr: float = 1e-3
    inner_optimizer: str = "adam"
    inner_adam_eps: float = 1e-8  # Adam's ε in the inner loop (InnerLoopConfig.adam_eps)
    outer_kl: str = "prior"
    scale_optimizer: str = "adam"  # θ's scale factors: with the other factors (adam) or by plain gradient steps (sgd)
    scale_lr: float | None = None  # the sgd scale step's size (null: outer_lr)
    # the task subspace (models/subspace.py): d learned directions per adapted module with their own scales
    subspace_dim: int = 0  # d (0: none)
    subspace_scale: float = 0.1  # the directions' prior scale s at the start (relative to each direction's gain)
    subspace_init: str = "svd"  # the directions' start: W0's top singular pairs (svd), random, or the training tasks' gradients
    subspace_beta: float = 1.0  # the weight of q(z_i)'s KL (ΔW's is kl_beta)
    subspace_inner_lr: float = 0.5  # the damping of q(z_i)'s Newton step in the inner loop (1: a full step; MetaConfig)
    subspace_scale_lr: float | None = None  # the outer Adam's for log s (null: outer_lr)
    reptile_step_size: float = 0.5
    ts_prior_std: float | None = 0.25  # chosen on dev tasks (docs/RESULTS.md, cpu-long section 4)
    # the Bayesian-LoRA peers (methods/laplace_lora.py, blob.py, ensemble_lora.py, mc_dropout_lora.py)
    laplace_logit_samples: int = 1000
    blob_prior_std: float = 0.2
    blob_init_eps: float = 0.05
    ensemble_size: int = 5
    mc_dropout_rate: float = 0.1
    # prediction
    num_samples: int = 8
    predict_mode: str = "sample"
    # evaluation
    ece_bins: int = 15
    eval_split: str = "test"
    # machinery
    mixed_precision: str = "no"
    dtype: str = "float32"
    trunk_cache: bool = True
    device: str = "auto"
    num_threads: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: tuple[str, ...] | None = None  # Accelerate trackers besides log.txt/metrics.jsonl (TRACKERS)

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for f in fields(self):  # types first (from the annotations), so every key, old or new, is covered
            object.__setattr__(self, f.name, _typed(f.name, str(f.type), getattr(self, f.name)))

        for name in ("steps", "tasks_per_step", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                     "eval_query_size", "query_size", "num_samples", "ece_bins", "ensemble_size",
                     "laplace_logit_samples"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(self.ece_bins <= MAX_ECE_BINS, f"ece_bins must be <= {MAX_ECE_BINS} (the limit), got {self.ece_bins}")
        check(isinstance(self.shots, int) and self.shots >= 1, f"shots must be an integer >= 1, got {self.shots!r}")
        for name in ("max_train_tasks", "max_test_tasks", "max_examples", "max_length", "last_layers", "num_threads",
                     "icl_max_length"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, int) and v >= 1), f"{name} must be an integer >= 1 or null, got {v!r}")
        check(math.isfinite(self.kl_beta) and self.kl_beta >= 0, f"kl_beta must be finite and >= 0, got {self.kl_beta!r}")
        check(isinstance(self.subspace_dim, int) and self.subspace_dim >= 0,
              f"subspace_dim must be an integer >= 0, got {self.subspace_dim!r}")
        check(math.isfinite(self.subspace_scale) and self.subspace_scale > 0,
              f"subspace_scale must be finite and > 0, got {self.subspace_scale!r}")
        check(self.kl_gamma is None or (math.isfinite(self.kl_gamma) and self.kl_gamma >= 0),
              f"kl_gamma must be finite and >= 0 (or null), got {self.kl_gamma!r}")
        check(self.reptile_step_size > 0, f"reptile_step_size must be > 0, got {self.reptile_step_size!r}")
        check(self.ts_prior_std is None or self.ts_prior_std > 0,
              f"ts_prior_std must be > 0 (or null), got {self.ts_prior_std!r}")
        for name in ("blob_prior_std", "blob_init_eps"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)!r}")
        check(0 < self.mc_dropout_rate < 1, f"mc_dropout_rate must be in (0, 1), got {self.mc_dropout_rate!r}")
        for name in ("template", "score_reduction", "eval_split", "predict_mode", "device", "subspace_init"):
            v = getattr(self, name)
            check(v in CHOICES[name], f"{name} must be one of {list(CHOICES[name])}, got {v!r}")
        if self.report_to is not None:  # ("none",) is null; each name once
            names = tuple(dict.fromkeys(n for n in self.report_to if n.lower() != "none"))
            bad = [n for n in names if n not in TRACKERS]
            check(not bad, f"report_to must name trackers among {list(TRACKERS)} (or none), got {bad[0]!r}" if bad else "")
            object.__setattr__(self, "report_to", names or None)
        try:  # any spelling of the one vocabulary (fp32/float32, bf16/bfloat16, fp16/float16), stored canonically
            object.__setattr__(self, "dtype", dtype_name(self.dtype))
            object.__setattr__(self, "mixed_precision", mixed_precision_name(self.mixed_precision))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check(isinstance(self.trunk_cache, bool), f"trunk_cache must be true or false, got {self.trunk_cache!r}")
        check(isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED,
              f"seed must be an integer in [0, {MAX_SEED}] (NumPy's seed range), got {self.seed!r}")
        try:  # the core's own checks, run now so a bad value fails before any model is loaded
            self.adapter_config()
            self.meta_config()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    # ----------------------------------------------------------------- core configs
    def adapter_config(self, target_modules: tuple[str, ...] | None = None) -> AdapterConfig:
        return AdapterConfig(rank=self.rank, lora_alpha=self.lora_alpha,
                             target_modules=target_modules or self.target_modules,
                             std_map=self.std_map, init_std=self.init_std)

    def prompt_length(self, in_context: bool) -> int | None:
        """The token budget of a prompt plus option (in-context prompts get room for their demonstrations)."""
        if not in_context or self.max_length is None:
            return self.max_length
        return self.icl_max_length or self.max_length * (self.shots + 1)

    def inner_config(self) -> InnerLoopConfig:
        return InnerLoopConfig(num_inner_steps=self.num_inner_steps, inner_lr=self.inner_lr,
                               optimizer=self.inner_optimizer, adam_eps=self.inner_adam_eps)

    def meta_config(self) -> MetaConfig:
        return MetaConfig(kl_beta=self.kl_beta, kl_gamma=self.kl_gamma, outer_lr=self.outer_lr,
                          tasks_per_step=self.tasks_per_step, grad_clip=self.grad_clip, outer_kl=self.outer_kl,
                          inner=self.inner_config(), scale_optimizer=self.scale_optimizer, scale_lr=self.scale_lr,
                          subspace_beta=self.subspace_beta, subspace_inner_lr=self.subspace_inner_lr,
                          subspace_scale_lr=self.subspace_scale_lr)

    # ----------------------------------------------------------------- (de)serialization
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> "RunConfig":
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"{where}: unknown config key(s) {unknown}; known keys: {cls.keys()}")
        try:
            return cls(**dict(values))
        except TypeError as err:
            raise ConfigError(f"{where}: {err}") from None
        except ConfigError as err:
            if where in ("config", "flags"):
                raise
            raise ConfigError(f"{where}: {err}") from None

    def updated(self, **changes: Any) -> "RunConfig":
        unknown = sorted(set(changes) - set(self.keys()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {self.keys()}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _short(value: Any) -> str:
    """``repr(value)`` cut to a few elements and levels (a value from a file may be huge)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 60, 60
    return short.repr(value)


def _typed(key: str, annotation: str, value: Any) -> Any:
    """``value`` checked against the field's annotation (``int``, ``float``, ``str``, ``bool``,
    ``tuple[str, ...]``, each optionally ``| None``); ints are accepted for floats (and made floats), a
    string for a tuple (one name); floats must be finite. A :class:`ConfigError` names key and value."""
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be null")
    if base.startswith("tuple"):
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key} must be a list of names, got {_short(value)}")
        return tuple(value)
    kind = _SCALARS.get(base)
    if kind is None:  # an annotation this checker does not know: the field's own checks apply
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        hint = ""
        if isinstance(value, str) and kind in (int, float):
            hint = " (a string)"
        noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
        raise ConfigError(f"{key} must be {noun}"
                          f"{' or null' if optional else ''}, got {_short(value)}{hint}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    return value


# YAML 1.2's floats, which YAML 1.1 (PyYAML) reads as strings when they have an exponent and no dot: 1e-3, 5E+2
_EXPONENT_FLOAT = r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """A SafeLoader subclass that also resolves exponent-only floats (built once; SafeLoader unchanged:
    add_implicit_resolver copies the resolver table into the subclass)."""
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # a key given twice is an error, not "last wins"
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        first = seen.setdefault(key, line)
                    except TypeError:  # an unhashable key: the constructor reports it
                        continue
                    if first != line:
                        raise ConfigError(f"line {line}: key {key!r} given twice (first on line {first})")
            return super().construct_mapping(node, deep=deep)

    _Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_EXPONENT_FLOAT), list("-+0123456789"))
    return _Loader


MAX_CONFIG_VALUES = 10_000  # values in a config file once YAML aliases are expanded (a config holds ~100)


def _expanded_size(value: Any, limit: int) -> int:
    """How many values ``value`` holds with shared (aliased) parts counted each time, counting stops past ``limit``."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that ``1e-3`` is the float 0.001 (YAML 1.2 and JSON agree; PyYAML's
    YAML 1.1 makes it the string ``'1e-3'``, and a config key would then reject it); a key given twice
    and aliases expanding past :data:`MAX_CONFIG_VALUES` values (an alias bomb) are :class:`ConfigError`."""
    import yaml

    values = yaml.load(text, Loader=_yaml_loader())
    if _expanded_size(values, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ConfigError(f"YAML aliases expand to more than {MAX_CONFIG_VALUES} values (the limit)")
    return values


def strict_json(text: str, where: str) -> Any:
    """``json.loads`` with a key given twice in an object an error naming ``where`` and the key, and a
    syntax error naming ``where:line``."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys(where, ConfigError))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        raise ConfigError(f"{where}: malformed JSON (nested too deeply)") from None


def read_text_file(path: Path, what: str = "file") -> str:
    """A regular file's UTF-8 text; a FIFO, device or folder, and a byte that is not UTF-8, are a
    :class:`ConfigError` naming the file (and line)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path}:{line}: not valid UTF-8 (byte {raw[err.start]:#04x}); save it as UTF-8") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON file holding one mapping of config keys."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = read_text_file(path, "config file")
    try:
        if path.suffix in (".yaml", ".yml"):
            values = load_yaml(text)
        else:
            values = strict_json(text, str(path))
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(str(path)) else f"config file {path}: {msg}") from None
    except Exception as err:  # yaml.YAMLError: report the file, keep the message
        raise ConfigError(f"config file {path} does not parse: {' '.join(str(err).split())[:300]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(values).__name__}")
    return values
