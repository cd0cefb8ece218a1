"""The ``drdo`` command line: one tool for the whole pipeline.

    drdo sft            --model M --data D --output-dir OUT          # stage 1: SFT on chosen responses
    drdo oracle train   --model M --data D --output-dir ORACLE       # stage 2: Oracle reward model (Eq. 5)
    drdo oracle score   --reward-model ORACLE [R2 R3] --data D --output SCORED.jsonl
    drdo reflogps       --model REF --data D --output WITH_REF.jsonl  # for DPO / e-DPO
    drdo train --loss drdo|dpo|edpo --model SFT --data SCORED.jsonl --output-dir OUT
    drdo eval           --policy drdo=OUT --policy dpo=OUT2 --prompts P.jsonl --judge JUDGE
    drdo demo           ...                                           # see drdo/demo/run.py

Every subcommand takes ``--config file.yaml`` (keys = flag names with '_' or '-');
flags given on the command line override the file, the file overrides the defaults.
Multi-GPU: ``torchrun --nproc_per_node N -m drdo.cli train ...``.

Exit status: 0 done (or, for training, already done: the output directory holds the same run,
complete), 2 a usage error or a known failure (bad data, unusable output directory,
corrupt checkpoint, divergence, disk full, ...: one ``drdo: error:`` line on stderr; ``drdo --debug
COMMAND ...`` shows the traceback instead), 130 interrupted by Ctrl-C and 143 by SIGTERM (training
saves a checkpoint first); anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import json
import os
import signal
import sys
import time

from drdo.config import (
    FIELD_NAMES,
    STUDENT_STAGES,
    ConfigError,
    EvalConfig,
    RefLogpsConfig,
    ScoreConfig,
    TrainConfig,
    add_config_flags,
    check_threads,
    load_yaml,
)
from drdo.demo.run import add_arguments as add_demo_arguments
from drdo.hub import require_model_source
from drdo.process_settings import quiet_libraries, torch_threads

#: How long ``drdo demo`` takes; the README says the same (tests/test_readme_table.py checks it). Measured
#: on 2 idle CPU cores (AMD EPYC, 2026-11-28): the default run 2 min 35 s, --quick 25 s.
DEMO_TIME = "about 2.5 min on 2 CPU cores, no download; `drdo demo --quick` (a smoke run): under 30 s"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" after each flag's help unless X is None (those helps say what None means)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (flags override it)")


def _add_train_flags(parser: argparse.ArgumentParser, stages: tuple[str, ...]) -> None:
    _add_flags(parser, TrainConfig, stages)


def _add_flags(parser: argparse.ArgumentParser, cls, stages: tuple[str, ...] | None = None) -> None:
    add_config_flags(parser, cls, stages)
    _add_config_flag(parser)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its leaf subparsers by command path ("sft", "oracle train", ...)."""
    parser = argparse.ArgumentParser(prog="drdo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    leaves: dict[str, argparse.ArgumentParser] = {}

    def leaf(container, name, help_text, path):
        p = container.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        p.set_defaults(command_path=path)
        leaves[path] = p
        return p

    _add_train_flags(leaf(sub, "sft", "stage 1: supervised fine-tuning on the chosen responses", "sft"), ("sft",))
    oracle = sub.add_parser("oracle", help="train an Oracle reward model, or score data with reward models")
    oracle_sub = oracle.add_subparsers(dest="oracle_command", metavar="{train,score}")
    groups = {"oracle": oracle}
    _add_train_flags(leaf(oracle_sub, "train", "stage 2: train the Oracle reward model (paper Eq. 5)", "oracle train"),
                     ("oracle",))
    _add_flags(leaf(oracle_sub, "score", "score every pair with reward model(s): adds oracle_chosen/"
                                                "oracle_rejected", "oracle score"), ScoreConfig)
    t = leaf(sub, "train", "stage 3: train a student with DRDO (Eq. 6) or a baseline (DPO, e-DPO)", "train")
    t.add_argument("--loss", dest="stage", choices=STUDENT_STAGES, default="drdo", help="training objective")
    _add_train_flags(t, STUDENT_STAGES)
    _add_flags(leaf(sub, "reflogps", "precompute reference log-probs for DPO / e-DPO", "reflogps"), RefLogpsConfig)
    _add_flags(leaf(sub, "eval", "sample from policies; expected judge reward and pairwise win rates", "eval"),
               EvalConfig)
    demo = leaf(sub, "demo", f"end-to-end demo on a synthetic task (drdo/demo/run.py): {DEMO_TIME}", "demo")
    add_demo_arguments(demo)
    leaves.update({f"{name} (group)": p for name, p in groups.items()})
    return parser, leaves


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` YAML becomes the subcommand's defaults (flags still win)."""
    parser, leaves = build_parser()
    args = parser.parse_args(argv)
    path = getattr(args, "command_path", None)
    if path is None:  # no subcommand (or `drdo oracle` alone): show the relevant help
        leaves.get(f"{args.command} (group)", parser).print_help(sys.stderr)
        raise SystemExit(2)
    if getattr(args, "config", None):
        values = load_yaml(args.config)
        p = leaves[path]
        dests = {a.dest for a in p._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {args.config} for `drdo {path}`")
        for action in p._actions:  # argparse never converts a default: "no" would read as true
            value = values.get(action.dest)
            if isinstance(action, argparse.BooleanOptionalAction) and action.dest in values \
                    and not isinstance(value, bool):
                raise ConfigError(f"{action.dest} in {args.config} must be true or false, got {value!r}")
        p.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig for sft / oracle train / train from parsed args."""
    stage = {"sft": "sft", "oracle train": "oracle"}.get(args.command_path, getattr(args, "stage", "drdo"))
    values = {k: getattr(args, k) for k in FIELD_NAMES if hasattr(args, k)}
    values["stage"] = stage
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- commands


def _run_train(args) -> int:
    from drdo.training.loop import train

    result = train(train_config_from_args(args))
    if result.get("status") == "interrupted":
        print(f"interrupted: checkpoint saved to {result.get('checkpoint')}; continue with --resume", file=sys.stderr)
        return 128 + result.get("signal", signal.SIGINT)
    if result.get("status") == "finished":
        print(f"{result['output_dir']} already holds this run, complete: nothing to train (pass --overwrite to "
              "train it again)")
        return 0
    print(f"saved to {result['output_dir']}")
    return 0


def _run_score(args) -> int:
    from drdo.pipeline.scoring import score_dataset

    _require(args, "reward_models", "--reward-model", "data", "--data", "output", "--output")
    for name in args.reward_models:
        require_model_source(name, "--reward-model")
    path = score_dataset(args.reward_models, args.data, args.output, batch_size=args.batch_size,
                         max_length=args.max_length, max_prompt_length=args.max_prompt_length, split=args.split,
                         skip_invalid=args.skip_invalid, trust_remote_code=args.trust_remote_code,
                         device=args.device, progress=args.progress)
    print(path)
    return 0


def _run_reflogps(args) -> int:
    from drdo.pipeline.reflogps import compute_reference_logps

    _require(args, "data", "--data", "output", "--output")
    require_model_source(args.model, "--model")
    require_model_source(args.tokenizer, "--tokenizer")
    path = compute_reference_logps(args.model, args.data, args.output, batch_size=args.batch_size,
                                   max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                   tokenizer=args.tokenizer, kernel=args.kernel, split=args.split,
                                   skip_invalid=args.skip_invalid, trust_remote_code=args.trust_remote_code,
                                   device=args.device, seed=args.seed, progress=args.progress)
    print(path)
    return 0


def _run_eval(args) -> int:
    from drdo.data import load_prompts
    from drdo.pipeline.evaluate import evaluate, generations_path, parse_policies

    _require(args, "policies", "--policy", "prompts", "--prompts", "judge", "--judge")
    policies = parse_policies(args.policies)
    for path in policies.values():
        require_model_source(path, "--policy")
    if ":" not in args.judge or os.path.exists(args.judge):
        require_model_source(args.judge, "--judge")
    output = args.output or default_eval_output()
    prompts = load_prompts(args.prompts, split=args.split)
    if args.num_prompts is not None:
        prompts = prompts[: args.num_prompts]
    report = evaluate(policies, prompts, args.judge, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                      max_prompt_length=args.max_prompt_length, trust_remote_code=args.trust_remote_code,
                      device=args.device, progress=args.progress, output=output)
    summary = {k: v for k, v in report.items() if k != "generations"}
    print(json.dumps(summary, indent=2))
    print(f"report: {output}\ngenerations: {generations_path(output)}", file=sys.stderr)
    return 0


def default_eval_output() -> str:
    """Where ``drdo eval`` writes its report without ``--output``: runs/eval-<date>-<time>/report.json."""
    return os.path.join("runs", time.strftime("eval-%Y%m%d-%H%M%S"), "report.json")


def _run_demo(args) -> int:
    from drdo.demo.run import run_demo

    return int(run_demo(args) or 0)


def _require(args, *pairs) -> None:
    missing = [flag for dest, flag in zip(pairs[::2], pairs[1::2]) if not getattr(args, dest, None)]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")


_COMMANDS = {"sft": _run_train, "oracle train": _run_train, "train": _run_train, "oracle score": _run_score,
             "reflogps": _run_reflogps, "eval": _run_eval, "demo": _run_demo}


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a failed run, not a bug: reported as one ``drdo: error:`` line."""
    from drdo.data import DataSourceError, EmptyDatasetError, InvalidExampleError, MissingFieldError
    from drdo.models import ModelFormatError
    from drdo.pipeline.evaluate import JudgeError
    from drdo.pipeline.scoring import RewardModelError
    from drdo.training.checkpoint import CheckpointError
    from drdo.training.loop import TrainingDiverged
    from drdo.training.rundir import OutputDirError

    return (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError,
            RewardModelError, JudgeError, MissingFieldError, InvalidExampleError, EmptyDatasetError,
            ModelFormatError, OutputDirError, DataSourceError, PermissionError, IsADirectoryError,
            NotADirectoryError)


def _error_line(e: BaseException) -> str | None:
    """The one-line message of a known failure, or None for an unexpected error (a bug)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device: {e.filename or e}"
    if isinstance(e, _known_errors()):
        return " ".join(str(e).split("\n")) if str(e) else type(e).__name__
    return None


@contextlib.contextmanager
def _drdo_logging():
    """drdo's own INFO messages (resume, dropped rows) on stderr while a command runs; other
    libraries stay at WARNING. The logger is restored afterwards, so calling main() in-process
    (tests, notebooks) leaves the caller's logging as it was."""
    logger = logging.getLogger("drdo")
    if logger.handlers:  # configured by the caller: leave it alone
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``drdo`` console script; returns the exit status."""
    with _drdo_logging():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        check_threads(getattr(args, "threads", None))
        with torch_threads(getattr(args, "threads", None)), quiet_libraries(not getattr(args, "progress", True)):
            return _COMMANDS[args.command_path](args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("drdo: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = _error_line(e)
        if line is None or debug:
            raise
        print(f"drdo: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
