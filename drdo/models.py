"""Causal LMs with a scalar reward head: the Oracle, and the DRDO student for ``reward="head"``.

:class:`PolicyWithRewardHead` wraps any Hugging Face ``AutoModelForCausalLM`` (``.lm``) and adds
``.reward_head = nn.Linear(H, 1)`` (float32). Its forward pass runs the decoder stack only
(``lm.base_model``, the module the CausalLM itself calls before its LM head) and returns

* ``hidden_states`` [B, T, H] in the model dtype: the final hidden states, after the last norm,
  exactly what ``lm.lm_head`` would receive;
* ``rewards`` [B] float32: the head applied to the hidden state of the last non-padding token;
* ``logits`` [B, T, V]: only with ``return_logits=True``. By default the [B, T, V] logits are never
  built: the fused kernels in :mod:`drdo_kernels` compute log-probs from ``hidden_states`` and
  ``lm_head.weight`` chunk by chunk.

On disk a policy is a plain Hugging Face model directory (``config.json`` + ``model.safetensors``,
loadable by ``AutoModelForCausalLM.from_pretrained`` in any HF tool) plus two small files of ours:
``reward_head.safetensors`` (tensors ``weight`` [1, H] and ``bias`` [1], float32) and
``reward_head.json`` (``{"format": "drdo-reward-head", "version": 1, "hidden_size": H, "trained": true}``;
``trained`` says whether the head was trained as a reward model, see :func:`head_is_trained`).

The tiny model (``"tiny"``: a 2-layer, 64-wide Llama over the byte tokenizer's vocabulary) is built
from a config, so tests and the demo never download anything.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from drdo.atomic import write_text
from drdo.run_record import model_problem

__all__ = [
    "TINY_MODEL_NAME",
    "HEAD_WEIGHTS_NAME",
    "HEAD_CONFIG_NAME",
    "ModelFormatError",
    "PolicyOutput",
    "PolicyWithRewardHead",
    "build_tiny_causal_lm",
    "load_causal_lm",
    "default_attn_implementation",
    "training_attn_implementation",
    "new_reward_head",
    "sequence_rewards",
    "last_token_indices",
    "count_parameters",
    "find_transformer_blocks",
    "head_is_trained",
    "is_tiny_model",
    "weights_digest",
]

logger = logging.getLogger(__name__)

#: ``name_or_path`` that selects the tiny config-built Llama.
TINY_MODEL_NAME = "tiny"
#: File names of the reward head inside a saved model directory.
HEAD_WEIGHTS_NAME = "reward_head.safetensors"
HEAD_CONFIG_NAME = "reward_head.json"
_HEAD_FORMAT = "drdo-reward-head"
_HEAD_VERSION = 1

#: Dotted paths (from the CausalLM) of the list of decoder layers, tried in order.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.language_model.layers",  # multimodal wrappers
)
#: Config attributes that make a model's logits differ from ``lm_head(hidden)``.
_LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ModelFormatError(ValueError):
    """A model directory or reward-head file is missing, corrupt or inconsistent."""


@dataclass
class PolicyOutput:
    """Result of :meth:`PolicyWithRewardHead.forward`.

    hidden_states: [B, T, H] model dtype, final hidden states (after the last norm).
    rewards: [B] float32, reward head on the last non-padding token of each row.
    logits: [B, T, V] model dtype, or None unless ``return_logits=True``.
    """

    hidden_states: torch.Tensor
    rewards: torch.Tensor
    logits: torch.Tensor | None = None


# --------------------------------------------------------------------------- helpers


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a torch.dtype, or a name ("bf16", "bfloat16", "float32", ...) -> torch.dtype | None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower().removeprefix("torch."))
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating-point dtype {dtype!r}; use e.g. 'bfloat16', 'float16' or 'float32'")
    return resolved


def _is_cuda(device: torch.device | str | int | None) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _dtype_kwarg() -> str:
    """transformers >= 4.56 takes ``dtype=``; older releases only ``torch_dtype=``."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _get_attr_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def default_attn_implementation(device: torch.device | str | int | None, dtype: torch.dtype | str | None = None) -> str:
    """"flash_attention_2" when flash-attn is importable, the device is CUDA and the dtype (if given)
    is fp16/bf16 (the only dtypes flash-attn runs); otherwise "sdpa"."""
    dtype = _resolve_dtype(dtype)
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if _is_cuda(device) and flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


