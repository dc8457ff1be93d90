"""The ``abmll`` command line: every command's arguments, each with its help text (and choices where the
set of values is closed). The commands themselves are in :mod:`abmll_pyro.cli`.

Every :class:`~abmll_pyro.train.config.RunConfig` key is a flag (``kl_beta`` is ``--kl-beta``), its help
from :data:`~abmll_pyro.train.config_help.KEY_HELP` and its choices from
:data:`~abmll_pyro.train.config.CHOICES`; ``null`` or ``none`` sets an optional key to null.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Sequence

__all__ = ["build_parser", "MAIN_FLAGS"]

MAIN_FLAGS = ("seed", "steps", "kl_beta", "kl_gamma", "rank", "lora_alpha", "num_inner_steps", "inner_lr", "outer_lr",
              "shots", "query_size", "eval_query_size", "tasks_per_step", "num_samples", "prior", "guide",
              "score_reduction", "report_to")

_OVERWRITE = "replace what --out holds (by default a writer refuses anything it did not write itself)"
_OVERWRITE_FOLDER = "write into a folder that holds other files"
_TRUST = "allow the run's config to import plug-in files (it runs their code)"
_TRUNK_HELP = ("share the frozen trunk's hidden states (the blocks below the adapted ones) with other runs "
               "through this folder (safe for several processes; results do not depend on who filled it)")
_CONFIG = "YAML or JSON file of config keys (flags override it)"
_QUIET = "no progress bars"


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``) for a flag's value."""
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "1", "yes")


def _flag_type(annotation: str):
    base = annotation.replace(" | None", "")
    kind = {"int": int, "float": float, "str": str, "bool": parse_bool}.get(base)
    if base.startswith("tuple"):
        return "list"
    return _none_or(kind) if "None" in annotation else kind


def _add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    from .train.config import CHOICES, RunConfig
    from .train.config_help import KEY_HELP

    main = parser.add_argument_group("main settings")
    more = parser.add_argument_group("more settings (every config key)")
    for f in fields(RunConfig):
        if f.name in skip:
            continue
        group = main if f.name in MAIN_FLAGS else more
        kind = _flag_type(str(f.type))
        flag = "--" + f.name.replace("_", "-")
        text = f"{KEY_HELP[f.name]} (default {f.default!r})" if not callable(f.default) else KEY_HELP[f.name]
        choices = CHOICES.get(f.name)
        if kind == "list":  # absent flags leave no attribute, so an explicit null (--max-length null) is kept
            if choices is not None:  # (argparse would print the whole set twice in the usage line)
                text = f"{text}; one or more of: {', '.join(choices)}"
            group.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS, choices=choices,
                               metavar="NAME", help=text)
        else:
            metavar = "{true,false}" if kind is parse_bool else (f.name.upper() if choices is None else None)
            group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, choices=choices,
                               metavar=metavar, help=text)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``abmll: error: ... (see abmll train --help)``."""

    def __init__(self, *args, **kwargs):  # no prefix matching: --ste is not --steps (subparsers too)
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"abmll: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="abmll", description="Amortized Bayesian Meta-Learning for LoRA (ABMLL) and baselines.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (also accepted after the command)")
    parser.add_argument("--version", action="version", version=f"abmll {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                help="run abmll COMMAND --help for its flags")
    _data_parser(sub)
    _train_parser(sub)
    _evaluate_parser(sub)
    _predict_generate_parsers(sub)
    _export_parser(sub)
    _benchmark_parser(sub)
    _compare_parser(sub)
    _quiet_everywhere(sub)
    return parser


def _count(minimum: int):
    """argparse type: an integer of at least ``minimum`` (otherwise argparse's one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="prepare task data")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION", title="actions",
                               help="run abmll data ACTION --help for its flags")
    prep = dsub.add_parser("prepare", help="fetch and convert a task suite into the cache")
    prep.add_argument("suite", choices=["bigbench", "debian-cls", "bigbench-gen"], help="the task suite to prepare")
    prep.add_argument("--force", action="store_true", help="rebuild even if prepared")
    prep.add_argument("--from", dest="source", metavar="PATH",
                      help="bigbench, bigbench-gen: a local BIG-bench checkout, source tree or .tar.gz archive "
                           "(the package index no longer serves bigbench 1.0.0)")
    prep.add_argument("--mirror", metavar="URL",
                      help="debian-cls: fetch the pinned .deb files by URL from this Debian archive mirror (the "
                           "base URL holding pool/ and dists/) instead of apt-get; default $ABMLL_DEBIAN_MIRROR")
    syn = dsub.add_parser("synthetic", help="write the generated task set of the smoke preset")
    syn.add_argument("--out", required=True, metavar="DIR", help="the task folder to write")
    syn.add_argument("--overwrite", action="store_true", help=_OVERWRITE_FOLDER)
    syn.add_argument("--num-train", dest="num_train", type=_count(0), default=6, metavar="N",
                     help="training tasks (default 6)")
    syn.add_argument("--num-test", dest="num_test", type=_count(1), default=3, metavar="N", help="test tasks (default 3)")
    syn.add_argument("--examples", type=_count(1), default=16, metavar="N", help="examples per task (default 16)")
    syn.add_argument("--seed", type=int, default=0, help="the generator's seed (default 0)")


