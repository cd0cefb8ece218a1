"""The ``drdo`` command line: one tool for the whole pipeline.

    drdo sft            --model M --data D --output-dir OUT          # stage 1: SFT on chosen responses
    drdo oracle train   --model M --data D --output-dir ORACLE       # stage 2: Oracle reward model (Eq. 5)
    drdo oracle score   --reward-model ORACLE [R2 R3] --data D --output SCORED.jsonl
    drdo reflogps       --model REF --data D --output WITH_REF.jsonl  # for DPO / e-DPO
    drdo train --loss drdo|dpo|edpo --model SFT --data SCORED.jsonl --output-dir OUT
    drdo eval           --policy drdo=OUT --policy dpo=OUT2 --prompts P.jsonl --judge JUDGE
    drdo demo           ...                                           # see drdo demo --help

Every subcommand takes ``--config file.yaml`` (keys = the flag names of its --help, with '_' or '-';
a training run's own config.yaml is accepted back); flags given on the command line override the
file, the file overrides the defaults.
Multi-GPU: ``torchrun --nproc_per_node N -m drdo.cli train ...`` (the ranks wait for each other
for DRDO_DIST_START_TIMEOUT seconds at start-up, default 60). ``drdo --version``: the version.

Exit status: 0 done (or, for training, already done: the output directory holds the same run,
complete), 2 a usage error or a known failure (bad data, unusable output directory,
corrupt checkpoint, divergence, disk full, ...: one ``drdo: error:`` line on stderr; ``drdo --debug
COMMAND ...`` shows the traceback before it), 130 interrupted by Ctrl-C and 143 by SIGTERM (training
saves a checkpoint first); anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import re
import signal
import sys
import traceback

from drdo import __version__
from drdo.config import (
    FIELD_NAMES,
    STUDENT_STAGES,
    ConfigError,
    DeprecatedFlag,
    EvalConfig,
    RefLogpsConfig,
    ScoreConfig,
    TrainConfig,
    add_config_flags,
    check_threads,
    load_yaml,
)
from drdo.demo.run import add_arguments as add_demo_arguments
from drdo.errors import shown
from drdo.process_settings import quiet_libraries, torch_threads


def plain_text(text: str) -> str:
    """Help text as a terminal shows it: the reST literals ``x`` of the docstrings become x."""
    return re.sub(r"``(.+?)``", r"\1", text, flags=re.S)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" after each flag's help unless X is None (those helps say what None means),
    and the docstrings' ``literals`` plainly."""

    def _fill_text(self, text, width, indent):
        return super()._fill_text(plain_text(text), width, indent)

    def _get_help_string(self, action):
        text = plain_text(action.help or "")
        if action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings \
                and not isinstance(action, argparse._VersionAction):
            text += " (default: %(default)s)"
        return text


def _show_demo_defaults(parser: argparse.ArgumentParser) -> None:
    """``drdo demo``'s flags default to None (the setting's default, or --quick's value): their help
    shows both. A list given as one value shows as a count (--seeds N) or comma-separated (--methods)."""
    from drdo.demo.run import QUICK, DemoSettings

    def written(action, value) -> str:
        if not isinstance(value, list):
            return str(value)
        if action.nargs is None:
            return str(len(value)) if action.type is int else ",".join(map(str, value))
        return " ".join(map(str, value))

    defaults = DemoSettings()
    for action in parser._actions:
        default = getattr(defaults, action.dest, None)
        if action.default is not None or default is None or isinstance(action, DeprecatedFlag) \
                or "(default" in (action.help or ""):
            continue
        text = written(action, default)
        if action.dest in QUICK and QUICK[action.dest] != default:
            text += f"; with --quick: {written(action, QUICK[action.dest])}"
        action.help = f"{action.help} (default: {text})".replace("%", "%%")


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (flags override it)")


def _add_train_flags(parser: argparse.ArgumentParser, stages: tuple[str, ...]) -> None:
    _add_flags(parser, TrainConfig, stages)