def flash_attn_available() -> bool:
    """Whether the flash_attn package is importable (the optional ``[flash]`` extra)."""
    return importlib.util.find_spec("flash_attn") is not None


def training_attn_implementation(
    requested: str | None, device: torch.device | str | int | None, compute_dtype: torch.dtype | str | None
) -> str:
    """Attention for training: ``requested`` when given, else :func:`default_attn_implementation` for
    the device and the COMPUTE dtype (bf16 under autocast or FSDP2 mixed precision, even though the
    master weights stay float32): "flash_attention_2" on CUDA in 16 bits when flash-attn is
    importable, otherwise "sdpa"."""
    return requested or default_attn_implementation(device, compute_dtype)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def find_transformer_blocks(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers of a CausalLM (Llama/Qwen/Mistral ``model.layers``, OPT
    ``model.decoder.layers``, GPT-2 ``transformer.h``, GPT-NeoX ``gpt_neox.layers``), in order.
    Falls back to the single ``nn.ModuleList`` of length ``config.num_hidden_layers``."""
    for path in _BLOCK_PATHS:
        blocks = _get_attr_path(lm, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    n_layers = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    candidates = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if n_layers and len(candidates) == 1:
        return list(candidates[0])
    raise ValueError(
        f"cannot find the transformer blocks of {type(lm).__name__}: none of {', '.join(_BLOCK_PATHS)} exists "
        "and no unique nn.ModuleList has config.num_hidden_layers entries"
    )


# --------------------------------------------------------------------------- causal LMs


def build_tiny_causal_lm(
    vocab_size: int | None = None, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0
):
    """A small ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no download), float32, untied
    embeddings, sdpa attention. ``vocab_size`` defaults to ``drdo.tokenizer.TINY_VOCAB_SIZE``.
    Deterministic given ``seed``; the global RNG state is left untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None:
        from drdo.tokenizer import TINY_VOCAB_SIZE

        vocab_size = TINY_VOCAB_SIZE
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    return lm.float().eval()


def is_tiny_model(name_or_path: str | os.PathLike) -> bool:
    """True for ``"tiny"`` and for a directory holding a model of its architecture (e.g. the SFT
    output of the tiny model): config.json says llama, 2 layers, 64 wide, the byte vocabulary."""
    name = os.fspath(name_or_path)
    if name == TINY_MODEL_NAME:
        return True
    path = os.path.join(os.path.expanduser(name), "config.json")
    if not os.path.isfile(path):
        return False
    from drdo.tokenizer import TINY_VOCAB_SIZE

    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    wanted = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": TINY_VOCAB_SIZE}
    return isinstance(config, dict) and all(config.get(k) == v for k, v in wanted.items())


def _set_attn_implementation(lm: nn.Module, attn_implementation: str) -> None:
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(attn_implementation)
    else:  # transformers < 4.56
        lm.config._attn_implementation = attn_implementation