def _train_parser(sub) -> None:
    from .methods import TRAINABLE

    train = sub.add_parser("train", help="meta-train a method; evaluates on the test tasks at the end")
    train.add_argument("--method", choices=list(TRAINABLE),
                       help="the method to train (default: the --config file's method; required without one)")
    train.add_argument("--model", help="smollm2-135m, tiny-llama, tiny-qwen2, tiny-gpt2, llama3-8b-proxy(-2l), "
                                       "or a HF id/path")
    train.add_argument("--tasks", help="bigbench, debian-cls, a task-folder path, or a CrossFit/MetaICL split name")
    train.add_argument("--out", metavar="RUN_DIR", help="the new run directory")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest intact "
                       "checkpoint (may change only: steps to extend it, num_threads, checkpoint_every, "
                       "keep_checkpoints, log_every, device, report_to)")
    train.add_argument("--overwrite", action="store_true", help="replace a finished or checkpointed run in --out")
    train.add_argument("--trust-plugins", action="store_true",
                       help="with --resume: allow the run's config to import plug-in files (it runs their code)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: continue although the run's config.json was edited since its checkpoint "
                            "(the change is recorded in log.txt)")
    train.add_argument("--config", metavar="FILE", help=_CONFIG + "; a run's config.json repeats that run")
    train.add_argument("--trunk-dir", dest="trunk_dir", metavar="DIR", help=_TRUNK_HELP)
    _add_config_flags(train, skip=("method", "model", "tasks"))


def _evaluate_parser(sub) -> None:
    from .methods import METHODS

    ev = sub.add_parser("evaluate", help="adapt on each test task's support set, score its query set")
    ev.add_argument("--run", metavar="RUN_DIR", help="a trained run directory")
    ev.add_argument("--method", choices=list(METHODS), help="an untrained method (pretrained, icl) without --run")
    ev.add_argument("--model", help="the model of an untrained method (as train's --model)")
    ev.add_argument("--tasks", help="the task source (as train's --tasks; default: the run's)")
    ev.add_argument("--split", choices=["test", "dev"], default="test", help="the tasks to evaluate on (default test)")
    ev.add_argument("--out", metavar="FILE", help="write the result JSON here (default: print only)")
    ev.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    ev.add_argument("--config", metavar="FILE", help=_CONFIG)
    ev.add_argument("--trust-plugins", action="store_true", help=_TRUST)
    ev.add_argument("--trunk-dir", dest="trunk_dir", metavar="DIR", help=_TRUNK_HELP)
    _add_config_flags(ev, skip=("method", "model", "tasks", "report_to"))  # (evaluation logs no steps)


def _predict_generate_parsers(sub) -> None:
    pr = sub.add_parser("predict", help="adapt to a new task and write the query's option probabilities")
    pr.add_argument("--run", metavar="RUN_DIR", required=True, help="a trained run directory")
    pr.add_argument("--support", required=True, metavar="JSONL", help="labelled examples (input, options, output)")
    pr.add_argument("--query", required=True, metavar="JSONL", help="examples (input, options; output optional)")
    pr.add_argument("--out", metavar="FILE", help="output JSONL (default: stdout)")
    pr.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    pr.add_argument("--num-samples", dest="num_samples", type=int, metavar="N",
                    help="posterior draws per prediction (default: the run's)")
    pr.add_argument("--trust-plugins", action="store_true", help=_TRUST)

    gen = sub.add_parser("generate", help="adapt to a support set and sample answers per prompt from the posterior")
    gen.add_argument("--run", metavar="RUN_DIR", required=True, help="a trained run directory")
    gen.add_argument("--support", required=True, metavar="JSONL",
                     help="task lines (input, target) or (input, options, output)")
    gen.add_argument("--prompts", required=True, metavar="JSONL", help="prompts (input; target optional)")
    gen.add_argument("--num-samples", dest="num_samples", type=int, default=8, metavar="N",
                     help="posterior draws per prompt (default 8)")
    gen.add_argument("--out", metavar="FILE", help="output JSONL (default: stdout)")
    gen.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    gen.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32, metavar="N",
                     help="tokens generated per answer at most (default 32)")
    gen.add_argument("--do-sample", dest="do_sample", type=parse_bool, default=False, metavar="{true,false}",
                     help="sample tokens (default false: greedy)")
    gen.add_argument("--temperature", type=float, default=1.0, help="softmax temperature when sampling (default 1.0)")
    gen.add_argument("--top-p", dest="top_p", type=float, default=1.0,
                     help="nucleus sampling: the smallest token set of this probability (default 1.0: all)")
    gen.add_argument("--stop", nargs="*", default=["\n"], metavar="TEXT", help="stop strings (default: newline)")
    gen.add_argument("--seed", type=int, help="the seed of the posterior draws (default: the run's seed)")
    gen.add_argument("--trust-plugins", action="store_true", help=_TRUST)


