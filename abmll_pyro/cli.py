"""The ``abmll`` command: data, train, evaluate, predict, generate, export, benchmark (usage: docs/cli.md).

Settings come from, lowest to highest precedence: the defaults of :class:`RunConfig` (or the
benchmark preset), ``--config FILE`` (YAML or JSON), then flags (every config key is a flag:
``kl_beta`` is ``--kl-beta``; ``null`` or ``none`` sets an optional key to null). Bad input exits
with status 2 and one ``abmll: error:`` line (never a traceback); warnings print as one
``abmll: warning:`` line each; Ctrl-C exits with status 130 after saying where to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from .cli_parser import build_parser

__all__ = ["main", "build_parser"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .train.config import RunConfig

    skip = {"method", "model", "tasks"}  # separate arguments of each command (default None: not given)
    return {k: getattr(args, k) for k in RunConfig.keys()
            if hasattr(args, k) and (k not in skip or getattr(args, k) is not None)}


def _config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    from .train.config import RunConfig, load_config_file

    values = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
        RunConfig.from_dict(values, where=args.config)  # a bad value in the file is reported with the file's name
    values.update(_overrides(args))
    return RunConfig.from_dict(values, where="flags")


# ----------------------------------------------------------------------------- commands
def _cmd_data(args) -> int:
    if args.data_command == "prepare":
        from .data.sources import prepare_bigbench, prepare_debian_cls
        from .data.fingerprint import folder_fingerprint
        from .data.sources.bigbench_generative import prepare_bigbench_generative

        if args.source is not None and args.suite == "debian-cls":
            raise ValueError("--from is for bigbench and bigbench-gen; debian-cls is fetched with apt-get or --mirror")
        if args.mirror is not None and args.suite != "debian-cls":
            raise ValueError(f"--mirror is for debian-cls, not {args.suite}")
        if args.suite == "debian-cls":
            folder = prepare_debian_cls(force=args.force, mirror=args.mirror)
        else:
            prepare = {"bigbench": prepare_bigbench, "bigbench-gen": prepare_bigbench_generative}[args.suite]
            folder = prepare(force=args.force, source=args.source)
        manifest = json.loads((folder / "manifest.json").read_text())
        print(folder)
        print(f"{args.suite}: {len(manifest.get('tasks', {}))} tasks, content fingerprint "
              f"{manifest.get('fingerprint') or folder_fingerprint(folder)}", file=sys.stderr)
    else:
        from .presets import synthetic_task_folder

        print(synthetic_task_folder(args.out, num_train=args.num_train, num_test=args.num_test, examples=args.examples,
                                    seed=args.seed, overwrite=args.overwrite))
    return 0


def _cmd_train(args) -> int:
    from .train.config import ConfigError, load_config_file
    from .train.run import train_run

    if args.resume:
        if args.out or args.overwrite:
            raise ConfigError("--resume continues the run in its own directory; drop --out/--overwrite")
        saved = _stored_config(Path(args.resume), args)
        changes = dict(load_config_file(args.config)) if args.config else {}
        changes.update(_overrides(args))
        result = train_run(saved.updated(**changes), args.resume, resume=True, progress=not args.quiet,
                           allow_config_change=args.allow_config_change)
    else:
        if not args.out:
            raise ConfigError("train needs --out RUN_DIR (or --resume RUN_DIR)")
        if not args.method and "method" not in (load_config_file(args.config) if args.config else {}):
            raise ConfigError("train needs --method, or a --config file that sets method (or --resume RUN_DIR)")
        base = {k: getattr(args, k) for k in ("method", "model", "tasks") if getattr(args, k)}
        config = _config(args, base)
        from .methods import TRAINABLE

        if config.method not in TRAINABLE:  # (--method's choices say so for the flag; this is the config file's)
            raise ConfigError(f"{args.config}: method {config.method!r} is not trained (evaluate it with abmll "
                              f"evaluate --method); trainable: {list(TRAINABLE)}")
        result = train_run(config, args.out, progress=not args.quiet, overwrite=args.overwrite)
    _print_summary(result)
    return 0


def _cmd_evaluate(args) -> int:
    from .train.config import ConfigError
    from .train.run import evaluate_run

    if args.run:
        stored = _stored_config(Path(args.run), args)
        if args.method and args.method != stored.method:
            from .methods import SAME_TRAINING

            if SAME_TRAINING.get(args.method) != stored.method:
                twins = ", ".join(f"--method {m} on a {t} run" for m, t in SAME_TRAINING.items())
                raise ConfigError(f"--method {args.method} cannot evaluate {args.run}: it was trained as "
                                  f"{stored.method!r} (with --run, --method may only name a method trained the "
                                  f"same way: {twins})")
        config = stored.updated(**_overrides(args))
    else:
        if not args.method:
            raise ConfigError("evaluate needs --run RUN_DIR, or --method with --model and --tasks")
        base = {k: getattr(args, k) for k in ("method", "model", "tasks") if getattr(args, k)}
        config = _config(args, base)
        from .methods import TRAINABLE

        if config.method in TRAINABLE:
            raise ConfigError(f"method {config.method!r} needs training: evaluate it with --run RUN_DIR")
    if args.out:
        from .train.evaluate import predictions_path
        from .train.outputs import check_output_file, first_record_has

        check_output_file(args.out, args.overwrite, ours=first_record_has("schema_version", "method"))
        check_output_file(predictions_path(args.out), args.overwrite, ours=first_record_has("method", "task", "probs"),
                          flag="--out's predictions file")
    result = evaluate_run(config, args.run, progress=not args.quiet, out=args.out, split=args.split)
    _print_summary(result)
    return 0


def _cmd_predict(args) -> int:
    from .train.predict import predict_file

    predict_file(Path(args.run), Path(args.support), Path(args.query), args.out, args.num_samples, progress=not args.quiet,
                 trust_plugins=args.trust_plugins, overwrite=args.overwrite)
    return 0


def _stored_config(run_dir: Path, args):
    """A run directory's saved config; its file plug-ins need ``--trust-plugins`` unless a flag replaces them."""
    from .train.run import open_run

    return open_run(run_dir, args.trust_plugins, tuple(_overrides(args)))