def _looks_like_local_path(name: str) -> bool:
    """True for names that cannot be hub ids ("org/model"): absolute, ./, ../, ~, or deeper paths."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _check_model_dir(path: str) -> None:
    """A local directory must hold config.json and safetensors weights, and be no unfinished drdo run
    (:func:`drdo.run_record.model_problem`); raises a clear error."""
    if not os.path.isdir(path):
        return
    problem = model_problem(path)
    if problem is not None:
        raise ModelFormatError(f"{path} {problem}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelFormatError(f"{path} is not a Hugging Face model directory: config.json is missing")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") and n != HEAD_WEIGHTS_NAME for n in names):
        others = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {', '.join(sorted(others))}; only safetensors weights are loaded)" if others else ""
        raise ModelFormatError(f"{path} holds no model*.safetensors weights{hint}")


def _from_pretrained_with_fallback(name_or_path: str, attn_implementation: str, explicit: bool, **kwargs):
    """AutoModelForCausalLM.from_pretrained; a default "sdpa" that the architecture does not
    support falls back to "eager" (an explicitly requested implementation is never swapped)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation=attn_implementation, **kwargs)
    except ValueError as err:
        message = str(err).lower()
        if explicit or attn_implementation != "sdpa" or not ("sdpa" in message or "scaled_dot_product" in message):
            raise
        logger.warning("%s does not support sdpa attention; using eager", name_or_path)
        return AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation="eager", **kwargs)


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | int | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    seed: int = 0,
):
    """A causal LM: ``"tiny"`` -> :func:`build_tiny_causal_lm` (``seed``), anything else ->
    ``AutoModelForCausalLM.from_pretrained`` (safetensors only). ``dtype`` None keeps the
    checkpoint's dtype (float32 for "tiny"). ``attn_implementation`` None picks
    :func:`default_attn_implementation` for the device and dtype. Returned in eval mode."""
    torch_dtype = _resolve_dtype(dtype)
    explicit = attn_implementation is not None
    if name_or_path == TINY_MODEL_NAME:
        lm = build_tiny_causal_lm(seed=seed)
        if torch_dtype is not None:
            lm = lm.to(torch_dtype)
    else:
        path = os.path.expanduser(str(name_or_path))
        if _looks_like_local_path(str(name_or_path)) and not os.path.exists(path):
            raise FileNotFoundError(f"model directory {name_or_path} does not exist")
        _check_model_dir(path)
        impl = attn_implementation or default_attn_implementation(device, torch_dtype)
        kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
        kwargs[_dtype_kwarg()] = torch_dtype if torch_dtype is not None else "auto"
        try:
            lm = _from_pretrained_with_fallback(path if os.path.isdir(path) else name_or_path, impl, explicit, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # HF and safetensors raise many types (OSError, SafetensorError, ...)
            raise ModelFormatError(f"cannot load a causal LM from {name_or_path}: {err}") from err
    if device is not None:
        lm = lm.to(device)
    current = getattr(lm.config, "_attn_implementation", None)
    if explicit:
        wanted = attn_implementation
    elif current == "flash_attention_2":  # dtype "auto" gave float32, which flash-attn cannot run
        wanted = default_attn_implementation(device, next(lm.parameters()).dtype)
    elif name_or_path == TINY_MODEL_NAME:
        wanted = default_attn_implementation(device, next(lm.parameters()).dtype)
    else:
        wanted = current  # keep what from_pretrained chose (sdpa, or eager after the fallback)
    if wanted != current:
        _set_attn_implementation(lm, wanted)
    return lm.eval()


# --------------------------------------------------------------------------- reward head


def new_reward_head(hidden_size: int, *, seed: int = 0, device: torch.device | str | None = None) -> nn.Linear:
    """``nn.Linear(hidden_size, 1)`` in float32: weight ~ N(0, 1/(H+1)), bias 0, seeded."""
    head = nn.Linear(hidden_size, 1, dtype=torch.float32, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.randn(1, hidden_size, generator=generator, dtype=torch.float32) / math.sqrt(hidden_size + 1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    return head


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] (0/1 or bool) -> [B] int64 index of the last position where it is 1.
    Works for right and left padding. Raises ValueError if a row has no token."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)
    if bool((last < 0).any()):
        rows = (last < 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} have no token (all padding); a reward needs >= 1 token")
    return last


def sequence_rewards(hidden: torch.Tensor, attention_mask: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Reward of each row: ``head(hidden[b, last non-padding position of b])``.

    hidden: [B, T, H] any float dtype; attention_mask: [B, T]; head: nn.Linear(H, 1).
    Returns [B] float32 (the head runs in float32 whatever the dtypes of hidden and head)."""
    if hidden.dim() != 3 or hidden.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"hidden must be [B, T, H] matching attention_mask [B, T]; got {tuple(hidden.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    last = last_token_indices(attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head_rewards(hidden[rows, last.to(hidden.device)], head)


def packed_sequence_rewards(hidden: torch.Tensor, cu_seqlens: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Reward of each packed sequence: ``head`` at its last token.

    hidden: [1, L, H] any float dtype (sequences back to back); cu_seqlens: [R + 1] int boundaries.
    Returns [R] float32."""
    from drdo.data.packing import last_token_index

    return head_rewards(hidden[0, last_token_index(cu_seqlens).to(hidden.device)], head)


def head_rewards(h_last: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """h_last: [R, H] any float dtype -> head(h_last) [R] float32 (the head runs in float32)."""
    bias = head.bias.float() if head.bias is not None else None
    return F.linear(h_last.float(), head.weight.float(), bias).squeeze(-1)


def _head_hidden_size(lm: nn.Module) -> int:
    """Width of the final hidden state = in_features of the LM head (differs from
    config.hidden_size for e.g. OPT-350m, which projects down before the head)."""
    out = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[1])
    return int(lm.config.hidden_size)


def _save_head(head: nn.Linear, directory: str, *, trained: bool | None = None) -> None:
    """Write reward_head.safetensors and reward_head.json (with ``trained`` when it is known)."""
    from safetensors.torch import save_file

    tensors = {"weight": head.weight.detach().float().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().float().cpu().contiguous()
    save_file(tensors, os.path.join(directory, HEAD_WEIGHTS_NAME), metadata={"format": _HEAD_FORMAT})
    meta = {"format": _HEAD_FORMAT, "version": _HEAD_VERSION, "hidden_size": int(head.in_features), "dtype": "float32"}
    if trained is not None:
        meta["trained"] = bool(trained)
    write_text(os.path.join(directory, HEAD_CONFIG_NAME), json.dumps(meta, indent=2))


def head_is_trained(directory: str | os.PathLike) -> bool | None:
    """Whether the reward head saved in ``directory`` was trained as a reward model (by ``drdo oracle
    train``, or ``drdo train --loss drdo`` with a head). Read from ``trained`` in reward_head.json;
    a file written before that key existed falls back to the ``stage`` in the directory's
    config.yaml. None when neither says (no head, a head of unknown origin, or not a directory)."""
    directory = os.path.expanduser(os.fspath(directory))
    meta_path = os.path.join(directory, HEAD_CONFIG_NAME)
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                trained = json.load(f).get("trained")
        except (OSError, ValueError, AttributeError):
            trained = None
        if isinstance(trained, bool):
            return trained
    config_path = os.path.join(directory, "config.yaml")
    if not os.path.isfile(os.path.join(directory, HEAD_WEIGHTS_NAME)) or not os.path.isfile(config_path):
        return None
    import yaml

    with open(config_path) as f:
        saved = yaml.safe_load(f)
    if not isinstance(saved, dict) or "stage" not in saved:
        return None
    return saved["stage"] == "oracle" or (saved["stage"] == "drdo" and saved.get("reward") == "head")


def weights_digest(model: str, seed: int = 0) -> str | None:
    """What the weights of ``model`` are: "tiny, seed N" (the tiny model is built from its seed), the
    sha256 of its safetensors weight files (the reward head aside: log-probs do not use it), or None
    (a hub id)."""
    from drdo.data.sources import file_sha256

    if model == TINY_MODEL_NAME:
        return f"tiny, seed {seed}"
    local = os.path.expanduser(model)
    if not os.path.isdir(local):
        return None
    names = sorted(n for n in os.listdir(local) if n.endswith(".safetensors") and n != HEAD_WEIGHTS_NAME)
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{file_sha256(os.path.join(local, name))}\n".encode())
    return "sha256:" + digest.hexdigest()


def _load_head(directory: str, hidden_size: int) -> nn.Linear:
    """Read reward_head.safetensors (+ reward_head.json when present); raises ModelFormatError."""
    from safetensors.torch import load_file

    path = os.path.join(directory, HEAD_WEIGHTS_NAME)
    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types for a bad header or truncated file
        raise ModelFormatError(f"reward head file {path} is corrupt or unreadable: {err}") from err
    weight = tensors.get("weight")
    if weight is None or tuple(weight.shape) != (1, hidden_size):
        got = None if weight is None else tuple(weight.shape)
        raise ModelFormatError(f"{path}: expected tensor 'weight' of shape (1, {hidden_size}), got {got}")
    bias = tensors.get("bias")
    if bias is not None and tuple(bias.shape) != (1,):
        raise ModelFormatError(f"{path}: expected tensor 'bias' of shape (1,), got {tuple(bias.shape)}")
    meta_path = os.path.join(directory, HEAD_CONFIG_NAME)
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ModelFormatError(f"{meta_path} is not valid JSON: {err}") from err
        if not isinstance(meta, dict) or meta.get("hidden_size") != hidden_size:
            raise ModelFormatError(f"{meta_path} says hidden_size {meta!r}, but the model's is {hidden_size}")
    head = nn.Linear(hidden_size, 1, bias=bias is not None, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    return head


# --------------------------------------------------------------------------- the policy


class PolicyWithRewardHead(nn.Module):
    """A causal LM (``.lm``) plus a scalar reward head (``.reward_head``, nn.Linear(H, 1), float32).

    Module tree: ``lm`` (the HF CausalLM, untouched) and ``reward_head``. ``backbone`` is
    ``lm.base_model`` (the decoder stack incl. the final norm), ``lm_head`` the LM's output
    embedding, ``transformer_blocks()`` its decoder layers (for FSDP2 ``fully_shard``).
    ``head_trained`` (True, False, or None: unknown) is written to reward_head.json on save: a
    fresh head is False; whoever trains the head as a reward model sets it to True.
    """

    def __init__(self, lm: nn.Module, reward_head: nn.Linear | None = None, *, seed: int = 0,
                 head_trained: bool | None = None):
        super().__init__()
        hidden_size = _head_hidden_size(lm)
        self.head_trained = head_trained
        if reward_head is None:
            self.head_trained = False
            device = next(lm.parameters()).device
            reward_head = new_reward_head(hidden_size, seed=seed, device=device)
        if not isinstance(reward_head, nn.Linear) or reward_head.out_features != 1:
            raise ValueError(f"reward_head must be nn.Linear(H, 1), got {reward_head!r}")
        if reward_head.in_features != hidden_size:
            raise ValueError(
                f"reward_head takes {reward_head.in_features} features but the LM's hidden size is {hidden_size}"
            )
        self.lm = lm
        self.reward_head = reward_head
        self.config = lm.config
        for attr in _LOGIT_TRANSFORM_ATTRS:
            if getattr(lm.config, attr, None) not in (None, 0, 1, 1.0):
                logger.warning(
                    "%s has config.%s=%s: its logits are not lm_head(hidden), so the log-probs computed "
                    "from hidden_states and lm_head.weight differ from the model's own",
                    type(lm).__name__, attr, getattr(lm.config, attr),
                )

    # ---- structure
    @property
    def backbone(self) -> nn.Module:
        """The decoder stack the CausalLM calls before its LM head (``lm.base_model``, e.g. lm.model)."""
        return self.lm.base_model

    @property
    def lm_head(self) -> nn.Module:
        """The output embedding (``lm.get_output_embeddings()``); ``.weight`` is [V, H]."""
        return self.lm.get_output_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.reward_head.in_features

    def transformer_blocks(self) -> list[nn.Module]:
        """The decoder layers, in order (see :func:`find_transformer_blocks`)."""
        return find_transformer_blocks(self.lm)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Activation checkpointing of the decoder layers (non-reentrant by default)."""
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.lm, "activation_checkpointing_disable", None) or self.lm.gradient_checkpointing_disable
        disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.lm.modules())

    # ---- compute
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> PolicyOutput:
        """input_ids [B, T] int64, attention_mask [B, T] (1 = token, 0 = padding; None = all tokens).

        Returns :class:`PolicyOutput`: hidden_states [B, T, H] model dtype, rewards [B] float32,
        logits [B, T, V] only when ``return_logits``. Hidden states at padding positions are
        unspecified. ``position_ids`` None: positions count the row's tokens (cumsum of the mask
        minus 1, like HF generation), so a left-padded row gives the same hidden states and reward
        as the same row right-padded; for right padding this equals the default 0..T-1.

        Packed (padding-free) input: ``cu_seqlens`` [R + 1] int (sequence r spans
        ``[cu_seqlens[r], cu_seqlens[r + 1])`` of the single row input_ids [1, L]), ``position_ids``
        [1, L] restarting at 0 per sequence, no attention_mask (see :mod:`drdo.data.packing`);
        rewards [R] are read at each sequence's last token.
        """
        if cu_seqlens is not None:
            return self._packed_forward(input_ids, attention_mask, position_ids, cu_seqlens, return_logits)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out[0]
        rewards = sequence_rewards(hidden, attention_mask, self.reward_head)
        logits = self.lm_head(hidden) if return_logits else None
        return PolicyOutput(hidden_states=hidden, rewards=rewards, logits=logits)

    def _packed_forward(self, input_ids, attention_mask, position_ids, cu_seqlens, return_logits) -> PolicyOutput:
        from drdo.data.packing import packed_attention_supported

        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or attention_mask is not None or position_ids is None:
            raise ValueError("packed input is input_ids [1, L] with position_ids [1, L], cu_seqlens [R + 1] and no "
                             f"attention_mask; got input_ids {tuple(input_ids.shape)}, attention_mask "
                             f"{attention_mask is not None}, position_ids {position_ids is not None}")
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != "flash_attention_2" and not packed_attention_supported():
            raise RuntimeError(f"packed sequences with {impl} attention need transformers >= 4.54 "
                               "(block-diagonal masks from position_ids), or flash_attention_2")
        out = self.backbone(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False)
        hidden = out[0]
        rewards = packed_sequence_rewards(hidden, cu_seqlens, self.reward_head)
        logits = self.lm_head(hidden) if return_logits else None
        return PolicyOutput(hidden_states=hidden, rewards=rewards, logits=logits)

    # ---- persistence
    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> str:
        """Write an HF model directory (config.json, model.safetensors, generation config) plus
        reward_head.safetensors / reward_head.json, and the tokenizer when given. Returns the path."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.lm.save_pretrained(directory)
        _save_head(self.reward_head, directory, trained=self.head_trained)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory_or_name: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | int | None = None,
        trust_remote_code: bool = False,
        require_head: bool = False,
        attn_implementation: str | None = None,
        seed: int = 0,
    ) -> "PolicyWithRewardHead":
        """Load a policy saved by :meth:`save_pretrained`, or wrap any causal LM (``"tiny"``, an HF
        directory or hub id). The LM gets ``dtype`` (None = as saved); the head stays float32.
        Without reward_head.safetensors (only local directories are searched) the head is fresh
        (seeded by ``seed``), or, with ``require_head=True``, a :class:`ModelFormatError` is raised.
        A missing directory raises FileNotFoundError; corrupt files raise ModelFormatError."""
        name = os.fspath(directory_or_name)
        lm = load_causal_lm(
            name, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, seed=seed,
        )
        hidden_size = _head_hidden_size(lm)
        local = os.path.expanduser(name)
        trained = False
        if os.path.isfile(os.path.join(local, HEAD_WEIGHTS_NAME)):
            head = _load_head(local, hidden_size)
            trained = head_is_trained(local)
        elif require_head:
            raise ModelFormatError(
                f"{name} has no reward head ({HEAD_WEIGHTS_NAME}); train one with `drdo oracle train` "
                "or pass require_head=False for a fresh head"
            )
        else:
            if name != TINY_MODEL_NAME:
                logger.info("%s has no %s: using a fresh reward head (seed %d)", name, HEAD_WEIGHTS_NAME, seed)
            head = new_reward_head(hidden_size, seed=seed)
        if device is not None:
            head = head.to(device)
        return cls(lm, head, seed=seed, head_trained=trained)