def _export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write θ's mean, or a support set's adapted mean, as a PEFT LoRA adapter")
    ex.add_argument("--run", metavar="RUN_DIR", required=True, help="a trained abmll, lora or reptile run directory")
    ex.add_argument("--support", metavar="JSONL", help="task lines: export this task's adapted posterior mean")
    ex.add_argument("--format", dest="fmt", choices=["peft"], default="peft", help="the adapter format (default peft)")
    ex.add_argument("--out", required=True, metavar="DIR", help="the adapter folder (new or empty)")
    ex.add_argument("--overwrite", action="store_true", help="write into a folder that holds files (another adapter)")
    ex.add_argument("--seed", type=int, help="the seed of the adaptation (default: the run's seed)")
    ex.add_argument("--trust-plugins", action="store_true", help=_TRUST)


def _benchmark_parser(sub) -> None:
    from .methods import METHODS
    from .presets import PRESETS

    bench = sub.add_parser("benchmark", help="every method on the same splits, budgets and seeds")
    bench.add_argument("--preset", choices=list(PRESETS), required=True,
                       help="the model, tasks, budgets and methods: smoke (about 2 minutes), cpu (the main job, "
                            "about 16 minutes on 2 cores), cpu-long, paper (GPU)")
    bench.add_argument("--out", required=True, metavar="DIR", help="the benchmark folder (new or empty)")
    bench.add_argument("--overwrite", action="store_true", help=_OVERWRITE_FOLDER)
    bench.add_argument("--methods", nargs="+", choices=[*METHODS, "all"],
                       help="the methods to run (default: the preset's; 'all': every method)")
    bench.add_argument("--seeds", type=int, metavar="N", help="number of seeds (0..N-1; default: the preset's)")
    bench.add_argument("--reference", default="abmll", metavar="METHOD",
                       help="the method every other is compared against (default abmll)")
    bench.add_argument("--jobs", type=int, metavar="N",
                       help="run this many (method, seed) runs at once, each in its own process with the config's "
                            "num_threads (default: the preset's; 1 under torchrun / accelerate launch); the results "
                            "do not depend on it")
    bench.add_argument("--trunk-dir", dest="trunk_dir", metavar="DIR",
                       help="the folder the runs share the frozen trunk's hidden states in (default: "
                            "OUT/trunk-cache, deleted when every run has finished; a folder given here is kept; "
                            "'none': each run keeps its own, in memory)")
    bench.add_argument("--config", metavar="FILE", help=_CONFIG + " (applied over the preset's)")
    _add_config_flags(bench, skip=("method", "seed"))


def _compare_parser(sub) -> None:
    cmp_ = sub.add_parser("compare", help="paired differences with 95%% bootstrap CIs from runs' predictions")
    cmp_.add_argument("paths", nargs="+", metavar="RUN_OR_BENCH_DIR",
                      help="run directories, benchmark directories or predictions.jsonl files")
    cmp_.add_argument("--reference", default="abmll", metavar="METHOD",
                      help="the method every other is compared against (default abmll)")
    cmp_.add_argument("--ece-bins", dest="ece_bins", type=int, default=15, metavar="N",
                      help="equal-width confidence bins of ECE (default 15)")
    cmp_.add_argument("--resamples", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    cmp_.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    cmp_.add_argument("--names", nargs="+", metavar="NAME",
                      help="one label per path, replacing the method names in the files (compare two runs of one method)")
    cmp_.add_argument("--tasks", nargs="+", metavar="TASK", dest="only_tasks",
                      help="only these tasks (e.g. the test tasks with headroom)")
    cmp_.add_argument("--tasks-file", dest="tasks_file", metavar="FILE",
                      help="only the tasks listed in this file (one per line; # starts a comment)")
    cmp_.add_argument("--out", metavar="DIR",
                      help="also write comparison.md, comparison.json and table.md into this directory")
    cmp_.add_argument("--overwrite", action="store_true", help=_OVERWRITE_FOLDER)
    cmp_.add_argument("--target", metavar="BASELINE",
                      help="check the claim 'reference NLL <= --nll-ratio x and ECE <= --ece-ratio x BASELINE's, "
                           "resolved, accuracy within 1 SE', and whether its ECE is reachable at this n "
                           "(with --out also target.md, target.json)")
    cmp_.add_argument("--nll-ratio", dest="nll_ratio", type=float, default=0.7, help="with --target (default 0.7)")
    cmp_.add_argument("--ece-ratio", dest="ece_ratio", type=float, default=0.5, help="with --target (default 0.5)")


def _quiet_everywhere(sub: argparse._SubParsersAction) -> None:
    """``--quiet`` after any command too (``abmll train ... --quiet``), not only before it."""
    for command in sub.choices.values():
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=_QUIET)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _quiet_everywhere(action)
