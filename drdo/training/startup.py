"""What a training run checks before it writes anything, and what a failed start removes.

The checks raise one-line errors while the output directory holds nothing of the run but its lock:
a backend that cannot run on the run's device, a tokenizer with more tokens than the model's
embedding has rows, a start model whose weights hold NaN or inf. A start that fails (these checks,
bad data, a busy or foreign directory) removes the directories it created, innermost first, while
each holds nothing but its own lock file; a directory another job writes into is left as it is.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

import torch

from drdo.config import ConfigError, TrainConfig
from drdo.errors import ModelFormatError
from drdo.run_record import LOCK_FILE
from drdo.training.rundir import RunLock

__all__ = ["check_backend", "check_vocabulary", "check_finite_start", "missing_directories",
           "remove_own_directories"]


def check_finite_start(config: TrainConfig, policy) -> None:
    """ModelFormatError when a weight of the start model (its reward head included, when it is kept) holds
    NaN or inf: such a model cannot be trained, whatever the learning rate."""
    for name, tensor in policy.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFormatError(f"--model {config.model}: the start model is bad: its tensor {name} holds NaN "
                                   "or inf; train from a model whose weights are finite")


def check_vocabulary(config: TrainConfig, tokenizer, policy) -> None:
    """ConfigError when the tokenizer has more tokens than the model's input embedding has rows (a token
    id past the last row would fail at the first step)."""
    rows = policy.lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        which = f"--tokenizer {config.tokenizer}" if config.tokenizer else f"the tokenizer of --model {config.model}"
        raise ConfigError(f"{which} has {len(tokenizer)} tokens but the embedding of --model {config.model} has "
                          f"{rows} rows; use the model's own tokenizer, or one of at most {rows} tokens")


def check_backend(config: TrainConfig, device: torch.device) -> None:
    """ConfigError when ``--backend`` cannot run on the run's device (triton on a CPU without the interpreter)."""
    from drdo_kernels.logprobs import resolve_backend

    try:
        resolve_backend(config.backend, device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--backend {config.backend}: {e}") from None


def missing_directories(path: str) -> list[str]:
    """The directories on the way to ``path`` (itself included) that do not exist yet, innermost first."""
    path, missing = os.path.abspath(path), []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_own_directories(created: list[str], lock: RunLock) -> None:
    """After a failed start: remove the lock file this run made, then each directory it created,
    innermost first, while the directory is empty (``os.rmdir``). A directory that holds anything
    else (another run writing beside this one) is left, and so is every directory above it."""
    if not created:
        return
    _remove_lock_file(os.path.join(created[0], LOCK_FILE), lock)
    for directory in created:
        try:
            os.rmdir(directory)
        except OSError:
            return


def _remove_lock_file(path: str, lock: RunLock) -> None:
    """Remove the lock file ``path`` while holding its lock: ``lock``'s, or (when ``lock`` gave it up, e.g. the
    directory proved unwritable) a fresh non-blocking flock; a lock file that another run holds is left."""
    if lock.held:
        with contextlib.suppress(OSError):
            os.remove(path)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.remove(path)
    except OSError:
        pass
    finally:
        os.close(fd)
