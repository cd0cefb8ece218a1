"""A training run owns its output directory.

* A lock (``fcntl.flock`` on ``<output_dir>/.drdo.lock``, held for the whole run) refuses a
  second run into the same directory. The kernel drops the lock when its process dies, so a
  lock file left by a crashed run never blocks.
* ``run.json`` names the run that owns the directory: its id, its config and the checkpoint
  it was resumed from (``parent``). Checkpoints carry the id of the run that wrote them;
  ``--resume`` only uses, and pruning only deletes, checkpoints of the run being resumed.
* A fresh run (no ``--resume``) refuses a non-empty directory that holds no drdo run, or a
  run of another config, unless ``--overwrite``; files it did not write are never deleted. So
  does ``--resume`` of a checkpoint of another directory: it starts a new run in this one.
* ``--resume`` refuses a checkpoint written with another config (naming the fields), except
  for the settings in :data:`RUNTIME_ONLY` and a larger ``max_steps``, unless
  ``--allow-config-change``. The data, the start model and the tokenizer are compared by content
  where they are local (sha256 of the data file; of a model directory's weight, config and tokenizer
  files), so ``./x.jsonl`` and ``x.jsonl`` are the same data and a model retrained in place is another
  model; built-in names (``tiny``) and hub ids are compared by name.
* A plain ``--resume`` of a complete run whose newest checkpoint is older than its final step (the final
  checkpoint is removed after the export) is refused: it would drop the steps after that checkpoint.
* ``run.json`` and ``config.yaml`` are written only after every check passed (:func:`commit_run`),
  with ``"complete": false``; :func:`mark_complete` sets it true once the final model is
  exported. That flag is the one fact "this directory holds this run's complete model": every
  loader refuses a run directory without it (:func:`drdo.run_record.model_problem`), and a run
  (fresh or ``--resume``) of the same config into a directory whose run is complete trains nothing.

Resuming from a checkpoint that is not the newest of its run (a roll-back) starts a new run
id whose ``parent`` is that checkpoint: a later plain ``--resume`` continues the new branch,
never the abandoned steps.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass

from drdo.atomic import write_text
from drdo.config import TrainConfig, save_yaml
from drdo.data.sources import file_sha256
from drdo.run_record import LOCK_FILE, RUN_FILE, read_run_file
from drdo.training import checkpoint as ckpt

logger = logging.getLogger("drdo.training.rundir")

CONFIG_FILE = "config.yaml"
#: Settings that cannot change what a run computes: they may differ between a checkpoint and its resume.
#: (The step's loss is normalised over the global batch, so micro_batch_size, like the world size,
#: changes only the rounding; gradient_checkpointing recomputes the same activations.)
RUNTIME_ONLY = frozenset({"output_dir", "resume", "overwrite", "allow_config_change", "save_every", "save_limit",
                          "progress", "plot", "threads", "num_threads", "debug", "micro_batch_size",
                          "gradient_checkpointing"})


class OutputDirError(RuntimeError):
    """The output directory cannot be used by this run (in use, foreign, unwritable, another config)."""


@dataclass
class RunPlan:
    """What :func:`plan_run` decided: the run's id, the checkpoint to resume (None: start at step 0),
    the checkpoint the run descends from (``parent``, recorded in run.json), whether that checkpoint
    is one of this directory's (``continues``: metrics.jsonl is cut back to its step, else started
    anew) and whether the directory already holds this run, complete (``finished``: nothing to train)."""

    run_id: str
    resume_dir: str | None = None
    parent: str | None = None
    continues: bool = False
    finished: bool = False


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive ``flock`` on ``<directory>/.drdo.lock`` (creates the directory)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        _make_directory(self.directory)
        path = os.path.join(self.directory, LOCK_FILE)
        fd = self._lock_file(path)
        while not _same_file(fd, path):  # locked a lock file its creator removed since: take the new one
            os.close(fd)
            fd = self._lock_file(path)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _probe_writable(self.directory)
        except BaseException:
            self.release()
            raise
        return self

    def _lock_file(self, path: str) -> int:
        """A descriptor of ``path`` (created if missing) holding its exclusive flock; OutputDirError when
        another run holds it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise OutputDirError(f"cannot write to --output-dir {self.directory}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirError(
                f"--output-dir {self.directory} is in use by another drdo run (pid {holder}); wait for it to "
                "finish or choose another directory") from None
        return fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _same_file(fd: int, path: str) -> bool:
    """True when ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _make_directory(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputDirError(f"--output-dir {directory} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create --output-dir {directory}: {e.strerror or e}") from None


def _probe_writable(directory: str) -> None:
    """OutputDirError unless a file can be created in ``directory`` (read-only or immutable dirs)."""
    try:
        with tempfile.TemporaryFile(dir=directory) as f:
            f.write(b"x")
            f.flush()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputDirError(f"--output-dir {directory}: no space left on device") from None
        raise OutputDirError(f"cannot write to --output-dir {directory}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- the run's identity


def read_run(directory: str) -> dict | None:
    """{"run_id", "config", "parent", "complete", ...} of the run that owns ``directory``; a directory
    written by an older drdo (config.yaml only) gives run_id None; None when the directory holds no drdo run."""
    path = os.path.join(directory, RUN_FILE)
    if os.path.isfile(path):
        run = read_run_file(path)
        if run is None:
            raise OutputDirError(f"{path} is unreadable; pass --overwrite to start a new run in {directory}")
        return run
    legacy = os.path.join(directory, CONFIG_FILE)
    if os.path.isfile(legacy):
        from drdo.config import ConfigError, load_yaml

        try:
            return {"run_id": None, "config": load_yaml(legacy), "parent": None}
        except ConfigError:
            return None
    return None


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of ``path``, computed once per (size, modification time). The cache holds every file
    of a sharded model directory: :func:`model_digest` reads them in the same order at each check
    of a start, and a cache smaller than the directory would miss on every one of them."""
    return file_sha256(path)


