"""Offline tokenizers: a byte-level tokenizer for the tiny model, and a loader for real ones.

The byte tokenizer is built on the fly with the ``tokenizers`` library (nothing is
downloaded or read from disk) and wrapped in the standard Hugging Face
``PreTrainedTokenizerFast`` interface, so ``encode``/``decode``/``__call__``/
``apply_chat_template``/``save_pretrained`` all work as with any hub tokenizer.

Vocabulary (``len(tokenizer) == 263``, padded to ``TINY_VOCAB_SIZE == 264`` in the model):
  - ids 0..255: one token per byte value (id == byte), so every UTF-8 string
    round-trips exactly through ``encode(..., add_special_tokens=False)``/``decode``;
  - ids 256..262: special tokens ``<|pad|>``, ``<|bos|>``, ``<|eos|>``, ``<|system|>``,
    ``<|user|>``, ``<|assistant|>``, ``<|end|>``.
No special token is added automatically when encoding (no BOS/EOS post-processor);
the data pipeline appends EOS to responses itself.

Chat template (role markers are single special tokens, no extra whitespace)::

    <|user|>Hi<|end|><|assistant|>Hello!<|end|>

``add_generation_prompt=True`` appends ``<|assistant|>``.
"""
from __future__ import annotations

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
END_OF_TURN_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN) + ROLE_TOKENS + (END_OF_TURN_TOKEN,)

NUM_BYTES = 256
BYTE_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)  # 263
TINY_VOCAB_SIZE = (BYTE_VOCAB_SIZE + 7) // 8 * 8  # 264: embedding rows of the tiny model

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map that byte-level pre-tokenizers use.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other
    68 bytes (controls, space, soft hyphen, ...) map, in increasing byte order, to the
    code points 256, 257, ... so that no token is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    next_code = NUM_BYTES
    for b in range(NUM_BYTES):
        if b not in mapping:
            mapping[b] = chr(next_code)
            next_code += 1
    return mapping


def _build_backend():
    """A ``tokenizers.Tokenizer``: byte-level BPE without merges (one token per byte) + specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])
    return backend


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded, or defines no EOS token."""


def build_byte_tokenizer():
    """The tiny model's tokenizer: byte-level, built in memory, no download.

    Returns a ``transformers.PreTrainedTokenizerFast`` with eos ``<|eos|>`` (id 258),
    pad ``<|pad|>`` (id 256, distinct from eos), bos ``<|bos|>`` (id 257, not added
    automatically) and a role-marker chat template (see the module docstring).
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[*ROLE_TOKENS, END_OF_TURN_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def get_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """``"tiny"`` -> :func:`build_byte_tokenizer`; anything else -> ``AutoTokenizer.from_pretrained``.

    Guarantees ``eos_token`` and ``pad_token`` (set to the eos token when missing). A tokenizer
    that cannot be loaded (a broken config.json or tokenizer.json, ...) or has no eos token raises
    :class:`TokenizerError`.
    """
    if name_or_path == "tiny":
        return build_byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers and tokenizers raise OSError, ValueError, JSONDecodeError, Exception, ...
        raise TokenizerError(f"cannot load the tokenizer of {name_or_path}: {type(err).__name__}: {err}") from err
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer {name_or_path!r} defines no eos_token; DRDO appends EOS to every response. "
            "Set one (tokenizer.eos_token = ...) and save the tokenizer before training."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its full definition (vocabulary, merges, normalizer,
    pre- and post-processing, added tokens; the sorted vocabulary for a tokenizer without a fast
    backend) and its EOS id. The chat template is not part of it."""
    import hashlib
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}\neos={tokenizer.eos_token_id}".encode("utf-8")).hexdigest()
