"""Causal LMs: the tiny built-in model, Hugging Face checkpoints (safetensors only), and their attention.

``"tiny"`` (:data:`TINY_MODEL_NAME`: a 2-layer, 64-wide Llama over the byte tokenizer's vocabulary) is
built from a config, so tests and the demo never download anything. Anything else goes through
``AutoModelForCausalLM.from_pretrained``. Attention: flash-attn on CUDA in 16 bits when the package
imports, otherwise sdpa (eager for an architecture without sdpa, unless a choice was explicit).
:func:`check_device` and :func:`check_attn_implementation` refuse a device or an attention that
this machine cannot run (ConfigError, one line) before anything is loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os

import torch
import torch.nn as nn

from drdo.errors import ConfigError, ModelFormatError, shown
from drdo.hub import looks_like_path
from drdo.models.reward_head import HEAD_WEIGHTS_NAME
from drdo.run_record import model_problem

__all__ = [
    "TINY_MODEL_NAME",
    "weights_digest",
    "build_tiny_causal_lm",
    "is_tiny_model",
    "load_causal_lm",
    "default_attn_implementation",
    "training_attn_implementation",
    "flash_attn_available",
    "set_attn_implementation",
    "dtype_kwarg",
    "check_device",
    "check_attn_implementation",
]

logger = logging.getLogger(__name__)

#: ``name_or_path`` that selects the tiny config-built Llama.
TINY_MODEL_NAME = "tiny"


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


def dtype_kwarg() -> str:
    """The keyword that gives ``from_pretrained`` a dtype: ``dtype`` from transformers 4.56 on, before it
    ``torch_dtype``."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


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


def check_device(device: str | torch.device | None, flag: str = "--device") -> torch.device:
    """The device ``device`` names, checked on this machine: "auto"/None -> cuda if available, else cpu;
    "cpu"; "cuda" or "cuda:N" when CUDA is available and has a device N. Anything else (an unknown
    name, CUDA on a machine without it) raises ConfigError naming ``flag`` and the value."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{flag} {shown(device)} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} {shown(device)}: only 'auto', 'cpu', 'cuda' and 'cuda:N' are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {shown(device)}: CUDA is not available on this machine; use --device cpu "
                              "(or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {shown(device)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


#: Attention implementations that need a package beyond transformers: (import name, pip package).
_ATTN_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn (pip install 'drdo[flash]')"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (flash_attn_interface)")}


def check_attn_implementation(name: str | None, flag: str = "--attn-implementation") -> None:
    """None (the default choice) or an attention implementation transformers knows ("eager", "sdpa",
    "flash_attention_2", "flex_attention", ..., or a hub kernel "org/name") whose package imports;
    flash-attn also needs CUDA. ConfigError naming ``flag`` and the value otherwise."""
    if name is None or "/" in name:
        return
    from transformers import AttentionInterface

    known = ["eager", *AttentionInterface().valid_keys()]
    if name not in known:
        raise ConfigError(f"{flag} {shown(name)} is not an attention implementation; use one of {', '.join(known)}")
    module, package = _ATTN_PACKAGES.get(name, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag} {name} needs the {package} package, which is not installed; use sdpa")
    if module is not None and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {name} runs on CUDA only, and CUDA is not available on this machine; use sdpa")


def training_attn_implementation(
    requested: str | None, device: torch.device | str | int | None, compute_dtype: torch.dtype | str | None
) -> str:
    """Attention for training: ``requested`` when given, else :func:`default_attn_implementation` for
    the device and the COMPUTE dtype (bf16 under autocast or FSDP2 mixed precision, even though the
    master weights stay float32): "flash_attention_2" on CUDA in 16 bits when flash-attn is
    importable, otherwise "sdpa"."""
    return requested or default_attn_implementation(device, compute_dtype)


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


def set_attn_implementation(lm: nn.Module, attn_implementation: str) -> None:
    """Switch a loaded HF model to ``attn_implementation`` ("sdpa", "eager", "flash_attention_2", ...)."""
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(attn_implementation)
    else:  # transformers < 4.56
        lm.config._attn_implementation = attn_implementation


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
        if looks_like_path(str(name_or_path)) and not os.path.exists(path):
            raise FileNotFoundError(f"model directory {name_or_path} does not exist")
        _check_model_dir(path)
        impl = attn_implementation or default_attn_implementation(device, torch_dtype)
        kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
        kwargs[dtype_kwarg()] = torch_dtype if torch_dtype is not None else "auto"
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
        set_attn_implementation(lm, wanted)
    return lm.eval()


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
