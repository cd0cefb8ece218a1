"""The offline byte-level tokenizer and get_tokenizer (no network, no files needed)."""
import random

import pytest

from drdo.tokenizer import (
    BYTE_VOCAB_SIZE,
    CHAT_TEMPLATE,
    TINY_VOCAB_SIZE,
    build_byte_tokenizer,
    byte_to_unicode,
    get_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def _random_text(rng: random.Random, n: int) -> str:
    """Random code points from the whole Unicode range except surrogates (not encodable in UTF-8)."""
    chars = []
    while len(chars) < n:
        cp = rng.randrange(0x110000) if rng.random() < 0.5 else rng.randrange(0x300)
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


def test_vocab_layout(tok):
    assert len(tok) == BYTE_VOCAB_SIZE == 263
    assert TINY_VOCAB_SIZE == 264 and TINY_VOCAB_SIZE % 8 == 0 and TINY_VOCAB_SIZE >= len(tok)
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 256)
    assert (tok.bos_token, tok.bos_token_id) == ("<|bos|>", 257)
    assert (tok.eos_token, tok.eos_token_id) == ("<|eos|>", 258)
    assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]) == [259, 260, 261, 262]
    assert len(set(tok.all_special_ids)) == 7


def test_byte_map_matches_tokenizers_alphabet():
    from tokenizers import pre_tokenizers

    mapping = byte_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("text", ["", "a", "hello world", "  two  spaces\n\ttab\r\n", "\x00\x01\x7f",
                                  "héllo wörld", "日本語", "🎉👍🏽", "<|eos|> is text here"])
def test_round_trip_known(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    if "<|eos|>" not in text:
        assert ids == list(text.encode("utf-8"))  # one token per byte, id == byte value
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randrange(1, 200)) for _ in range(50)]
    batch = tok(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, batch):
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_no_special_tokens_added_by_default(tok):
    assert tok("ab")["input_ids"] == [97, 98]
    assert tok.encode("ab") == [97, 98]


def test_special_tokens_are_single_ids_and_skippable(tok):
    ids = tok.encode("<|user|>hi<|end|><|eos|>")
    assert ids == [260, 104, 105, 262, 258]
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_template(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}]
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>S<|end|><|user|>Hi<|end|><|assistant|>Yo<|end|>"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>S<|end|><|user|>Hi<|end|><|assistant|>"
    ids = tok.apply_chat_template(messages[1:2], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == [260, 72, 105, 262, 261]


def test_save_and_reload_offline(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = get_tokenizer(str(tmp_path))
    text = "Ünïcödé ✓ <|user|>x"
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (256, 258)
    assert loaded.chat_template == tok.chat_template
    assert len(loaded) == len(tok)


def test_get_tokenizer_tiny():
    t = get_tokenizer("tiny")
    assert t.eos_token_id == 258 and t.pad_token_id == 256


def test_get_tokenizer_pad_falls_back_to_eos(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from drdo.tokenizer import _build_backend

    no_pad = PreTrainedTokenizerFast(tokenizer_object=_build_backend(), eos_token="<|eos|>")
    no_pad.save_pretrained(tmp_path)
    t = get_tokenizer(str(tmp_path))
    assert t.pad_token == "<|eos|>" and t.pad_token_id == t.eos_token_id == 258


def test_get_tokenizer_requires_eos(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from drdo.tokenizer import _build_backend

    PreTrainedTokenizerFast(tokenizer_object=_build_backend()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="eos_token"):
        get_tokenizer(str(tmp_path))
