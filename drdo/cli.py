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

Exit status: 0 done, 1 failure (message on stderr), 2 usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import json
import sys

from drdo.config import FIELD_NAMES, KERNELS, PRECISIONS, REWARDS, UNLIKELIHOODS, ConfigError, TrainConfig, load_yaml

# Help of the training flags; the default is appended from TrainConfig.
_TRAIN_HELP = {
    "model": "policy to train: a local directory, a hub id, or 'tiny' (built-in tiny model)",
    "tokenizer": "tokenizer to use (default: the one of --model)",
    "data": "preference data: .jsonl/.json/.parquet file or hub dataset id",
    "output_dir": "where the checkpoint, metrics.jsonl, config.yaml and training_curves.png go",
    "split": "dataset split (hub datasets)",
    "max_steps": "optimizer steps (default: 1000 for train; one epoch via --num-epochs for sft/oracle)",
    "num_epochs": "epochs when --max-steps is not given",
    "batch_size": "GLOBAL pairs per optimizer step (all ranks, all accumulation steps)",
    "micro_batch_size": "pairs per rank per forward pass",
    "lr": "peak learning rate (default: 5e-6; 1e-5 for oracle train)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "warmup_steps": "linear warm-up steps (default: --warmup-ratio of the steps)",
    "warmup_ratio": "warm-up fraction of the steps when --warmup-steps is not given",
    "min_lr_ratio": "cosine floor as a fraction of --lr",
    "max_grad_norm": "gradient clipping norm (0: no clipping)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "max_length": "max tokens of prompt + response",
    "max_prompt_length": "max prompt tokens (left-truncated)",
    "shuffle": "shuffle the data each epoch",
    "skip_invalid": "drop invalid rows instead of failing",
    "alpha": "DRDO weight of the focal preference term",
    "gamma": "DRDO focal exponent",
    "beta": "DPO/e-DPO beta (default 0.1); DRDO --reward implicit scale (default 1.0)",
    "reward": "DRDO student reward: a linear 'head' or the 'implicit' beta*log pi",
    "unlikelihood": "DRDO unlikelihood term: 'welleck' (lowers pi(y_l)) or 'paper' (the sign as printed)",
    "oracle_alpha": "Oracle LM-regulariser weight alpha_O",
    "pessimistic": "e-DPO: max over ensemble members (else mean); with gradient accumulation the max is taken "
                   "per micro-batch",
    "kernel": "loss path: fused drdo_kernels (auto/triton/torch) or 'reference' (full logits)",
    "seed": "random seed (model head init, data order)",
    "precision": "'auto': bf16 mixed precision on GPU, fp32 on CPU",
    "gradient_checkpointing": "recompute activations in backward",
    "attn_implementation": "attention implementation passed to transformers (default: sdpa / flash_attention_2)",
    "trust_remote_code": "allow model code from the hub (off by default)",
    "save_every": "write a resumable checkpoint every N steps (0: only the final model)",
    "save_limit": "keep only the newest N step checkpoints (0: keep all)",
    "resume": "continue from the latest checkpoint in --output-dir, or from the given checkpoint directory",
    "progress": "show a progress bar",
    "plot": "write training_curves.png at the end",
}
_CHOICES = {"kernel": KERNELS, "reward": REWARDS, "unlikelihood": UNLIKELIHOODS, "precision": PRECISIONS}
_TRAIN_TYPES = {"max_steps": int, "lr": float, "beta": float, "warmup_steps": int, "tokenizer": str, "data": str,
                "output_dir": str, "attn_implementation": str}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" after each flag's help unless X is None (those helps say what None means)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (flags override it)")


def _add_train_flags(parser: argparse.ArgumentParser, skip: tuple = ()) -> None:
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip or f.name == "stage":
            continue
        default = getattr(defaults, f.name)
        kwargs = {"default": default, "help": _TRAIN_HELP.get(f.name, f.name)}
        if f.name == "resume":
            kwargs.update(nargs="?", const=True, metavar="CHECKPOINT_DIR")
        elif isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _TRAIN_TYPES.get(f.name, type(default))
            if f.name in _CHOICES:
                kwargs["choices"] = _CHOICES[f.name]
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)
    _add_config_flag(parser)


