"""Training checkpoints: written atomically, loaded safely, resumed bit-exactly on CPU.

Layout of ``<output_dir>/checkpoints/step-0000010/``:
* an HF-format policy (config.json, model.safetensors, reward_head.safetensors/.json,
  tokenizer files): loadable by ``PolicyWithRewardHead.from_pretrained`` or any HF tool;
* ``optimizer.pt``: the full (unsharded) AdamW state, FQN-keyed (torch.save of tensors
  and plain Python values, read back with ``torch.load(weights_only=True)``);
* ``rng-rank{r}.pt``: each rank's torch (and CUDA) RNG state;
* ``trainer_state.json``: the optimizer step reached, world size, run id, config and last metrics;
* ``manifest.json``: the sha256 digest of every other file, written last; a checkpoint whose
  files do not match it is corrupt and is never resumed (:func:`verify_checkpoint`).

Every checkpoint carries the id of the run that wrote it: resuming and pruning only look at
the checkpoints of one run (:mod:`drdo.training.rundir` decides which). A checkpoint name
already taken by another run's checkpoint is not overwritten: that one is renamed to
``step-...-run-<id>`` and can still be resumed by its path.

A checkpoint is first written to a fresh directory ``checkpoints/.tmp-step-...-<random>``
(made by :func:`tempfile.mkdtemp`) and renamed into place with ``os.replace``, so a crash
mid-write never leaves a half checkpoint under a ``step-*`` name; the next run into the
directory removes what a killed one left (:func:`remove_stale_temporaries`). Under FSDP2 the full
model and optimizer state dicts are gathered to rank 0
(``get_model_state_dict(full_state_dict=True, cpu_offload=True)``); on load every rank reads the
files and ``set_*_state_dict`` reshards them.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil

import torch
from torch import nn

from drdo.atomic import fresh_directory
from drdo.data.sources import file_sha256
from drdo.training.distributed import DistState, barrier, broadcast_object

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
EXPORT_TMP_PREFIX = ".tmp-export-"
POLICY_PREFIX = "policy."
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or does not fit the run."""


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS, f"step-{step:07d}")