def _add_flags(parser: argparse.ArgumentParser, cls, stages: tuple[str, ...] | None = None) -> None:
    add_config_flags(parser, cls, stages)
    _add_config_flag(parser)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its leaf subparsers by command path ("sft", "oracle train", ...)."""
    parser = argparse.ArgumentParser(prog="drdo", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"drdo {__version__}",
                        help="show drdo's version and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    leaves: dict[str, argparse.ArgumentParser] = {}

    def leaf(container, name, help_text, path):
        p = container.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        p.set_defaults(command_path=path)
        leaves[path] = p
        return p

    _add_train_flags(leaf(sub, "sft", "stage 1: supervised fine-tuning on the chosen responses", "sft"), ("sft",))
    oracle = sub.add_parser("oracle", help="train an Oracle reward model, or score data with reward models",
                            formatter_class=_Formatter)
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
    demo = leaf(sub, "demo", "end-to-end demo on a synthetic task with a known true reward (CPU, no download; "
                             "its report records how long it took)", "demo")
    add_demo_arguments(demo)
    _show_demo_defaults(demo)
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
        leaves[path].set_defaults(**config_file_values(args.config, leaves[path], path))
        args = parser.parse_args(argv)
    return args


#: The stage each training command trains (``train`` takes it from --loss).
_COMMAND_STAGES = {"sft": "sft", "oracle train": "oracle"}
_SCALARS = (str, int, float, bool, type(None))


def config_file_values(path: str, parser: argparse.ArgumentParser, command: str) -> dict:
    """The values of a ``--config`` YAML file by argparse dest, checked before argparse takes them.

    A key is a flag name of ``drdo COMMAND --help`` (``loss``, ``reward_model``) or its dest
    (``stage``, ``reward_models``), with '_' or '-'. A value is a single YAML scalar, or a list of
    them for a flag that takes several: anything else is refused before it is walked (YAML aliases can
    make a short file stand for billions of elements). The keys a training run writes into its own
    config.yaml for other stages are accepted while they hold their defaults, so that file can be
    given back."""
    actions = {}
    for action in parser._actions:
        for flag in action.option_strings:
            actions[flag.lstrip("-").replace("-", "_")] = action
        actions[action.dest] = action
    out: dict = {}
    for key, value in load_yaml(path).items():
        action = actions.get(key)
        if action is None or action.dest in ("help", "config"):
            _check_foreign_key(key, value, path, command)
            continue
        _check_shape(key, value, action, path)
        if isinstance(action, DeprecatedFlag):
            print(action.warning(f"the key {key!r} in {path}"), file=sys.stderr)
        if action.dest in out:
            raise ConfigError(f"{path} sets {action.dest} twice (as {shown(key)} and under another name)")
        out[action.dest] = value
    return out


def _check_shape(key: str, value, action: argparse.Action, path: str) -> None:
    """A list of scalars for a flag that takes several, true/false for a --x/--no-x flag, else one scalar."""
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        if not (isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value)):
            raise ConfigError(f"{key} in {path} must be a list of single values (e.g. [a, b]), got a "
                              f"{type(value).__name__}")
    elif not isinstance(value, _SCALARS):
        raise ConfigError(f"{key} in {path} must be a single value, got a {type(value).__name__}")
    elif isinstance(action, argparse.BooleanOptionalAction) and not isinstance(value, bool):
        raise ConfigError(f"{key} in {path} must be true or false, got {shown(value)}")  # argparse never converts it


def _check_foreign_key(key: str, value, path: str, command: str) -> None:
    """ConfigError for a key the command does not take, unless a training run's config.yaml holds it
    at a value that changes nothing: the command's own stage, or another stage's default."""
    field = next((f for f in dataclasses.fields(TrainConfig) if f.name == key), None)
    training = command in _COMMAND_STAGES or command == "train"
    if field is None or not training:
        raise ConfigError(f"unknown key {shown(key)} in {path} for `drdo {command}`; the keys are the flag names "
                          f"of `drdo {command} --help`")
    if key == "stage":
        if value != _COMMAND_STAGES.get(command):
            raise ConfigError(f"{path} is a config of the {shown(value)} stage, not of `drdo {command}`")
        return
    if value != field.default:  # TrainConfig has no list fields: every default is a plain value
        raise ConfigError(f"{key}: {shown(value)} in {path} is not used by `drdo {command}`; remove it")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig for sft / oracle train / train from parsed args."""
    stage = _COMMAND_STAGES.get(args.command_path, getattr(args, "stage", "drdo"))
    values = {k: getattr(args, k) for k in FIELD_NAMES if hasattr(args, k)}
    values["stage"] = stage
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- commands


