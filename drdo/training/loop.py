"""One training loop for every stage: sft, oracle, drdo, dpo, edpo.

Launch with plain ``python`` (one process, no process group, no FSDP) or with
``torchrun --nproc_per_node N`` (FSDP2 over N ranks; gloo on CPU, nccl on CUDA).

Batch semantics: ``batch_size`` is the GLOBAL number of pairs per optimizer step,
``micro_batch_size`` the pairs per rank per forward, and the number of
accumulation steps is batch / (micro x world). The data order is a function of
(seed, step) only: optimizer step s takes positions [s*B, (s+1)*B) of an endless
stream of seeded per-epoch permutations; rank r takes the r-th contiguous slice of
those B pairs and splits it into micro-batches. Each micro-batch returns the SUM
of its per-pair losses (SFT: of its token NLLs); the trainer divides by the global
count of the optimizer step (pairs: B; SFT: the all-reduced response-token count),
so the gradient is that of the mean over the whole global batch whatever the
world size or micro-batch size. (FSDP2 averages gradients over ranks, so the
backward loss is multiplied by the world size to get the sum.)

Failure behaviour: everything that can be checked before training is checked before anything is
written (the data, the backend on this device, the tokenizer against the model's embedding, the
start model's weights); a failed start removes the directories it created while they hold nothing
but its own lock file. A non-finite loss or gradient norm stops the run before the
optimizer step (:class:`TrainingDiverged`), and so do weights that are not finite after
it (they are never saved), leaving the last good checkpoint in place. The run owns its
output directory (:mod:`drdo.training.rundir`: lock, run id, config checks); the final
model is exported after a checkpoint of the last step was written, recorded as complete in
run.json (:func:`rundir.mark_complete`), and only then is that checkpoint removed. SIGINT (Ctrl-C)
and SIGTERM (``timeout``, schedulers, ``docker stop``) finish the current step, save a checkpoint
and return ``{"status": "interrupted", "signal": <its number>, ...}`` (a second signal aborts at once:
:class:`RunAborted`).
A run of the same config into a directory that already holds it, complete, trains nothing and
returns ``{"status": "finished", ...}``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
import signal
import threading
import time
from typing import Callable

import torch

from drdo.config import TrainConfig, accumulation_steps, resolve, total_steps, warmup_steps_for
from drdo.losses import IGNORE_INDEX
from drdo.process_settings import quiet_libraries, torch_threads
from drdo.training import checkpoint as ckpt
from drdo.training import distributed as dist_utils
from drdo.training import rundir, startup
from drdo.training.metrics import MetricsLog, peak_memory_mb
from drdo.training.objectives import StageObjective
from drdo.training.reporting import make_reporter
from drdo.training.schedule import default_lr, lr_at, set_lr

__all__ = ["TrainConfig", "train", "TrainingDiverged", "RunAborted", "step_indices"]

logger = logging.getLogger("drdo.training.loop")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
PLOT_FILE = "training_curves.png"


class TrainingDiverged(RuntimeError):
    """The loss, gradient norm or updated weights became NaN/inf; nothing of that step was saved."""


# ----------------------------------------------------------------------------- data order


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    if not shuffle:
        return tuple(range(n))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def step_indices(step: int, batch_size: int, n: int, *, seed: int, shuffle: bool = True) -> list[int]:
    """Dataset indices of optimizer step ``step`` (0-based): positions [step*B, (step+1)*B) of the
    stream of per-epoch permutations (epoch e shuffled with a generator seeded by (seed, e))."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        out.append(_epoch_order(n, seed, epoch, shuffle)[offset])
    return out