def _cmd_generate(args) -> int:
    from .infer.generate import GenerationConfig
    from .train.generate_run import generate_file

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                           top_p=args.top_p, stop_strings=tuple(args.stop))
    generate_file(Path(args.run), Path(args.support), Path(args.prompts), args.out, args.num_samples, gen, args.seed,
                  trust_plugins=args.trust_plugins, overwrite=args.overwrite)
    return 0


def _cmd_export(args) -> int:
    from .export.run import export_run

    print(export_run(Path(args.run), Path(args.out), Path(args.support) if args.support else None, args.fmt, args.seed,
                     trust_plugins=args.trust_plugins, overwrite=args.overwrite))
    return 0


def _benchmark_jobs(asked: int | None, preset_jobs: int) -> int:
    """``--jobs`` if given, else the preset's (1 under a distributed launch, which parallelizes each run)."""
    from .train.distributed import world_size

    if asked is not None:
        return asked
    return preset_jobs if world_size() == 1 else 1


def _cmd_benchmark(args) -> int:
    from .presets import get_preset, synthetic_task_folder
    from .train.benchmark import AUTO_TRUNK, claim_benchmark_dir, run_benchmark

    claim_benchmark_dir(Path(args.out), args.overwrite)  # before the tasks are written into it
    preset = get_preset(args.preset)
    base = dict(preset.config)
    if preset.synthetic is not None and not getattr(args, "tasks", None):
        from .train.distributed import main_writes

        base["tasks"] = str(main_writes(synthetic_task_folder, Path(args.out) / "tasks", **preset.synthetic))
    config = _config(args, base)
    from .train.runlog import check_trackers

    check_trackers(config.report_to)  # before any run starts
    seeds = range(args.seeds if args.seeds is not None else preset.seeds)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    methods = args.methods or preset.methods
    if "all" in methods:
        from .presets import ALL_METHODS

        methods = ALL_METHODS
    trunk = args.trunk_dir
    trunk = AUTO_TRUNK if trunk is None else (None if trunk.lower() in ("none", "null") else trunk)
    _, table = run_benchmark(config, methods, list(seeds), args.out, progress=not args.quiet,
                             reference=args.reference, jobs=_benchmark_jobs(args.jobs, preset.jobs), trunk_dir=trunk)
    from .train.distributed import is_main_process

    if is_main_process():  # one copy of the table under torchrun / accelerate launch
        print(table)
    return 0


