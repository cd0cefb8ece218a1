"""Evaluation: sample responses from policies, score them with a judge, compare.

The judge is a reward the students never saw: a reward-model directory (our
Oracle format or an HF sequence-classification model with one output), or any
Python callable given as ``"path/to/file.py:function"`` or ``"module:function"`` that maps
``(prompts: list[str], responses: list[str]) -> list[float]`` (prompts rendered
as text, e.g. through the chat template). A file is loaded by its path under a private module
name; a module is searched on ``sys.path`` and then in the current directory, never before the
standard library. Either way ``sys.path`` and ``sys.modules`` are left as they were (modules that
the judge loaded from elsewhere, e.g. numpy, stay loaded).

Report: for each policy the expected judge reward (mean, std error) and for each
ordered pair of policies the win rate of the first over the second, prompt by
prompt (a tie counts 1/2): ``report["win_rate"][a][b]``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import itertools
import json
import math
import os
import sys
from typing import Callable

import torch

from drdo.atomic import atomic_writes
from drdo.data import encode_prompt
from drdo.errors import ConfigError, shown
from drdo.jsonl import write_rows
from drdo.pipeline.outputs import check_output_file, unique_run_dir
from drdo.pipeline.scoring import load_reward_model, pick_device
from drdo.progress import batch_starts

__all__ = ["JudgeError", "RESERVED_NAMES", "generate", "evaluate", "run_eval", "load_judge", "judge_scores",
           "win_rate", "parse_policies", "generations_path", "report_summary"]

Judge = Callable[[list, list], list]


class JudgeError(ValueError):
    """The judge cannot be loaded, or returned something other than one finite score per response."""


#: Names a policy cannot take: the other columns of a generations row.
RESERVED_NAMES = frozenset({"prompt"})


def parse_policies(specs: list[str]) -> dict[str, str]:
    """["name=path", "path2"] -> {"name": "path", basename(path2): "path2"}; names must be unique,
    non-empty and not in :data:`RESERVED_NAMES` (ConfigError)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)) or spec, spec
        if not name or not path:
            raise ConfigError(f"--policy {spec!r}: expected NAME=PATH or PATH")
        if name in RESERVED_NAMES:
            raise ConfigError(f"--policy {spec!r}: the name {name!r} is reserved (a column of the generations "
                              "file); use NAME=PATH with another name")
        if name in out:
            raise ConfigError(f"two policies are named {name!r}; use NAME=PATH to tell them apart")
        out[name] = path
    return out


def _load_policy(policy, tokenizer, device, trust_remote_code):
    """(HF causal LM, tokenizer) from a path/"tiny" or a loaded model."""
    from drdo.tokenizer import get_tokenizer

    if isinstance(policy, (str, os.PathLike)):
        from drdo.models import load_causal_lm

        name = os.fspath(policy)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        lm = load_causal_lm(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else name
    else:
        lm = getattr(policy, "lm", policy).to(device)
        if tokenizer is None:
            raise ValueError("pass tokenizer= when the policy is a loaded model")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = get_tokenizer(os.fspath(tokenizer), trust_remote_code=trust_remote_code)
    return lm.eval(), tokenizer


@torch.no_grad()
def generate(policy, prompts: list, *, tokenizer=None, max_new_tokens: int = 64, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 16, max_prompt_length: int = 512,
             device="auto", trust_remote_code: bool = False, progress: bool = True) -> list[str]:
    """Sample one response per prompt (temperature 0: greedy). Deterministic given ``seed``.

    policy: a directory, hub id, "tiny", or a loaded model (PolicyWithRewardHead or HF causal LM;
    then pass ``tokenizer``). Prompts are strings or message lists. Returns the decoded new text
    of each prompt (special tokens removed).
    """
    dev = pick_device(device)
    lm, tok = _load_policy(policy, tokenizer, dev, trust_remote_code)
    encoded = [encode_prompt(tok, p, max_prompt_length) for p in prompts]
    responses = []
    for start in batch_starts(len(encoded), batch_size, progress=progress, desc="generating"):
        chunk = encoded[start:start + batch_size]
        width = max(max(len(ids) for ids in chunk), 1)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):  # left padding: the new tokens follow each prompt directly
            if ids:
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                mask[i, width - len(ids):] = 1
        empty = mask.sum(1) == 0
        if bool(empty.any()):  # an empty prompt starts from EOS so that generation has a context
            input_ids[empty, -1] = tok.eos_token_id
            mask[empty, -1] = 1
        torch.manual_seed(seed + start)
        sample = temperature > 0
        extra = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
        out = lm.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)
        new = out[:, width:].cpu()
        responses.extend(tok.decode(row, skip_special_tokens=True) for row in new)
    return responses