def _add_score_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward-model", dest="reward_models", nargs="+", action="extend", required=False, default=None,
                   help="reward model(s): our Oracle directory or any HF sequence-classification model with one "
                        "output; K models give K scores per response (e-DPO)")
    p.add_argument("--data", help="preference data to score")
    p.add_argument("--output", help="output JSONL (the rows plus oracle_chosen/oracle_rejected)")
    _add_inference_flags(p)


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    p.add_argument("--max-length", type=int, default=1024, help="max tokens of prompt + response")
    p.add_argument("--max-prompt-length", type=int, default=512, help="max prompt tokens")
    p.add_argument("--split", default="train", help="dataset split (hub datasets)")
    p.add_argument("--skip-invalid", action=argparse.BooleanOptionalAction, default=False,
                   help="drop invalid rows instead of failing")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow model code from the hub")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    _add_config_flag(p)


def _add_reflogps_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="reference policy (usually the SFT model): dir, hub id or 'tiny'")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    p.add_argument("--data", help="preference data")
    p.add_argument("--output", help="output JSONL (the rows plus ref_chosen_logps/ref_rejected_logps)")
    p.add_argument("--kernel", choices=KERNELS, default="auto", help="log-prob path (use the one you train with)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model")
    _add_inference_flags(p)


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", dest="policies", action="append", default=None, metavar="NAME=PATH",
                   help="a policy to evaluate (repeat for several); PATH alone uses its basename as name")
    p.add_argument("--prompts", help="data file whose 'prompt' fields are used")
    p.add_argument("--judge", help="reward-model directory, or 'module:function' taking (prompts, responses) -> scores")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--max-prompt-length", type=int, default=512, help="max prompt tokens")
    p.add_argument("--split", default="train", help="dataset split (hub datasets)")
    p.add_argument("--output", default=None, help="write the report (JSON) here; generations go to <output>.generations.jsonl")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow model code from the hub")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    _add_config_flag(p)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its leaf subparsers by command path ("sft", "oracle train", ...)."""
    parser = argparse.ArgumentParser(prog="drdo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    leaves: dict[str, argparse.ArgumentParser] = {}

    def leaf(container, name, help_text, path):
        p = container.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        p.set_defaults(command_path=path)
        leaves[path] = p
        return p

    _add_train_flags(leaf(sub, "sft", "stage 1: supervised fine-tuning on the chosen responses", "sft"))
    oracle = sub.add_parser("oracle", help="train an Oracle reward model, or score data with reward models")
    oracle_sub = oracle.add_subparsers(dest="oracle_command", metavar="{train,score}")
    groups = {"oracle": oracle}
    _add_train_flags(leaf(oracle_sub, "train", "stage 2: train the Oracle reward model (paper Eq. 5)", "oracle train"))
    _add_score_flags(leaf(oracle_sub, "score", "score every pair with reward model(s): adds oracle_chosen/"
                                                "oracle_rejected", "oracle score"))
    t = leaf(sub, "train", "stage 3: train a student with DRDO (Eq. 6) or a baseline (DPO, e-DPO)", "train")
    t.add_argument("--loss", dest="stage", choices=("drdo", "dpo", "edpo"), default="drdo", help="training objective")
    _add_train_flags(t)
    _add_reflogps_flags(leaf(sub, "reflogps", "precompute reference log-probs for DPO / e-DPO", "reflogps"))
    _add_eval_flags(leaf(sub, "eval", "sample from policies; expected judge reward and pairwise win rates", "eval"))
    demo = leaf(sub, "demo", "end-to-end demo on a synthetic task (drdo/demo/run.py)", "demo")
    _add_demo_flags(demo)
    leaves.update({f"{name} (group)": p for name, p in groups.items()})
    return parser, leaves


def _add_demo_flags(p: argparse.ArgumentParser) -> None:
    try:
        from drdo.demo.run import add_arguments
    except ImportError:
        p.set_defaults(demo_missing=True)
        return
    add_arguments(p)


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
        return 130
    return 0


def _run_score(args) -> int:
    from drdo.pipeline.scoring import score_dataset

    _require(args, "reward_models", "--reward-model", "data", "--data", "output", "--output")
    path = score_dataset(args.reward_models, args.data, args.output, batch_size=args.batch_size,
                         max_length=args.max_length, max_prompt_length=args.max_prompt_length, split=args.split,
                         skip_invalid=args.skip_invalid, trust_remote_code=args.trust_remote_code,
                         device=args.device, progress=args.progress)
    print(path)
    return 0


def _run_reflogps(args) -> int:
    from drdo.pipeline.reflogps import compute_reference_logps

    _require(args, "data", "--data", "output", "--output")
    path = compute_reference_logps(args.model, args.data, args.output, batch_size=args.batch_size,
                                   max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                   tokenizer=args.tokenizer, kernel=args.kernel, split=args.split,
                                   skip_invalid=args.skip_invalid, trust_remote_code=args.trust_remote_code,
                                   device=args.device, seed=args.seed, progress=args.progress)
    print(path)
    return 0


def _run_eval(args) -> int:
    from drdo.data import load_prompts
    from drdo.pipeline.evaluate import evaluate, parse_policies

    _require(args, "policies", "--policy", "prompts", "--prompts", "judge", "--judge")
    prompts = load_prompts(args.prompts, split=args.split)
    if args.num_prompts is not None:
        prompts = prompts[: args.num_prompts]
    report = evaluate(parse_policies(args.policies), prompts, args.judge, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                      max_prompt_length=args.max_prompt_length, trust_remote_code=args.trust_remote_code,
                      device=args.device, progress=args.progress, output=args.output)
    summary = {k: v for k, v in report.items() if k != "generations"}
    print(json.dumps(summary, indent=2))
    return 0


def _run_demo(args) -> int:
    if getattr(args, "demo_missing", False):
        print("drdo: error: the demo is not available: drdo/demo/run.py is missing", file=sys.stderr)
        return 1
    from drdo.demo.run import run_demo

    return int(run_demo(args) or 0)


def _require(args, *pairs) -> None:
    missing = [flag for dest, flag in zip(pairs[::2], pairs[1::2]) if not getattr(args, dest, None)]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")


_COMMANDS = {"sft": _run_train, "oracle train": _run_train, "train": _run_train, "oracle score": _run_score,
             "reflogps": _run_reflogps, "eval": _run_eval, "demo": _run_demo}


def _known_errors() -> tuple[type[BaseException], ...]:
    from drdo.training.checkpoint import CheckpointError
    from drdo.training.objectives import KernelUnavailableError
    from drdo.training.loop import TrainingDiverged

    errors = [ConfigError, CheckpointError, KernelUnavailableError, TrainingDiverged, FileNotFoundError]
    for module, name in (("drdo.pipeline.scoring", "RewardModelError"), ("drdo.pipeline.evaluate", "JudgeError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except ImportError:
            pass
    try:
        from drdo.data import EmptyDatasetError, InvalidExampleError, MissingFieldError

        errors += [MissingFieldError, InvalidExampleError, EmptyDatasetError]
    except ImportError:
        pass
    try:
        from drdo.models import ModelFormatError

        errors.append(ModelFormatError)
    except ImportError:
        pass
    return tuple(errors)


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
    try:
        args = parse_args(argv)
        return _COMMANDS[args.command_path](args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("drdo: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, ConfigError) or isinstance(e, _known_errors()):
            print(f"drdo: error: {e}", file=sys.stderr)
            return 2 if isinstance(e, ConfigError) else 1
        raise


if __name__ == "__main__":
    sys.exit(main())