def _read_task_list(path: Path) -> list[str]:
    """Task names, one per line (blank lines and ``#`` comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--tasks-file {path}: cannot read it ({err.__class__.__name__}: {err})") from None
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--tasks-file {path}: no task names in it")
    return names


def _cmd_compare(args) -> int:
    from .eval.compare import (format_comparison, format_summary, load_predictions, paired_comparison,
                               summarize)

    if args.resamples < 10:
        raise ValueError(f"--resamples must be >= 10, got {args.resamples}")
    from .train.config import MAX_ECE_BINS

    if not 1 <= args.ece_bins <= MAX_ECE_BINS:
        raise ValueError(f"--ece-bins must be in [1, {MAX_ECE_BINS}] (the limit), got {args.ece_bins}")
    for flag, value, default in (("--nll-ratio", args.nll_ratio, 0.7), ("--ece-ratio", args.ece_ratio, 0.5)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
        if value != default and not args.target:
            raise ValueError(f"{flag} is a condition of --target BASELINE: give --target too")
    tasks = list(args.only_tasks or [])
    if args.tasks_file:
        tasks += _read_task_list(Path(args.tasks_file))
    tasks = tasks or None
    if args.out:
        from .train.benchmark import claim_comparison_dir, write_comparison

        claim_comparison_dir(Path(args.out), args.overwrite)

        table, comparison = write_comparison(Path(args.out), [Path(p) for p in args.paths], args.reference, args.ece_bins,
                                             args.seed, args.resamples, args.names, tasks)
    else:
        preds = load_predictions(args.paths, args.names, tasks)
        table = format_summary(summarize(preds, args.ece_bins, args.resamples, args.seed), args.ece_bins)
        reference = args.reference
        if reference not in preds:
            raise ValueError(f"--reference {reference!r} has no predictions here; methods found: {sorted(preds)}")
        comparison = format_comparison(paired_comparison(preds, reference, args.ece_bins, args.resamples, args.seed))
    print(table)
    print(comparison)
    if args.target:
        _compare_target(args, tasks)
    return 0


def _compare_target(args, tasks) -> None:
    """``abmll compare --target BASELINE``: the ratio claim and its reachability (eval/target.py)."""
    from .eval.compare import load_predictions
    from .eval.target import format_target, target_check

    result = target_check(load_predictions(args.paths, args.names, tasks), args.reference, args.target, args.nll_ratio,
                          args.ece_ratio, args.ece_bins, args.resamples, seed=args.seed)
    text = format_target(result)
    if args.out:
        from .train.checkpoint import atomic_write_text

        atomic_write_text(Path(args.out) / "target.md", text)
        atomic_write_text(Path(args.out) / "target.json", json.dumps(result, indent=1) + "\n")
    print(text)


def _print_summary(result: dict) -> None:
    from .train.distributed import is_main_process

    if not is_main_process():  # one summary line under torchrun / accelerate launch
        return
    if result.get("kind") == "generative":
        m = result["macro"]
        print(json.dumps({"method": result["method"], "token_nll": round(m["token_nll"], 4),
                          "exact_match": round(m["exact_match"], 4), "agreement": round(m["agreement"], 4),
                          "num_tasks": m["num_tasks"], "wall_time_s": round(result["wall_time_s"], 1)}))
        return
    m = result["pooled"]
    print(json.dumps({"method": result["method"], "accuracy": round(m["accuracy"], 4), "nll": round(m["nll"], 4),
                      "brier": round(m["brier"], 4), "ece": round(m["ece"], 4), "ece_floor": round(m["ece_floor"], 4),
                      "n": m["n"], "num_tasks": result["macro"]["num_tasks"],
                      "wall_time_s": round(result["wall_time_s"], 1)}))


COMMANDS = {"data": _cmd_data, "train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
            "generate": _cmd_generate, "export": _cmd_export, "benchmark": _cmd_benchmark, "compare": _cmd_compare}


@contextlib.contextmanager
def _one_line_warnings():
    """Print each warning as one ``abmll: warning:`` line (no source line), while the command runs."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"abmll: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _error_line(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename is not None:  # read-only or full disk, a missing path
        return f"{err.filename}: {err.strerror or err}"
    from .train.faults import condense

    return condense(err, limit=2000)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _one_line_warnings():
        try:
            if args.command in ("train", "evaluate") and args.trunk_dir is not None:
                from .data.trunk import shared_trunk_dir

                folder = None if args.trunk_dir.lower() in ("none", "null") else args.trunk_dir  # none: $ABMLL_TRUNK_DIR off
                with shared_trunk_dir(folder):
                    return COMMANDS[args.command](args)
            return COMMANDS[args.command](args)
        except BrokenPipeError:  # the reader went away (`abmll compare ... | head`): stop quietly, as cat does
            with contextlib.suppress(OSError, ValueError):  # nothing left to flush into the closed pipe
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (ValueError, KeyError, ImportError, OSError) as err:
            print(f"abmll: error: {_error_line(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:  # train's RunInterrupted says where to resume
            print(f"abmll: {err or 'interrupted'}", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