def _reward_model_judge(path: str, *, device, trust_remote_code, allow_untrained_head=False, batch_size=16,
                        max_length=1024, max_prompt_length=512) -> Judge:
    """A judge from a reward model: reward of prompt + response + EOS (right-padded, truncated)."""
    rm = load_reward_model(path, device=device, trust_remote_code=trust_remote_code,
                           allow_untrained_head=allow_untrained_head)
    tok = rm.tokenizer

    def judge(prompts: list, responses: list) -> list[float]:
        seqs = []
        for prompt, response in zip(prompts, responses):
            ids = encode_prompt(tok, prompt, max_prompt_length)
            resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append((ids + resp)[:max_length])
        scores: list[float] = []
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            scores.extend(rm.score(ids, mask).tolist())
        return scores

    judge.tokenizer = tok  # type: ignore[attr-defined]
    return judge


@contextlib.contextmanager
def _searched_last(directory: str):
    """``directory`` at the end of ``sys.path`` while the block runs (after the standard library and
    site-packages); afterwards ``sys.path`` is restored, and new top-level modules loaded from
    ``directory`` (with their submodules) leave ``sys.modules``."""
    saved_path, before = list(sys.path), set(sys.modules)
    sys.path.append(directory)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        root = os.path.join(directory, "")
        for name in set(sys.modules) - before:
            origin = getattr(getattr(sys.modules[name], "__spec__", None), "origin", None) or ""
            if name.partition(".")[0] not in before and os.path.isabs(origin) and origin.startswith(root):
                del sys.modules[name]


#: The module name a judge file runs under (it leaves sys.modules once loaded).
_JUDGE_MODULE = "_drdo_judge"


def _judge_module(target: str):
    """The module of a ``--judge`` spec: ``path/to/file.py`` executed by path under a private name,
    or a module name imported with the current directory searched last."""
    if not target.endswith(".py"):
        with _searched_last(os.getcwd()):  # absolute, as the module origins found through it
            return importlib.import_module(target)
    if not os.path.isfile(target):
        raise JudgeError(f"judge file {target} not found")
    spec = importlib.util.spec_from_file_location(_JUDGE_MODULE, target)
    module = importlib.util.module_from_spec(spec)
    with _searched_last(os.path.dirname(os.path.abspath(target))):
        sys.modules[_JUDGE_MODULE] = module  # dataclasses and pickling look the module up while it runs
        spec.loader.exec_module(module)
    return module


def generations_path(output: str) -> str:
    """The JSONL of generations written next to the report ``output``."""
    return output + ".generations.jsonl"


def load_judge(spec, *, device="auto", trust_remote_code: bool = False, allow_untrained_head: bool = False) -> Judge:
    """A callable judge from a callable, "path/to/file.py:function", "module:function", or a
    reward-model directory / hub id."""
    if callable(spec):
        return spec
    spec = str(spec)
    if ":" in spec and not os.path.exists(spec):
        target, _, func_name = spec.rpartition(":")
        try:
            func = getattr(_judge_module(target), func_name)
        except JudgeError:
            raise
        except Exception as e:  # ImportError, AttributeError, or whatever the judge's own code raises
            raise JudgeError(f"cannot load the judge {spec!r} (expected 'path/to/file.py:function' or "
                             f"'module:function'): {type(e).__name__}: {e}") from e
        if not callable(func):
            raise JudgeError(f"judge {spec!r} is not callable")
        return func
    return _reward_model_judge(spec, device=device, trust_remote_code=trust_remote_code,
                               allow_untrained_head=allow_untrained_head)