def rank_micro_batches(indices: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's contiguous share of the step's indices, split into micro-batches."""
    share = len(indices) // world
    mine = indices[rank * share:(rank + 1) * share]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


# ----------------------------------------------------------------------------- setup helpers


def _load_data(config: TrainConfig, tokenizer):
    from drdo.data import load_preference_dataset

    return load_preference_dataset(
        config.data, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
        split=config.split, skip_invalid=config.skip_invalid,
        require_oracle=config.stage in ("drdo", "edpo"), require_ref=config.stage in ("dpo", "edpo"),
    )


def _check_reference_logps(config: TrainConfig, tokenizer, dataset) -> None:
    """ConfigError unless the data's reference log-probs were computed with this run's model and tokenization."""
    from drdo.policy_logprobs import check_reference_settings, reference_settings

    check_reference_settings(dataset, reference_settings(config.model, tokenizer, max_length=config.max_length,
                                                         max_prompt_length=config.max_prompt_length,
                                                         seed=config.seed))


def _collator(config: TrainConfig, tokenizer):
    from drdo.data import PreferenceCollator, SFTCollator

    if config.padding_free:
        from drdo.data.packing import PackedPreferenceCollator, PackedSFTCollator

        return PackedSFTCollator() if config.stage == "sft" else PackedPreferenceCollator()
    cls = SFTCollator if config.stage == "sft" else PreferenceCollator
    return cls(tokenizer.pad_token_id)


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.precision == "bf16":
        if device.type != "cuda":
            raise ValueError("precision bf16 needs a CUDA device; use --precision fp32 (or auto) on CPU")
        return True
    return config.precision == "auto" and device.type == "cuda"


def _build_policy(config: TrainConfig, device: torch.device, bf16: bool = False):
    """The policy in fp32. A head saved by a stage that never trained it (e.g. the SFT output) is
    replaced by a fresh one seeded by ``config.seed``, so that Oracles trained with different seeds
    from the same SFT model start from different heads (the e-DPO ensemble). A stage that trains
    the head marks it trained (``reward_head.json`` says so when the run saves it). Attention: see
    :func:`drdo.models.training_attn_implementation` (flash-attn with bf16 compute on CUDA)."""
    from drdo.models import PolicyWithRewardHead, new_reward_head
    from drdo.models.loading import set_attn_implementation, training_attn_implementation

    policy = PolicyWithRewardHead.from_pretrained(
        config.model, dtype=torch.float32, trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation, seed=config.seed,
    )
    if policy.head_trained is False:
        policy.reward_head = new_reward_head(policy.hidden_size, seed=config.seed)
    startup.check_finite_start(config, policy)
    if config.stage == "oracle" or (config.stage == "drdo" and config.reward == "head"):
        policy.head_trained = True
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy = policy.to(device)
    attn = training_attn_implementation(config.attn_implementation, device, torch.bfloat16 if bf16 else torch.float32)
    if attn == "flash_attention_2" and policy.config._attn_implementation != attn:  # else: as loaded
        set_attn_implementation(policy.lm, attn)
    return policy.train()


def _optimizer(config: TrainConfig, root: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases and norm weights)."""
    decay, no_decay = [], []
    for p in root.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)