def _local_file(source) -> str | None:
    """The resolved path of a local data file (None for hub ids, directories and in-memory data)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.path.realpath(os.path.expanduser(os.fspath(source)))
    return path if os.path.isfile(path) else None


def _local_directory(source) -> str | None:
    """The resolved path of a local model directory (None for built-in names such as ``tiny`` and hub ids)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.path.realpath(os.path.expanduser(os.fspath(source)))
    return path if os.path.isdir(path) else None


def data_digest(source) -> str | None:
    """sha256 of a local data file (None for hub ids, directories and in-memory data)."""
    path = _local_file(source)
    if path is None:
        return None
    st = os.stat(path)
    return _file_digest(path, st.st_size, st.st_mtime_ns)


#: Files of a model directory whose content makes the model (weights, configs, tokenizer, remote code);
#: a run's own record (run.json) changes when the run finishes, not when the model does.
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".tiktoken", ".py")
_NOT_MODEL_FILES = frozenset({RUN_FILE})


def model_digest(source) -> str | None:
    """sha256 over the name and content of each weight, config and tokenizer file of a local model
    directory (sorted by name); None for a built-in name such as ``tiny``, a hub id, or None."""
    path = _local_directory(source)
    if path is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name in _NOT_MODEL_FILES or not name.endswith(_MODEL_FILE_SUFFIXES) or not os.path.isfile(full):
            continue
        st = os.stat(full)
        digest.update(f"{name}\0{_file_digest(full, st.st_size, st.st_mtime_ns)}\0".encode())
    return digest.hexdigest()


#: The inputs compared by content: config field -> (key of its digest in run.json and trainer_state.json,
#: the digest function, the resolver of its local path).
DIGESTED_INPUTS = {
    "data": ("data_sha256", data_digest, _local_file),
    "model": ("model_sha256", model_digest, _local_directory),
    "tokenizer": ("tokenizer_sha256", model_digest, _local_directory),
}


def input_digests(config: TrainConfig) -> dict[str, str | None]:
    """{"data_sha256", "model_sha256", "tokenizer_sha256"}: the content digests of the run's local inputs
    (None for built-in names, hub ids and in-memory data), recorded in run.json and every checkpoint."""
    return {key: digest(getattr(config, name)) for name, (key, digest, _) in DIGESTED_INPUTS.items()}


def _input_difference(name: str, old, new, recorded: dict) -> str | None:
    """How the input ``name`` (data, model, tokenizer) ``new`` differs from ``old``, whose digest ``recorded``
    holds: by content where both digests are known, else by resolved path; None when they are the same."""
    key, digest, resolve = DIGESTED_INPUTS[name]
    old_digest = recorded.get(key)
    new_digest = digest(new) if old_digest else None  # compared only with a recorded digest
    if old_digest and new_digest:
        if old_digest == new_digest:
            return None
        if resolve(old) == resolve(new):
            return f"{name}: the content of {new} changed since the run used it"
        return f"{name}: {old!r} -> {new!r} (other content)"
    if old == new or (resolve(old) or old) == (resolve(new) or new):
        return None
    return f"{name}: {old!r} -> {new!r}"