def _run_train(config: TrainConfig) -> int:
    from drdo.training.loop import train

    result = train(config)
    status = result.get("status")
    if result.get("rank", 0) != 0:  # under torchrun, rank 0 speaks for the run
        return 128 + result.get("signal", signal.SIGINT) if status == "interrupted" else 0
    if status == "interrupted":
        print(f"interrupted: checkpoint saved to {result.get('checkpoint')}; continue with --resume", file=sys.stderr)
        return 128 + result.get("signal", signal.SIGINT)
    if status == "finished":
        print(f"{result['output_dir']} already holds this run, complete: nothing to train (pass --overwrite to "
              "train it again)")
        return 0
    print(f"saved to {result['output_dir']}")
    return 0


def _run_score(config: ScoreConfig) -> int:
    from drdo.pipeline.scoring import score_dataset, scored_summary

    output = score_dataset(config)
    summary = scored_summary(output)
    models = f"{summary['models']} reward models (margins averaged)" if summary["models"] > 1 else "1 reward model"
    print(f"scored {summary['pairs']} pairs with {models}: mean margin (chosen - rejected) "
          f"{summary['mean_margin']:.4g}, chosen preferred in {100 * summary['chosen_preferred']:.1f}% of pairs")
    print(f"saved to {output}")
    return 0


def _run_reflogps(config: RefLogpsConfig) -> int:
    from drdo.pipeline.reflogps import compute_reference_logps

    print(compute_reference_logps(config))
    return 0


def _run_eval(config: EvalConfig) -> int:
    from drdo.pipeline.evaluate import generations_path, report_summary, run_eval

    report, output = run_eval(config)
    print("\n".join(report_summary(report)))
    print(f"report (with every per-prompt score): {output}\ngenerations: {generations_path(output)}")
    return 0


def _run_demo(settings) -> int:
    from drdo.demo.run import run_demo

    return int(run_demo(settings) or 0)


def _demo_settings(args: argparse.Namespace):
    from drdo.demo.run import settings_from_args

    return settings_from_args(args)


def _options(cls):
    """args -> the command's options dataclass ``cls``, every field from its flag."""
    return lambda args: cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


#: Each command: the dataclass its flags parse into, and what runs with it, passed whole.
_COMMANDS = {
    "sft": (train_config_from_args, _run_train),
    "oracle train": (train_config_from_args, _run_train),
    "train": (train_config_from_args, _run_train),
    "oracle score": (_options(ScoreConfig), _run_score),
    "reflogps": (_options(RefLogpsConfig), _run_reflogps),
    "eval": (_options(EvalConfig), _run_eval),
    "demo": (_demo_settings, _run_demo),
}


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a failed run, not a bug: reported as one ``drdo: error:`` line."""
    from drdo.data import DataSourceError, EmptyDatasetError, InvalidExampleError, MissingFieldError
    from drdo.models import ModelFormatError
    from drdo.pipeline.evaluate import JudgeError
    from drdo.pipeline.scoring import RewardModelError
    from drdo.tokenizer import TokenizerError
    from drdo.training.checkpoint import CheckpointError
    from drdo.training.distributed import DistributedStartError
    from drdo.training.loop import TrainingDiverged
    from drdo.training.rundir import OutputDirError

    return (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError, DistributedStartError,
            RewardModelError, JudgeError, MissingFieldError, InvalidExampleError, EmptyDatasetError,
            ModelFormatError, OutputDirError, DataSourceError, PermissionError, IsADirectoryError,
            NotADirectoryError, TokenizerError)


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
        build, run = _COMMANDS[args.command_path]
        config = build(args)
        check_threads(getattr(config, "threads", None))
        with torch_threads(getattr(config, "threads", None)), quiet_libraries(not getattr(config, "progress", True)):
            return run(config)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    except KeyboardInterrupt as e:  # Ctrl-C, or training's second SIGINT/SIGTERM (RunAborted says which)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"drdo: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        line = _error_line(e)
        if line is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"drdo: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