class RunAborted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: the run stops at once, without a checkpoint; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopFlag:
    """SIGINT and SIGTERM handler: the first signal asks for a clean stop (``signum`` records which),
    the second raises :class:`RunAborted` (a KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise RunAborted(signum)
        self.signum = signum
        logger.warning("%s: finishing this step, saving a checkpoint and exiting (send it again to abort)",
                       signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """State of one run; :meth:`run` does the work. Use :func:`train`."""

    def __init__(self, config: TrainConfig, dist_state: dist_utils.DistState, on_step: Callable | None = None,
                 plan: rundir.RunPlan | None = None):
        from drdo.tokenizer import get_tokenizer

        self.config, self.dist, self.on_step = config, dist_state, on_step
        self.plan = plan or rundir.RunPlan(run_id="unowned")
        self.device = dist_state.device
        self.out = config.output_dir
        startup.check_backend(config, self.device)
        self.digests = rundir.input_digests(config) if dist_state.is_main else {}
        self.tokenizer = get_tokenizer(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code)
        self.dataset = self._load_data_rank0_first()  # fails fast on data without Oracle scores / ref log-probs
        if config.stage in ("dpo", "edpo"):
            _check_reference_logps(config, self.tokenizer, self.dataset)
        self.collate = _collator(config, self.tokenizer)
        if config.stage == "drdo" and self.dataset.num_oracles > 1 and dist_state.is_main:
            logger.warning("the data has K=%d Oracle scores per response; drdo regresses their mean",
                           self.dataset.num_oracles)
        self.total = total_steps(config, len(self.dataset))
        self.accum = accumulation_steps(config.batch_size, config.micro_batch_size, dist_state.world_size)
        self.warmup = warmup_steps_for(config, self.total)
        self.bf16 = _use_bf16(config, self.device)
        torch.manual_seed(config.seed)
        policy = _build_policy(config, self.device, self.bf16)
        startup.check_vocabulary(config, self.tokenizer, policy)
        self.root = StageObjective(policy, config)
        if dist_state.distributed:
            dist_utils.wrap_fsdp(self.root, dist_state, bf16=self.bf16)
        if config.compile:  # in place: parameter names and checkpoints stay those of the eager module
            self.root.compile()
        self.optimizer = _optimizer(config, self.root)
        self.metrics = MetricsLog(os.path.join(self.out, METRICS_FILE), enabled=dist_state.is_main)
        self.reporter = make_reporter(config.report_to, self.out, config.to_dict(), enabled=dist_state.is_main)
        self.start_step = 0
        self.last_good: str | None = None

    def _load_data_rank0_first(self):
        """Rank 0 tokenizes first (and fills the datasets cache); the other ranks then read it.
        If rank 0 fails, the others fail with the same error by loading the data themselves."""
        if not self.dist.distributed:
            return _load_data(self.config, self.tokenizer)
        if self.dist.is_main:
            try:
                dataset = _load_data(self.config, self.tokenizer)
            except Exception:
                dist_utils.broadcast_object(self.dist, False)
                raise
            dist_utils.broadcast_object(self.dist, True)
            return dataset
        dist_utils.broadcast_object(self.dist, None)  # wait for rank 0
        return _load_data(self.config, self.tokenizer)

    # -- resume
    def maybe_resume(self) -> None:
        """Load the checkpoint chosen (and verified) by :func:`rundir.plan_run`; cut metrics.jsonl back to it
        when it is one of this directory's."""
        directory = self.plan.resume_dir
        if directory is None:
            return
        state = ckpt.load_checkpoint(directory, root=self.root, optimizer=self.optimizer, dist_state=self.dist)
        self.start_step = state["step"]
        self.last_good = directory
        if self.plan.continues:
            self.metrics.truncate_after(self.start_step)
        if self.dist.is_main:
            logger.info("resumed from %s at step %d", directory, self.start_step)

    # -- one optimizer step
    def _micro_batches(self, step: int) -> list[tuple[dict, float, float]]:
        """This rank's micro-batches of ``step``: (batch on CPU, loss count, non-padding tokens).
        The count is the number of pairs (SFT: response tokens) the micro-batch's loss sums over."""
        c = self.config
        indices = step_indices(step, c.batch_size, len(self.dataset), seed=c.seed, shuffle=c.shuffle)
        groups = rank_micro_batches(indices, self.dist.rank, self.dist.world_size, c.micro_batch_size)
        out = []
        for group in groups:
            batch = self.collate([self.dataset[i] for i in group])
            batch.pop("rows", None)
            if c.stage == "sft":
                count = float((batch["labels"] != IGNORE_INDEX).sum())
            else:
                count = float(_n_rows(batch) // 2)
            tokens = batch["input_ids"].numel() if "cu_seqlens" in batch else batch["attention_mask"].sum()
            out.append((batch, count, float(tokens)))
        return out

    def _reduce_device(self) -> torch.device:
        return self.device if self.dist.distributed and self.device.type == "cuda" else torch.device("cpu")

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._reduce_device())
        return dist_utils.all_reduce_sum(self.dist, t).cpu().tolist()

    def _forward_backward(self, batch: dict, normaliser: float):
        """Loss sum (detached) and metric means of one micro-batch; backward of its share of the step loss."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        use_autocast = self.bf16 and not self.dist.distributed  # FSDP2 has its own MixedPrecisionPolicy
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss_sum, parts = self.root(**batch)
        # FSDP2 averages gradients over ranks: scale by world size so that they sum instead
        (loss_sum * (self.dist.world_size / normaliser)).backward()
        return loss_sum.detach(), parts

    def train_step(self, step: int) -> dict:
        c = self.config
        t0 = time.perf_counter()
        lr = lr_at(step, base_lr=c.lr, total_steps=self.total, warmup_steps=self.warmup, min_lr_ratio=c.min_lr_ratio)
        set_lr(self.optimizer, lr)
        batches = self._micro_batches(step)
        self.root.diagnostic_step = step  # DRDO logs drdo.training.diagnostics every --diagnostics-every steps
        normaliser, tokens = self._all_reduce([sum(b[1] for b in batches), sum(b[2] for b in batches)])
        loss_total, sums = None, {}
        for i, (batch, count, _) in enumerate(batches):
            if self.dist.distributed:
                self.root.set_requires_gradient_sync(i == len(batches) - 1)
            loss_sum, parts = self._forward_backward(batch, normaliser)
            loss_total = loss_sum.double() if loss_total is None else loss_total + loss_sum.double()
            for k, v in parts.items():  # metric means -> sums, weighted by the micro-batch's count
                sums[k] = sums.get(k, 0.0) + v.double() * count
        grad_norm = self._clip()
        names = sorted(sums)
        packed = torch.stack([loss_total] + [torch.as_tensor(sums[k]).to(loss_total) for k in names])
        packed = self._all_reduce(packed.cpu().tolist())  # one device sync per step
        loss = packed[0] / normaliser
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message(step, loss, grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._check_weights(step)
        elapsed = time.perf_counter() - t0
        row = {"step": step + 1, "loss": loss}
        row.update({k: packed[1 + j] / normaliser for j, k in enumerate(names)})
        row.update(lr=lr, grad_norm=grad_norm, tokens_per_s=tokens / max(elapsed, 1e-9),
                   peak_mem_mb=peak_memory_mb(self.device), step_time_s=elapsed)
        return row

    def _clip(self) -> float:
        params = [p for p in self.root.parameters() if p.grad is not None]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _check_weights(self, step: int) -> None:
        """TrainingDiverged when an updated weight is NaN/inf (such a step is never saved)."""
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in self.root.parameters()]
        flags = [torch.isfinite(t).all() for t in local]  # under FSDP2 each rank checks its shards
        bad = float((~torch.stack(flags)).sum()) if flags else 0.0  # one device sync
        bad = self._all_reduce([bad])[0] if self.dist.distributed else bad
        if bad:
            where = (f"the last good checkpoint is {self.last_good}" if self.last_good
                     else "no checkpoint was written yet")
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: the updated weights are not finite (in {int(bad)} tensor(s)); "
                f"nothing of this step was saved; {where}. Lower --lr or use --max-grad-norm.")

    def _diverged_message(self, step: int, loss: float, grad_norm: float) -> str:
        where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"
        return (
            f"training diverged at step {step + 1}: loss={loss}, grad_norm={grad_norm} (not finite); stopped before "
            f"the optimizer step; {where}. Lower --lr, check the data (Oracle scores, reference log-probs) or "
            f"use --max-grad-norm."
        )

    # -- checkpoints and outputs
    def save(self, step: int, last_row: dict | None, *, prune: bool = True) -> str:
        state = {"config": self.config.to_dict(), "total_steps": self.total, "last_metrics": last_row or {},
                 "run_id": self.plan.run_id, **self.digests}
        directory = ckpt.save_checkpoint(self.out, step, root=self.root, optimizer=self.optimizer,
                                         dist_state=self.dist, tokenizer=self.tokenizer, trainer_state=state,
                                         kept=self.last_good)
        self.last_good = directory
        if self.dist.is_main and prune:
            ckpt.prune_checkpoints(self.out, self.config.save_limit, run_id=self.plan.run_id)
        return directory

    def export_final(self, row: dict | None) -> None:
        """Checkpoint the last step (unless it is the checkpoint just resumed), export, record the export
        as complete, then drop that checkpoint. A full disk while checkpointing still tries the smaller export."""
        final_ckpt = ckpt.step_dir(self.out, self.total)
        if not (self.last_good and os.path.abspath(self.last_good) == os.path.abspath(final_ckpt)):
            try:
                self.save(self.total, row, prune=False)
            except ckpt.CheckpointError as e:
                if not ckpt.is_disk_full(e) or self.dist.distributed:
                    raise
                logger.warning("%s; trying the (smaller) final export anyway", e)
        full = ckpt.gather_model_state(self.root) if self.dist.distributed else None
        if self.dist.is_main:
            ckpt.export_final(self.root.policy, full, self.out, self.tokenizer, kept=self.last_good)
            rundir.mark_complete(self.out, self.total)
            if self.last_good and os.path.abspath(self.last_good) == os.path.abspath(final_ckpt) \
                    and ckpt.checkpoint_run_id(final_ckpt) == self.plan.run_id:
                shutil.rmtree(final_ckpt, ignore_errors=True)
                self.last_good = ckpt.latest_checkpoint(self.out, self.plan.run_id)
        dist_utils.barrier(self.dist)

    def _stop_requested(self, flag: _StopFlag) -> bool:
        t = torch.tensor([1.0 if flag.requested else 0.0], device=self._reduce_device())
        return bool(dist_utils.all_reduce_sum(self.dist, t).item() > 0)

    def run(self) -> dict:
        c = self.config
        self.maybe_resume()
        if self.dist.is_main:  # every check passed: this run now owns the directory
            if not self.plan.continues:
                self.metrics.reset()
            rundir.commit_run(c, self.plan, self.digests)
        bar = _progress(c.progress and self.dist.is_main, self.total, self.start_step, c.stage)
        row: dict | None = None
        status, signum = "completed", None
        self.root.train()
        with _StopFlag() as flag:
            for step in range(self.start_step, self.total):
                try:
                    row = self.train_step(step)
                except TrainingDiverged:
                    if bar is not None:
                        bar.close()
                    raise
                self.metrics.write(row)
                self.reporter.log(row, step + 1)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                if self.on_step is not None:
                    self.on_step(step + 1, row)
                done = step + 1
                saved = False
                if c.save_every and done % c.save_every == 0 and done < self.total:
                    self.save(done, row)
                    saved = True
                if self._stop_requested(flag):
                    status, signum = "interrupted", flag.signum
                    if not saved:
                        self.save(done, row)
                    break
        if bar is not None:
            bar.close()
        self.reporter.close()
        if status == "completed":
            self.export_final(row)
            self._plot()
        result = dict(row or {}, status=status, output_dir=self.out, checkpoint=self.last_good,
                      total_steps=self.total)
        return result if signum is None else dict(result, signal=signum)

    def _plot(self) -> None:
        if not (self.config.plot and self.dist.is_main and os.path.exists(self.metrics.path)):
            return
        from drdo.training.plots import plot_training_curves

        path = os.path.join(self.out, PLOT_FILE)
        try:
            plot_training_curves(self.metrics.path, path, title=f"{self.config.stage} ({self.config.model})")
        except OSError as e:
            cause = "no space left on device" if ckpt.is_disk_full(e) else (e.strerror or str(e))
            raise rundir.OutputDirError(
                f"{cause} while drawing {path}; the final model in {self.out} is complete (only the plot is "
                "missing)") from e


def _n_rows(batch: dict) -> int:
    """Sequences in a collated batch: its rows, or the packed sequences of a padding-free batch."""
    return batch["cu_seqlens"].numel() - 1 if "cu_seqlens" in batch else batch["input_ids"].shape[0]


def _progress(enabled: bool, total: int, start: int, stage: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"drdo {stage}", dynamic_ncols=True)


def _start(config: TrainConfig, state, on_step, lock: rundir.RunLock) -> "Trainer | None":
    """Take the output directory (rank 0: lock, check, plan the run; the plan is broadcast) and build the
    trainer; None when the directory already holds this run, finished."""
    plan, error = None, None
    if state.is_main:
        try:
            lock.acquire()
            plan = rundir.plan_run(config)
        except Exception as e:  # the other ranks must not wait for a broadcast that never comes
            error = e
    plan = dist_utils.broadcast_object(state, plan)
    if error is not None:
        raise error
    if plan is None:
        raise rundir.OutputDirError("rank 0 could not use the output directory (see its error)")
    return None if plan.finished else Trainer(config, state, on_step, plan)


def _finished_result(config: TrainConfig) -> dict:
    """The result of a run that found itself already complete in its directory."""
    run = rundir.read_run(config.output_dir) or {}
    return dict(status="finished", output_dir=config.output_dir, checkpoint=None, total_steps=run.get("total_steps"))


def train(config: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run one training stage (see the module docstring); returns the last step's metrics plus
    ``status`` ("completed" | "interrupted" | "finished": already complete, nothing trained),
    ``output_dir``, ``checkpoint``, ``total_steps``, ``rank`` (this process's; 0 without torchrun)
    (and ``signal`` when interrupted).

    on_step(step, metrics) is called on every rank after each optimizer step (1-based step).
    Raises ConfigError, MissingFieldError (data lacks Oracle scores / reference log-probs),
    CheckpointError, TrainingDiverged, ModelFormatError (a start model with NaN/inf weights); RunAborted
    on a second SIGINT/SIGTERM. A failed start removes the directories it created, while they hold
    nothing but its own lock file.
    """
    from drdo.hub import require_model_source

    if config.lr is None:
        config = dataclasses.replace(config, lr=default_lr(config.stage, config.model))
    config = resolve(dataclasses.replace(config))
    require_model_source(config.model, "--model")
    require_model_source(config.tokenizer, "--tokenizer")
    state = dist_utils.setup()
    with torch_threads(config.threads), quiet_libraries(not config.progress):
        created = startup.missing_directories(config.output_dir)
        lock = rundir.RunLock(config.output_dir)
        try:
            trainer = _start(config, state, on_step, lock)
        except BaseException:
            # a failed start (busy or foreign directory, bad data, ...) leaves no directory it created
            if state.is_main:
                startup.remove_own_directories(created, lock)
            lock.release()
            raise
        try:
            result = trainer.run() if trainer is not None else _finished_result(config)
        finally:
            lock.release()
    dist_utils.teardown(state)  # on an error the ranks do not wait for each other
    return dict(result, rank=state.rank)