def config_differences(saved: dict, config: TrainConfig, *, resuming: bool, recorded: dict | None = None) -> list[str]:
    """Fields whose value in ``config`` differs from ``saved`` (a config dict), as "name: old -> new".
    Settings in :data:`RUNTIME_ONLY` are ignored; when ``resuming``, so is a larger max_steps. The data,
    model and tokenizer are compared by :func:`_input_difference` (``recorded``: the run.json or
    trainer_state.json that holds their digests beside ``saved``)."""
    recorded = recorded or {}
    out = []
    for name in DIGESTED_INPUTS:
        difference = _input_difference(name, saved.get(name), getattr(config, name), recorded)
        if difference:
            out.append(difference)
    for f in dataclasses.fields(TrainConfig):
        if f.name in RUNTIME_ONLY or f.name in DIGESTED_INPUTS:
            continue
        new = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        old = saved.get(f.name, default)
        if old == new:
            continue
        if resuming and f.name == "max_steps" and isinstance(old, int) and isinstance(new, int) and new > old:
            continue
        out.append(f"{f.name}: {old!r} -> {new!r}")
    return out


def _check_fresh(directory: str, config: TrainConfig) -> dict | None:
    """A new run may use an empty directory, or one holding a drdo run of the same config (returned;
    None for an empty directory and with --overwrite)."""
    entries = sorted(set(os.listdir(directory)) - {LOCK_FILE})
    if not entries:
        return None
    if config.overwrite:
        logger.warning("--overwrite: starting a new run in %s (files of other runs are kept unless overwritten)",
                       directory)
        return None
    run = read_run(directory)
    if run is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputDirError(
            f"--output-dir {directory} is not empty ({shown}) and holds no drdo run; choose an empty directory "
            "or pass --overwrite")
    diffs = config_differences(run["config"], config, resuming=False, recorded=run)
    if diffs:
        raise OutputDirError(
            f"--output-dir {directory} holds a drdo run with another config ({'; '.join(diffs)}); pass --resume to "
            "continue it, choose another directory, or pass --overwrite to start a new run there")
    return run


def _finished(run: dict | None, config: TrainConfig) -> bool:
    """True when ``run`` is complete and has the config of ``config``: there is nothing to train."""
    return run is not None and run.get("complete") is True and not config_differences(
        run["config"], config, resuming=False, recorded=run)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _newest_valid(candidates: list[str]) -> str | None:
    for path in reversed(candidates):
        if ckpt.checkpoint_problem(path) is None:
            return path
    return None


def _verified(directory: str, candidates: list[str]) -> str:
    problem = ckpt.checkpoint_problem(directory)
    if problem is None:
        return directory
    others = [c for c in candidates if os.path.abspath(c) != os.path.abspath(directory)]
    good = _newest_valid(others)
    hint = f"the newest valid checkpoint of this run is {good}: pass --resume {good}" if good else \
        "no valid checkpoint of this run is left"
    raise ckpt.CheckpointError(f"checkpoint {directory} is corrupt: {problem}; {hint}")


def _is_own(checkpoint: str, directory: str) -> bool:
    """True when ``checkpoint`` lies in ``directory``'s checkpoints folder."""
    parent = os.path.dirname(os.path.realpath(checkpoint))
    return parent == os.path.realpath(os.path.join(directory, ckpt.CHECKPOINTS))


def _plan_named_resume(directory: str, config: TrainConfig, run: dict | None) -> RunPlan:
    """``--resume DIR``: the run's own newest checkpoint continues the run; an older one of this
    directory rolls back (a new run id); one of another directory starts a new run here, after the
    checks of a fresh start."""
    chosen = config.resume
    state = ckpt.read_trainer_state(chosen)
    own = _is_own(chosen, directory)
    if not own:
        _check_fresh(directory, config)
    run_id = state.get("run_id")
    siblings = ckpt.list_checkpoints(directory, run_id) if run_id and own else []
    newest = siblings[-1] if siblings else None
    _compare(state, chosen, config)
    _verified(chosen, siblings or [chosen])
    if newest and os.path.samefile(newest, chosen) and run and run.get("run_id") == run_id:
        return RunPlan(run_id, chosen, run.get("parent"), continues=True)
    return RunPlan(_new_id(), chosen, parent=os.path.abspath(chosen), continues=own)