def checkpoint_run_id(directory: str) -> str | None:
    """The run id stored in a checkpoint's trainer_state.json (None: unreadable or written without one)."""
    try:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
            run_id = json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def list_checkpoints(output_dir: str, run_id: str | None = None) -> list[str]:
    """Complete step checkpoints under output_dir/checkpoints, oldest first; only those written by
    run ``run_id`` when given."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            if run_id is None or checkpoint_run_id(path) == run_id:
                found.append((int(m.group(1)), path))
    return [path for _, path in sorted(found)]


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """Remove the half-written checkpoints and exports a killed run left in ``output_dir`` (call it
    with the directory's lock held); returns what was removed."""
    root = os.path.join(output_dir, CHECKPOINTS)
    found = [os.path.join(root, n) for n in (os.listdir(root) if os.path.isdir(root) else [])
             if n.startswith(TMP_PREFIX + "step-")]
    found += [os.path.join(output_dir, n) for n in os.listdir(output_dir) if n.startswith(EXPORT_TMP_PREFIX)]
    for path in found:
        if os.path.islink(path) or not os.path.isdir(path):
            os.remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return found


def latest_checkpoint(output_dir: str, run_id: str | None = None) -> str | None:
    """The complete checkpoint with the highest step under output_dir/checkpoints (of run ``run_id``
    when given), or None."""
    found = list_checkpoints(output_dir, run_id)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str, keep: int, run_id: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` step checkpoints of run ``run_id`` (keep=0: delete none);
    returns the deleted. Checkpoints of other runs are never touched."""
    if keep <= 0:
        return []
    old = list_checkpoints(output_dir, run_id)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


# ---------------------------------------------------------------- integrity and disk full


def write_manifest(directory: str) -> None:
    """Write manifest.json: {"files": {name: sha256}} of every other file in ``directory`` (call it last)."""
    files = {name: file_sha256(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
             if name != MANIFEST_FILE and os.path.isfile(os.path.join(directory, name))}
    with open(os.path.join(directory, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(directory: str) -> str | None:
    """Why a checkpoint cannot be trusted (no manifest, a missing file, a digest mismatch), or None."""
    try:
        with open(os.path.join(directory, MANIFEST_FILE), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (incomplete, or written by an older drdo)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST_FILE} is unreadable ({e})"
    if not isinstance(files, dict) or STATE_FILE not in files:
        return f"its {MANIFEST_FILE} does not list {STATE_FILE}"
    for name, want in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if file_sha256(path) != want:
            return f"{name} does not match its sha256 digest in {MANIFEST_FILE}"
    return None


def verify_checkpoint(directory: str) -> None:
    """CheckpointError naming ``directory`` and the problem unless every file matches the manifest."""
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise CheckpointError(f"checkpoint {directory} is corrupt: {problem}")


_DISK_FULL_MARKERS = ("no space left", "enospc", "code: 28", "disk quota", "unexpected pos", "file write failed")


def is_disk_full(err: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, and for torch's and safetensors' wrapped forms of it
    ("[enforce fail at inline_container.cc] . unexpected pos", "IoError(Os { code: 28 ...")."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return any(marker in text for marker in _DISK_FULL_MARKERS)


def _write_guard(what: str, kept: str | None):
    """Context manager yielding a list: on a write failure the directories put in it are removed and
    one CheckpointError line is raised."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        made: list[str] = []
        try:
            yield made
        except Exception as e:  # OSError, torch's RuntimeError, safetensors' own error type
            if not isinstance(e, OSError) and not is_disk_full(e):
                raise
            for tmp in made:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = "no space left on device" if is_disk_full(e) else f"{type(e).__name__}: {e}"
            where = f"the checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
            raise CheckpointError(f"{cause} while writing {what}; {where}; free space and resume with --resume") from e

    return guard()


# ---------------------------------------------------------------- gathering (all ranks call these)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def gather_model_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict of ``root`` on rank 0 ({} on other ranks under FSDP2). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(root, options=_options(full_state_dict=True, cpu_offload=True))


def gather_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full CPU optimizer state dict (FQN-keyed) on rank 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------- export of the policy


def export_policy(policy: nn.Module, full_state: dict[str, torch.Tensor] | None, directory: str, tokenizer=None) -> str:
    """Write ``policy`` as an HF model directory (+ reward head, + tokenizer).

    full_state: None to save the module's own (unsharded) weights, or the root-keyed full
    state dict from :func:`gather_model_state` (keys "policy.lm.*", "policy.reward_head.*"),
    used under FSDP2 where the module's parameters are shards.
    """
    from drdo.models import save_head

    os.makedirs(directory, exist_ok=True)
    if full_state is None:
        policy.save_pretrained(directory, tokenizer=tokenizer)
        return directory
    lm_sd = _strip(full_state, POLICY_PREFIX + "lm.")
    head_sd = _strip(full_state, POLICY_PREFIX + "reward_head.")
    policy.lm.save_pretrained(directory, state_dict=dict(lm_sd))
    head = nn.Linear(head_sd["weight"].shape[1], 1, bias="bias" in head_sd, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(head_sd["weight"])
        if "bias" in head_sd:
            head.bias.copy_(head_sd["bias"])
    save_head(head, directory, trained=policy.head_trained)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- save


def save_checkpoint(
    output_dir: str,
    step: int,
    *,
    root: nn.Module,
    optimizer: torch.optim.Optimizer,
    dist_state: DistState,
    tokenizer=None,
    trainer_state: dict | None = None,
    kept: str | None = None,
) -> str:
    """Write checkpoint ``step`` atomically, manifest last; every rank must call it. Returns its directory.

    ``kept`` names the previous good checkpoint for the error message when the write fails
    (disk full: one :class:`CheckpointError` line; the half-written directory is removed).
    """
    final = step_dir(output_dir, step)
    what = f"checkpoint {final}"
    with _write_guard(what, kept) as made:
        tmp = None
        if dist_state.is_main:
            tmp = fresh_directory(os.path.dirname(final), f"{TMP_PREFIX}{os.path.basename(final)}-")
            made.append(tmp)
        tmp = broadcast_object(dist_state, tmp)
        full = gather_model_state(root) if dist_state.distributed else None
        optim_state = gather_optimizer_state(root, optimizer)
        if dist_state.is_main:
            export_policy(root.policy, full, tmp, tokenizer)
            torch.save(optim_state, os.path.join(tmp, OPTIM_FILE))
        torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{dist_state.rank}.pt"))
        barrier(dist_state)
        if dist_state.is_main:
            state = dict(trainer_state or {}, step=step, world_size=dist_state.world_size)
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2, default=str)
            write_manifest(tmp)
            _move_aside_or_remove(final, state.get("run_id"))
            os.replace(tmp, final)
    barrier(dist_state)
    return final


def _move_aside_or_remove(path: str, run_id: str | None) -> None:
    """Make room for a new checkpoint at ``path``: a checkpoint of the same run is replaced, one of
    another run is renamed ``<path>-run-<its id>`` (never deleted)."""
    if not os.path.exists(path):
        return
    other = checkpoint_run_id(path)
    if other is not None and other != run_id:
        os.replace(path, f"{path}-run-{other}")
    else:
        shutil.rmtree(path)


def export_final(policy: nn.Module, full_state: dict[str, torch.Tensor] | None, directory: str, tokenizer=None,
                 *, kept: str | None = None) -> str:
    """The final export: every file is written to a fresh ``directory/.tmp-export-<random>`` first and
    renamed into ``directory`` only when all were written (a full disk leaves the old files and
    ``kept`` in place and raises one :class:`CheckpointError` line). The directory holds a complete
    model only once :func:`drdo.training.rundir.mark_complete` has recorded it."""
    with _write_guard(f"the final model to {directory}", kept) as made:
        tmp = fresh_directory(directory, EXPORT_TMP_PREFIX)
        made.append(tmp)
        export_policy(policy, full_state, tmp, tokenizer)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        os.rmdir(tmp)
    return directory


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


# ---------------------------------------------------------------- load


def read_trainer_state(directory: str) -> dict:
    """trainer_state.json of a checkpoint; CheckpointError when missing or unreadable."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = os.path.join(directory, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a complete checkpoint: {STATE_FILE} is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {directory} is corrupt: cannot read {STATE_FILE}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {directory} is corrupt: {STATE_FILE} has no integer 'step'")
    return state


def load_checkpoint(directory: str, *, root: nn.Module, optimizer: torch.optim.Optimizer,
                    dist_state: DistState) -> dict:
    """Restore model, optimizer and this rank's RNG from ``directory``; returns trainer_state.

    Every rank reads the files (shared filesystem). Raises CheckpointError on a missing,
    incomplete or corrupt checkpoint, or one whose tensors do not fit the model.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = read_trainer_state(directory)
    model_sd = _read_policy_tensors(directory, root)
    try:
        optim_sd = torch.load(os.path.join(directory, OPTIM_FILE), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a complete checkpoint: {OPTIM_FILE} is missing") from None
    except Exception as e:  # pickle/zip errors of a truncated file
        raise CheckpointError(f"checkpoint {directory} is corrupt: cannot read {OPTIM_FILE}: {e}") from None
    try:
        set_model_state_dict(root, model_sd, options=_options(full_state_dict=True))
        set_optimizer_state_dict(root, optimizer, optim_sd, options=_options(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {directory} does not fit this model/optimizer: {e}") from None
    rng_path = os.path.join(directory, f"rng-rank{dist_state.rank}.pt")
    if os.path.isfile(rng_path):
        try:
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {directory} is corrupt: cannot read {rng_path}: {e}") from None
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def _read_policy_tensors(directory: str, root: nn.Module) -> dict[str, torch.Tensor]:
    """Root-keyed full state dict from the HF files of a checkpoint (tied weights filled in)."""
    from safetensors.torch import load_file

    from drdo.models import HEAD_WEIGHTS_NAME

    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors") and n != HEAD_WEIGHTS_NAME)
    if not names:
        raise CheckpointError(f"{directory} is not a complete checkpoint: no model*.safetensors file")
    sd: dict[str, torch.Tensor] = {}
    try:
        for name in names:
            sd.update({POLICY_PREFIX + "lm." + k: v for k, v in load_file(os.path.join(directory, name)).items()})
        head = load_file(os.path.join(directory, HEAD_WEIGHTS_NAME))
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory} is not a complete checkpoint: {e}") from None
    except Exception as e:  # safetensors raises its own types for a bad header or truncated file
        raise CheckpointError(f"checkpoint {directory} is corrupt: {e}") from None
    sd.update({POLICY_PREFIX + "reward_head." + k: v for k, v in head.items()})
    expected = _expected_keys(root)
    missing = expected - set(sd)
    for key in list(missing):  # tied output embeddings are saved once
        tied = _tied_source(key, root)
        if tied is not None and tied in sd:
            sd[key] = sd[tied]
            missing.discard(key)
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks tensors {sorted(missing)[:5]} (of {len(missing)})")
    return {k: v for k, v in sd.items() if k in expected}


def _expected_keys(root: nn.Module) -> set[str]:
    return set(root.state_dict().keys())


def _tied_source(key: str, root: nn.Module) -> str | None:
    """For a tied LM head key, the key of the input embedding it shares storage with."""
    policy = root.policy
    if not getattr(policy.config, "tie_word_embeddings", False):
        return None
    out_emb, in_emb = policy.lm.get_output_embeddings(), policy.lm.get_input_embeddings()
    names = {id(m): n for n, m in root.named_modules()}
    if key == names.get(id(out_emb)) + ".weight":
        return names.get(id(in_emb)) + ".weight"
    return None
