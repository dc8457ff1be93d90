"""The ``abmll`` command: data, train, evaluate, predict, benchmark (usage: docs/cli.md).

Settings come from, lowest to highest precedence: the defaults of :class:`RunConfig` (or the
benchmark preset), ``--config FILE`` (YAML or JSON), then flags (every config key is a flag:
``kl_beta`` is ``--kl-beta``). Bad input exits with status 2 and one ``abmll: error:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

MAIN_FLAGS = ("seed", "steps", "kl_beta", "kl_gamma", "rank", "lora_alpha", "num_inner_steps", "inner_lr", "outer_lr",
              "shots", "query_size", "eval_query_size", "tasks_per_step", "num_samples", "prior", "guide",
              "score_reduction")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "1", "yes")


def _flag_type(annotation: str):
    base = annotation.replace(" | None", "")
    kind = {"int": int, "float": float, "str": str, "bool": _bool}.get(base)
    if base.startswith("tuple"):
        return "list"
    return _none_or(kind) if "None" in annotation else kind


def _add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    from .train.config import RunConfig

    main = parser.add_argument_group("main settings")
    more = parser.add_argument_group("more settings (every config key)")
    for f in fields(RunConfig):
        if f.name in skip:
            continue
        group = main if f.name in MAIN_FLAGS else more
        kind = _flag_type(str(f.type))
        flag = "--" + f.name.replace("_", "-")
        if kind == "list":
            group.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="NAME")
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                               help=f"(default {f.default!r})" if not callable(f.default) else None)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .train.config import RunConfig

    return {k: getattr(args, k) for k in RunConfig.keys() if getattr(args, k, None) is not None}


def _config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    from .train.config import RunConfig, load_config_file

    values = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    values.update(_overrides(args))
    return RunConfig.from_dict(values, where=getattr(args, "config", None) or "flags")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS, TRAINABLE
    from .presets import PRESETS

    parser = argparse.ArgumentParser(prog="abmll", description="Amortized Bayesian Meta-Learning for LoRA (ABMLL) and baselines.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare task data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="fetch and convert a task suite into the cache")
    prep.add_argument("suite", choices=["bigbench"])
    prep.add_argument("--force", action="store_true", help="rebuild even if prepared")
    syn = dsub.add_parser("synthetic", help="write the generated task set of the smoke preset")
    syn.add_argument("--out", required=True)

    train = sub.add_parser("train", help="meta-train a method; evaluates on the test tasks at the end")
    train.add_argument("--method", choices=list(TRAINABLE))
    train.add_argument("--model", help="smollm2-135m, tiny-llama, tiny-qwen2, tiny-gpt2, or a HF id/path")
    train.add_argument("--tasks", help="bigbench, a task-folder path, or a CrossFit/MetaICL split name")
    train.add_argument("--out", help="the new run directory")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument("--config", help="YAML or JSON file of config keys")
    _add_config_flags(train, skip=("method", "model", "tasks"))

    ev = sub.add_parser("evaluate", help="adapt on each test task's support set, score its query set")
    ev.add_argument("--run", metavar="RUN_DIR", help="a trained run directory")
    ev.add_argument("--method", choices=list(METHODS), help="an untrained method (pretrained, icl) without --run")
    ev.add_argument("--model")
    ev.add_argument("--tasks")
    ev.add_argument("--split", choices=["test", "dev"], default="test")
    ev.add_argument("--out", help="write the result JSON here (default: print only)")
    ev.add_argument("--config")
    _add_config_flags(ev, skip=("method", "model", "tasks"))

    pr = sub.add_parser("predict", help="adapt to a new task and write the query's option probabilities")
    pr.add_argument("--run", metavar="RUN_DIR", required=True)
    pr.add_argument("--support", required=True, help="JSONL of labelled examples (input, options, output)")
    pr.add_argument("--query", required=True, help="JSONL of examples (input, options; output optional)")
    pr.add_argument("--out", help="output JSONL (default: stdout)")
    pr.add_argument("--num-samples", dest="num_samples", type=int)

    bench = sub.add_parser("benchmark", help="every method on the same splits, budgets and seeds")
    bench.add_argument("--preset", choices=list(PRESETS), default="cpu")
    bench.add_argument("--out", required=True)
    bench.add_argument("--methods", nargs="+", choices=list(METHODS))
    bench.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    bench.add_argument("--reference", default="abmll", help="the method every other is compared against")
    bench.add_argument("--config")
    _add_config_flags(bench, skip=("method", "seed"))

    cmp_ = sub.add_parser("compare", help="paired differences with 95%% bootstrap CIs from runs' predictions")
    cmp_.add_argument("paths", nargs="+", metavar="RUN_OR_BENCH_DIR",
                      help="run directories, benchmark directories or predictions.jsonl files")
    cmp_.add_argument("--reference", default="abmll", help="the method every other is compared against")
    cmp_.add_argument("--ece-bins", dest="ece_bins", type=int, default=15)
    cmp_.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    cmp_.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cmp_.add_argument("--out", help="also write comparison.md, comparison.json and table.md into this directory")
    return parser


# ----------------------------------------------------------------------------- commands
def _cmd_data(args) -> int:
    if args.data_command == "prepare":
        from .data.sources import prepare_bigbench

        print(prepare_bigbench(force=args.force))
    else:
        from .presets import synthetic_task_folder

        print(synthetic_task_folder(args.out))
    return 0


def _cmd_train(args) -> int:
    from .train.config import ConfigError
    from .train.run import load_run_config, train_run

    if args.resume:
        if args.out or args.method or args.config:
            raise ConfigError("--resume continues a run with its saved config; drop --out/--method/--config")
        load_run_config(Path(args.resume))  # a clear error if it is not a run directory
        result = train_run(load_run_config(Path(args.resume)), args.resume, resume=True, progress=not args.quiet)
    else:
        for flag in ("method", "out"):
            if not getattr(args, flag):
                raise ConfigError(f"train needs --{flag} (or --resume RUN_DIR)")
        base = {k: getattr(args, k) for k in ("method", "model", "tasks") if getattr(args, k)}
        result = train_run(_config(args, base), args.out, progress=not args.quiet)
    _print_summary(result)
    return 0


def _cmd_evaluate(args) -> int:
    from .train.config import ConfigError
    from .train.run import evaluate_run, load_run_config

    if args.run:
        if args.method:
            raise ConfigError("give --run RUN_DIR or --method, not both")
        config = load_run_config(Path(args.run))
        changes = {k: v for k, v in _overrides(args).items()}
        changes.update({k: getattr(args, k) for k in ("model", "tasks") if getattr(args, k)})
        config = config.updated(**changes)
    else:
        if not args.method:
            raise ConfigError("evaluate needs --run RUN_DIR, or --method with --model and --tasks")
        base = {k: getattr(args, k) for k in ("method", "model", "tasks") if getattr(args, k)}
        config = _config(args, base)
        from .methods import TRAINABLE

        if config.method in TRAINABLE:
            raise ConfigError(f"method {config.method!r} needs training: evaluate it with --run RUN_DIR")
    result = evaluate_run(config, args.run, progress=not args.quiet, out=args.out, split=args.split)
    _print_summary(result)
    return 0


def _cmd_predict(args) -> int:
    from .train.predict import predict_file

    predict_file(Path(args.run), Path(args.support), Path(args.query), args.out, args.num_samples, progress=not args.quiet)
    return 0


def _cmd_benchmark(args) -> int:
    from .presets import get_preset, synthetic_task_folder
    from .train.benchmark import run_benchmark

    preset = get_preset(args.preset)
    base = dict(preset.config)
    if preset.synthetic is not None and not args.tasks:
        base["tasks"] = str(synthetic_task_folder(Path(args.out) / "tasks", **preset.synthetic))
    config = _config(args, base)
    seeds = range(args.seeds if args.seeds is not None else preset.seeds)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    _, table = run_benchmark(config, args.methods or preset.methods, list(seeds), args.out, progress=not args.quiet,
                             reference=args.reference)
    print(table)
    return 0


def _cmd_compare(args) -> int:
    from .eval.compare import (format_comparison, format_summary, load_predictions, paired_comparison,
                               summarize)

    if args.resamples < 10:
        raise ValueError(f"--resamples must be >= 10, got {args.resamples}")
    if args.ece_bins < 1:
        raise ValueError(f"--ece-bins must be >= 1, got {args.ece_bins}")
    if args.out:
        from .train.benchmark import write_comparison

        table, comparison = write_comparison(Path(args.out), [Path(p) for p in args.paths], args.reference, args.ece_bins,
                                             args.seed, args.resamples)
    else:
        preds = load_predictions(args.paths)
        table = format_summary(summarize(preds, args.ece_bins, args.resamples, args.seed), args.ece_bins)
        reference = args.reference
        if reference not in preds:
            raise ValueError(f"--reference {reference!r} has no predictions here; methods found: {sorted(preds)}")
        comparison = format_comparison(paired_comparison(preds, reference, args.ece_bins, args.resamples, args.seed))
    print(table)
    print(comparison)
    return 0


def _print_summary(result: dict) -> None:
    m = result["pooled"]
    print(json.dumps({"method": result["method"], "accuracy": round(m["accuracy"], 4), "nll": round(m["nll"], 4),
                      "brier": round(m["brier"], 4), "ece": round(m["ece"], 4), "ece_floor": round(m["ece_floor"], 4),
                      "n": m["n"], "num_tasks": result["macro"]["num_tasks"],
                      "wall_time_s": round(result["wall_time_s"], 1)}))


COMMANDS = {"data": _cmd_data, "train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
            "benchmark": _cmd_benchmark, "compare": _cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError, ModuleNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"abmll: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