def _plan_resume(directory: str, config: TrainConfig) -> RunPlan:
    run = read_run(directory)
    if isinstance(config.resume, str):
        return _plan_named_resume(directory, config, run)
    if run is None or not run.get("run_id"):
        where = os.path.join(directory, ckpt.CHECKPOINTS)
        raise ckpt.CheckpointError(
            f"--resume: no checkpoint of a drdo run under {where}; start without --resume (or pass --save-every N "
            "to write checkpoints), or name a checkpoint directory: --resume DIR")
    if _finished(run, config):
        return RunPlan(run["run_id"], finished=True)
    candidates = ckpt.list_checkpoints(directory, run["run_id"])
    parent = run.get("parent")
    if not candidates and parent and os.path.isdir(parent):
        candidates = [parent]
    if not candidates:
        raise ckpt.CheckpointError(
            f"--resume: no checkpoint of run {run['run_id']} under {os.path.join(directory, ckpt.CHECKPOINTS)}; "
            "start without --resume (or pass --save-every N to write checkpoints)")
    chosen = candidates[-1]
    state = ckpt.read_trainer_state(chosen)
    _compare(state, chosen, config)
    _refuse_to_drop_final_steps(directory, run, state["step"])
    _verified(chosen, candidates + ([parent] if parent and os.path.isdir(parent) else []))
    return RunPlan(run["run_id"], chosen, parent, continues=_is_own(chosen, directory))


def _refuse_to_drop_final_steps(directory: str, run: dict, step: int) -> None:
    """CheckpointError when ``run`` is complete but its newest checkpoint (``step``) is older than its final
    step (that checkpoint is removed once the final model is exported): resuming would retrain from
    ``step`` and drop the steps after it."""
    total = run.get("total_steps")
    if run.get("complete") is not True or (isinstance(total, int) and step >= total):
        return
    ended = f"at step {total}" if isinstance(total, int) else "(its final step is not recorded)"
    raise ckpt.CheckpointError(
        f"--resume: the run in {directory} is complete {ended} and its newest checkpoint is step {step}: "
        f"resuming it with other settings would drop the steps after {step}; to train further, start a new run "
        f"from its model (--model {directory} --output-dir NEW_DIR)")


def _compare(state: dict, chosen: str, config: TrainConfig) -> None:
    saved = state.get("config") or {}
    diffs = config_differences(saved, config, resuming=True, recorded=state)
    if isinstance(saved.get("max_steps"), int) and isinstance(config.max_steps, int) \
            and config.max_steps < state["step"]:
        diffs.append(f"max_steps {config.max_steps} is below the checkpoint's step {state['step']}")
    if diffs and config.allow_config_change:
        logger.warning("--allow-config-change: resuming %s with %s", chosen, "; ".join(diffs))
        return
    if diffs:
        raise ckpt.CheckpointError(
            f"checkpoint {chosen} was written with another config: {'; '.join(diffs)}; resume with the same "
            "settings, or pass --allow-config-change to continue anyway")


def plan_run(config: TrainConfig) -> RunPlan:
    """Check the (locked) output directory for this run and decide what to resume; writes nothing."""
    if config.resume:
        return _plan_resume(config.output_dir, config)
    run = _check_fresh(config.output_dir, config)
    if _finished(run, config):
        return RunPlan(run["run_id"], finished=True)
    return RunPlan(_new_id())


def _write_run(directory: str, run: dict) -> None:
    write_text(os.path.join(directory, RUN_FILE), json.dumps(run, indent=2, default=str))


def commit_run(config: TrainConfig, plan: RunPlan, digests: dict[str, str | None]) -> None:
    """Record the run as the owner of its directory, its model not complete yet: run.json (with
    the :func:`input_digests` the trainer took at start), then config.yaml (both atomic); then
    remove what a killed run left half-written."""
    directory = config.output_dir
    _write_run(directory, {"run_id": plan.run_id, "parent": plan.parent, **digests,
                           "complete": False, "config": config.to_dict()})
    save_yaml(config, os.path.join(directory, CONFIG_FILE))
    ckpt.remove_stale_temporaries(directory)


def mark_complete(directory: str, total_steps: int) -> None:
    """Record in run.json that ``directory`` holds the complete final model of its run (call it
    after the export, before anything else is removed)."""
    run = read_run(directory)
    _write_run(directory, dict(run, complete=True, total_steps=total_steps))