def _score_of(value) -> float | None:
    """A judge's score as a finite float, or None when it is not one (a string, None, a bool, NaN)."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    try:
        score = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return score if math.isfinite(score) else None


def judge_scores(judge: Judge, prompts: list, responses: list, policy: str = "") -> list[float]:
    """``judge(prompts, responses)`` as a list of one finite float per response. JudgeError naming the
    policy, the response and the value when the judge raises (a callable judge: a reward-model judge's
    own errors pass through) or returns anything else (None, strings, a wrong count, NaN)."""
    where = f" for policy {policy!r}" if policy else ""
    try:
        values = judge(prompts, responses)
    except Exception as e:
        if getattr(judge, "tokenizer", None) is not None:
            raise
        raise JudgeError(f"the judge raised {type(e).__name__}{where}: {' '.join(str(e).split())}") from e
    try:
        values = list(values)
    except TypeError:
        raise JudgeError(f"the judge returned {shown(values)}{where}; it must return a list of one number per "
                         "response") from None
    if len(values) != len(responses):
        raise JudgeError(f"the judge returned {len(values)} scores for {len(responses)} responses{where}; it must "
                         "return one number per response")
    scores = [_score_of(v) for v in values]
    bad = next((i for i, v in enumerate(scores) if v is None), None)
    if bad is not None:
        raise JudgeError(f"the judge returned {shown(values[bad])} as the score of response {bad + 1}{where}; every "
                         "score must be a finite number")
    return scores


def win_rate(a: list[float], b: list[float]) -> float:
    """Fraction of prompts where a beats b (ties count 1/2)."""
    if len(a) != len(b) or not a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def _prompt_texts(prompts: list, judge: Judge) -> list[str]:
    """Prompts as text for the judge (messages rendered with the judge's tokenizer, or joined)."""
    tok = getattr(judge, "tokenizer", None)
    if tok is not None:
        return list(prompts)  # the reward-model judge renders prompts itself
    out = []
    for p in prompts:
        out.append(p if isinstance(p, str) else "\n".join(f"{m['role']}: {m['content']}" for m in p))
    return out


def evaluate(policies: dict, prompts: list, judge, config=None, *, output: str | None = None, **options) -> dict:
    """Generate with every policy, score with the judge, report rewards and pairwise win rates.

    policies: {name: path or loaded model (with tokenizer as (model, tokenizer) tuple)};
    config / options: the generation and judging settings of a :class:`drdo.config.EvalConfig`
    (max_new_tokens, temperature, top_p, seed, batch_size, max_prompt_length, trust_remote_code,
    allow_untrained_head, device, progress), or some of its fields as keywords.
    Returns {"num_prompts", "reward": {name: {"mean", "stderr"}}, "win_rate": {a: {b: float}},
    "generations": {name: [str]}, "scores": {name: [float]}}. With ``output`` the report is
    written as JSON and the generations as ``<output>.generations.jsonl``, together (:func:`write_outputs`).
    """
    from drdo.config import EvalConfig

    c = dataclasses.replace(config or EvalConfig(), **options)
    if not policies:
        raise ValueError("evaluate needs at least one policy")
    if RESERVED_NAMES & set(policies):
        raise ConfigError(f"policy names {sorted(RESERVED_NAMES & set(policies))} are reserved (columns of the "
                          "generations file)")
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    judge_fn = load_judge(judge, device=c.device, trust_remote_code=c.trust_remote_code,
                          allow_untrained_head=c.allow_untrained_head)
    generations, scores = {}, {}
    for name, pol in policies.items():
        model, tok = pol if isinstance(pol, tuple) else (pol, None)
        generations[name] = generate(model, prompts, tokenizer=tok, max_new_tokens=c.max_new_tokens,
                                     temperature=c.temperature, top_p=c.top_p, seed=c.seed, batch_size=c.batch_size,
                                     max_prompt_length=c.max_prompt_length, device=c.device,
                                     trust_remote_code=c.trust_remote_code, progress=c.progress)
        scores[name] = judge_scores(judge_fn, _prompt_texts(prompts, judge_fn), generations[name], name)
    report = {"num_prompts": len(prompts), "reward": {}, "win_rate": {}}
    for name, values in scores.items():
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
        report["reward"][name] = {"mean": mean, "stderr": math.sqrt(var / len(values))}
    for a, b in itertools.permutations(scores, 2):
        report["win_rate"].setdefault(a, {})[b] = win_rate(scores[a], scores[b])
    report["generations"], report["scores"] = generations, scores
    if output:
        write_outputs(report, prompts, output)
    return report


def run_eval(config) -> tuple[dict, str]:
    """``drdo eval``: the policies, prompts, judge and settings of a :class:`drdo.config.EvalConfig`
    (checked here before anything is loaded or written). Returns (report, the report's path:
    ``config.output`` or runs/eval-<date>-<time>/report.json, a directory of its own even for two runs
    started in the same second). A given ``config.output`` is checked before anything is computed
    (:func:`drdo.pipeline.outputs.check_output_file`)."""
    from drdo.config import check_options, require
    from drdo.data import load_prompts
    from drdo.hub import require_model_source

    require(config, "policies", "prompts", "judge")
    check_options(config)
    policies = parse_policies(config.policies)
    for path in policies.values():
        require_model_source(path, "--policy")
    if ":" not in config.judge or os.path.exists(config.judge):
        require_model_source(config.judge, "--judge")
    if config.output:
        check_output_file(config.output)
        check_output_file(generations_path(config.output))
    prompts = load_prompts(config.prompts, split=config.split)
    if config.num_prompts is not None:
        prompts = prompts[: config.num_prompts]
    if config.output:
        return evaluate(policies, prompts, config.judge, config, output=config.output), config.output
    run_dir = unique_run_dir("runs", "eval")
    try:
        output = os.path.join(run_dir, "report.json")
        return evaluate(policies, prompts, config.judge, config, output=output), output
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)  # only while empty: a failed evaluation leaves no directory behind
        raise


def report_summary(report: dict) -> list[str]:
    """Lines that sum up an evaluation report (:func:`evaluate`): each policy's mean judge reward with
    its standard error, then the win rate of each policy over each other one."""
    lines = [f"{len(report['reward'])} policies on {report['num_prompts']} prompts; mean judge reward +- std error:"]
    width = max(len(name) for name in report["reward"])
    lines += [f"  {name:<{width}}  {r['mean']:.4g} +- {r['stderr']:.2g}" for name, r in report["reward"].items()]
    for a, others in report["win_rate"].items():
        lines += [f"  win rate of {a} over {b}: {rate:.3f}" for b, rate in others.items()]
    return lines


def write_outputs(report: dict, prompts: list, output: str) -> None:
    """The report (without the generations) as JSON at ``output`` and one row per prompt at
    :func:`generations_path`: both temporaries are written before either file is replaced, so a
    failed write leaves the old pair as it was."""
    generations = report["generations"]
    rows = ({"prompt": p, **{name: texts[i] for name, texts in generations.items()}} for i, p in enumerate(prompts))
    with atomic_writes([generations_path(output), output]) as (gens_file, report_file):
        write_rows(gens_file, rows)
        json.dump({k: v for k, v in report.items() if k != "generations"}, report_file, indent=2)
