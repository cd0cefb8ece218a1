"""PolicyWithRewardHead, the tiny model and their save/load format (CPU, tiny shapes)."""
from __future__ import annotations

import json
import operator
import os

import pytest
import torch
import torch.nn as nn

from drdo.models import (
    HEAD_CONFIG_NAME,
    HEAD_WEIGHTS_NAME,
    ModelFormatError,
    PolicyWithRewardHead,
    build_tiny_causal_lm,
    count_parameters,
    default_attn_implementation,
    last_token_indices,
    load_causal_lm,
    loading,
    new_reward_head,
    sequence_rewards,
)
from drdo.tokenizer import TINY_VOCAB_SIZE

B, T = 3, 9
# real tokens per row: row 0 full, row 1 five tokens, row 2 one token
LENGTHS = (9, 5, 1)


@pytest.fixture(scope="module")
def policy():
    return PolicyWithRewardHead(build_tiny_causal_lm(seed=0), seed=0).eval()


@pytest.fixture(scope="module")
def saved_dir(policy, tmp_path_factory):
    from drdo.tokenizer import build_byte_tokenizer

    directory = tmp_path_factory.mktemp("policy")
    policy.save_pretrained(directory, tokenizer=build_byte_tokenizer())
    return directory


def make_batch(padding_side: str, seed: int = 0):
    """input_ids [B, T] int64 and attention_mask [B, T] int64 with LENGTHS real tokens per row.
    Row contents are the same for both padding sides (pad id 0 on pad positions)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, TINY_VOCAB_SIZE, (B, T), generator=g)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        span = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[b, span] = tokens[b, :n]
        mask[b, span] = 1
    return input_ids, mask


def real_positions(mask: torch.Tensor, b: int) -> torch.Tensor:
    return mask[b].nonzero().flatten()


# ----------------------------------------------------------------------------- tiny model


def test_tiny_model_config_and_determinism():
    rng_before = torch.random.get_rng_state()
    a, b, c = build_tiny_causal_lm(seed=0), build_tiny_causal_lm(seed=0), build_tiny_causal_lm(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building must not touch the global RNG"
    cfg = a.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (TINY_VOCAB_SIZE, 64, 2)
    assert type(a).__name__ == "LlamaForCausalLM" and not cfg.tie_word_embeddings
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert all(v.dtype == torch.float32 for v in sa.values())


def test_load_causal_lm_tiny_dtype_and_seed():
    lm = load_causal_lm("tiny", dtype="bf16", seed=3)
    assert next(lm.parameters()).dtype == torch.bfloat16 and not lm.training
    ref = build_tiny_causal_lm(seed=3).to(torch.bfloat16)
    assert torch.equal(lm.lm_head.weight, ref.lm_head.weight)
    assert lm.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm("tiny", dtype="int8")


def test_default_attn_implementation(monkeypatch):
    assert default_attn_implementation("cpu") == "sdpa"
    assert default_attn_implementation(None) == "sdpa"
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert default_attn_implementation("cuda") == "flash_attention_2"
    assert default_attn_implementation(torch.device("cuda", 0), torch.bfloat16) == "flash_attention_2"
    assert default_attn_implementation("cuda", "float32") == "sdpa"  # flash-attn has no fp32 kernels
    assert default_attn_implementation("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    assert default_attn_implementation("cuda", torch.bfloat16) == "sdpa"


def test_sdpa_falls_back_to_eager_only_by_default(monkeypatch, saved_dir):
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained
    calls = []

    def fake(path, attn_implementation, **kwargs):
        calls.append(attn_implementation)
        if attn_implementation == "sdpa":
            raise ValueError(  # the message transformers gives
                "FooForCausalLM does not support an attention implementation through "
                "torch.nn.functional.scaled_dot_product_attention yet."
            )
        return real(path, attn_implementation=attn_implementation, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    lm = load_causal_lm(str(saved_dir))
    assert calls == ["sdpa", "eager"] and lm.config._attn_implementation == "eager"
    with pytest.raises(ModelFormatError, match="scaled_dot_product_attention"):
        load_causal_lm(str(saved_dir), attn_implementation="sdpa")


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_dtypes(policy):
    input_ids, mask = make_batch("right")
    out = policy(input_ids, mask)
    assert out.hidden_states.shape == (B, T, 64) and out.hidden_states.dtype == torch.float32
    assert out.rewards.shape == (B,) and out.rewards.dtype == torch.float32
    assert out.logits is None
    out = policy(input_ids, mask, return_logits=True)
    assert out.logits.shape == (B, T, TINY_VOCAB_SIZE)
    assert policy.reward_head.weight.dtype == torch.float32
    assert policy.lm_head.weight.shape == (TINY_VOCAB_SIZE, 64)
    assert policy.backbone is policy.lm.model and policy.config is policy.lm.config


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_rewards_equal_head_on_last_real_token(policy, padding_side):
    input_ids, mask = make_batch(padding_side)
    out = policy(input_ids, mask)
    for b in range(B):
        last = int(real_positions(mask, b)[-1])
        assert last == (LENGTHS[b] - 1 if padding_side == "right" else T - 1)
        expected = policy.reward_head(out.hidden_states[b, last]).squeeze()
        # a batched and a single-row matmul may round differently (BLAS kernels differ by CPU)
        torch.testing.assert_close(out.rewards[b], expected, rtol=1e-5, atol=1e-6)


def test_left_and_right_padding_give_the_same_rewards(policy):
    right_ids, right_mask = make_batch("right")
    left_ids, left_mask = make_batch("left")
    right, left = policy(right_ids, right_mask), policy(left_ids, left_mask)
    torch.testing.assert_close(left.rewards, right.rewards, rtol=1e-5, atol=1e-5)
    for b in range(B):
        torch.testing.assert_close(
            left.hidden_states[b, real_positions(left_mask, b)],
            right.hidden_states[b, real_positions(right_mask, b)],
            rtol=1e-5, atol=1e-5,
        )
    # each row's reward equals that row scored alone, without padding
    for b, n in enumerate(LENGTHS):
        alone = policy(right_ids[b : b + 1, :n], right_mask[b : b + 1, :n])
        torch.testing.assert_close(alone.rewards[0], right.rewards[b], rtol=1e-5, atol=1e-5)


def test_hidden_states_and_logits_match_the_hf_model(policy):
    input_ids, mask = make_batch("right")
    out = policy(input_ids, mask, return_logits=True)
    with torch.no_grad():
        ref = policy.lm(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    for b in range(B):
        real = real_positions(mask, b)
        torch.testing.assert_close(out.hidden_states[b, real], ref.hidden_states[-1][b, real], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.logits[b, real], ref.logits[b, real], rtol=1e-5, atol=1e-5)


def test_logits_are_not_computed_by_default(policy, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("lm_head called without return_logits")

    monkeypatch.setattr(policy.lm.lm_head, "forward", boom)
    monkeypatch.setattr(policy.lm, "forward", boom)
    input_ids, mask = make_batch("right")
    out = policy(input_ids, mask)
    assert out.logits is None and out.rewards.shape == (B,)
    with pytest.raises(AssertionError, match="lm_head called"):
        policy(input_ids, mask, return_logits=True)


def test_bf16_model_keeps_a_float32_head():
    policy = PolicyWithRewardHead.from_pretrained("tiny", dtype=torch.bfloat16)
    assert policy.lm.lm_head.weight.dtype == torch.bfloat16
    assert policy.reward_head.weight.dtype == torch.float32
    input_ids, mask = make_batch("right")
    out = policy(input_ids, mask)
    assert out.hidden_states.dtype == torch.bfloat16 and out.rewards.dtype == torch.float32
    last = torch.tensor([n - 1 for n in LENGTHS])
    expected = out.hidden_states[torch.arange(B), last].float() @ policy.reward_head.weight[0] + policy.reward_head.bias
    torch.testing.assert_close(out.rewards, expected)


def test_gradients_reach_head_and_backbone():
    policy = PolicyWithRewardHead(build_tiny_causal_lm(seed=0), seed=0).train()
    input_ids, mask = make_batch("left")
    out = policy(input_ids, mask)
    real = mask.unsqueeze(-1).float()  # padding positions do not enter the loss
    (out.rewards.sum() + (out.hidden_states.pow(2) * real).mean()).backward()
    names = ("reward_head.weight", "reward_head.bias", "lm.model.embed_tokens.weight", "lm.model.norm.weight",
             "lm.model.layers.0.self_attn.q_proj.weight", "lm.model.layers.1.mlp.down_proj.weight")
    for name in names:
        grad = policy.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert policy.lm.lm_head.weight.grad is None  # no logits -> the LM head is untouched
    # pad tokens of left-padded rows get no gradient through the embedding
    emb_grad = policy.lm.model.embed_tokens.weight.grad
    assert torch.equal(emb_grad[0], torch.zeros_like(emb_grad[0]))


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids, mask = make_batch("right")
    grads = []
    for checkpointing in (False, True):
        policy = PolicyWithRewardHead(build_tiny_causal_lm(seed=0), seed=0).train()
        if checkpointing:
            policy.gradient_checkpointing_enable()
            assert policy.is_gradient_checkpointing
        calls = []
        policy.lm.model.layers[0].input_layernorm.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        policy(input_ids, mask).rewards.sum().backward()
        # the block is recomputed in backward (non-reentrant recompute stops early, so hook its first op)
        assert len(calls) == (2 if checkpointing else 1)
        grads.append(policy.lm.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_input_validation(policy):
    input_ids, mask = make_batch("right")
    with pytest.raises(ValueError, match="attention_mask"):
        policy(input_ids, mask[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        policy(input_ids[0], mask[0])
    bad = mask.clone()
    bad[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\].*no token"):
        policy(input_ids, bad)
    with pytest.raises(ValueError, match="hidden size"):
        PolicyWithRewardHead(policy.lm, nn.Linear(32, 1))
    with pytest.raises(ValueError, match="nn.Linear"):
        PolicyWithRewardHead(policy.lm, nn.Linear(64, 2))


def test_sequence_rewards_and_last_token_indices():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_token_indices(mask).tolist() == [1, 3, 3, 1]
    assert last_token_indices(mask.bool()).tolist() == [1, 3, 3, 1]
    hidden = torch.randn(4, 4, 8, dtype=torch.float64)
    head = new_reward_head(8, seed=5)
    rewards = sequence_rewards(hidden, mask, head)
    expected = torch.stack([head(hidden[b, i].float()) for b, i in enumerate([1, 3, 3, 1])]).squeeze(-1)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="match"):
        sequence_rewards(hidden[:, :3], mask, head)


def test_new_reward_head_is_seeded_float32():
    a, b, c = new_reward_head(64, seed=1), new_reward_head(64, seed=1), new_reward_head(64, seed=2)
    assert a.weight.dtype == torch.float32 and a.weight.shape == (1, 64)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert torch.equal(a.bias, torch.zeros(1))
    assert 0.05 < a.weight.std().item() < 0.25  # N(0, 1/(H+1)): std 0.124


def test_structure_helpers(policy):
    blocks = policy.transformer_blocks()
    assert [id(m) for m in blocks] == [id(m) for m in policy.lm.model.layers]
    n = count_parameters(policy)
    assert n == sum(p.numel() for p in policy.lm.parameters()) + 64 + 1
    assert [name for name, _ in policy.named_children()] == ["lm", "reward_head"]


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2))


def _tiny_opt_with_projection():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=50, hidden_size=16, word_embed_proj_dim=8, num_hidden_layers=2, ffn_dim=32,
                    num_attention_heads=2, max_position_embeddings=32, do_layer_norm_before=False)
    return OPTForCausalLM(cfg)


@pytest.mark.parametrize("build, blocks_path, width", [(_tiny_gpt2, "transformer.h", 16),
                                                       (_tiny_opt_with_projection, "model.decoder.layers", 8)])
def test_other_architectures(build, blocks_path, width):
    lm = build().eval()
    policy = PolicyWithRewardHead(lm)
    assert policy.hidden_size == width  # OPT-350m style: head width = projected width, not hidden_size
    assert [id(m) for m in policy.transformer_blocks()] == [id(m) for m in operator.attrgetter(blocks_path)(lm)]
    input_ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = policy(input_ids, mask, return_logits=True)
    with torch.no_grad():
        ref = lm(input_ids=input_ids, attention_mask=mask)
    torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1, :4], ref.logits[1, :4], rtol=1e-5, atol=1e-5)
    assert out.hidden_states.shape == (2, 6, width)


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(policy, saved_dir):
    names = set(os.listdir(saved_dir))
    assert {"config.json", "model.safetensors", HEAD_WEIGHTS_NAME, HEAD_CONFIG_NAME, "tokenizer.json"} <= names
    assert json.loads((saved_dir / HEAD_CONFIG_NAME).read_text())["hidden_size"] == 64
    loaded = PolicyWithRewardHead.from_pretrained(saved_dir, require_head=True)
    assert loaded.reward_head.weight.dtype == torch.float32
    for side in ("right", "left"):
        input_ids, mask = make_batch(side, seed=1)
        a, b = policy(input_ids, mask, return_logits=True), loaded(input_ids, mask, return_logits=True)
        assert torch.equal(a.hidden_states, b.hidden_states)
        assert torch.equal(a.rewards, b.rewards)
        assert torch.equal(a.logits, b.logits)


def test_saved_lm_loads_with_plain_transformers(policy, saved_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(saved_dir).eval()
    input_ids, _ = make_batch("right")
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids).logits, policy.lm(input_ids).logits, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(saved_dir)
    assert tok.decode(tok("héllo", add_special_tokens=False)["input_ids"]) == "héllo"


def test_missing_head_gives_a_fresh_seeded_head_or_an_error(policy, tmp_path):
    policy.lm.save_pretrained(tmp_path)  # LM only, no reward head
    loaded = PolicyWithRewardHead.from_pretrained(tmp_path, seed=7)
    assert torch.equal(loaded.reward_head.weight, new_reward_head(64, seed=7).weight)
    assert torch.equal(loaded.lm.lm_head.weight, policy.lm.lm_head.weight)
    with pytest.raises(ModelFormatError, match="no reward head"):
        PolicyWithRewardHead.from_pretrained(tmp_path, require_head=True)
    with pytest.raises(ModelFormatError, match="no reward head"):
        PolicyWithRewardHead.from_pretrained("tiny", require_head=True)


def _copy_dir(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_corrupt_or_inconsistent_files_raise_clear_errors(saved_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PolicyWithRewardHead.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm("./no/such/dir")
    with pytest.raises(ModelFormatError, match="no-such-org/no-such-model"):  # a hub id, offline in tests
        load_causal_lm("no-such-org/no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFormatError, match="empty directory"):
        PolicyWithRewardHead.from_pretrained(empty)
    (empty / "notes.txt").write_text("not a model")
    with pytest.raises(ModelFormatError, match="config.json is missing"):
        PolicyWithRewardHead.from_pretrained(empty)

    bad_head = _copy_dir(saved_dir, tmp_path / "bad_head")
    (bad_head / HEAD_WEIGHTS_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ModelFormatError, match="reward head file .* corrupt"):
        PolicyWithRewardHead.from_pretrained(bad_head)

    truncated = _copy_dir(saved_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="cannot load a causal LM"):
        PolicyWithRewardHead.from_pretrained(truncated)

    wrong_size = _copy_dir(saved_dir, tmp_path / "wrong_size")
    (wrong_size / HEAD_CONFIG_NAME).write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ModelFormatError, match="hidden_size"):
        PolicyWithRewardHead.from_pretrained(wrong_size)

    from safetensors.torch import save_file

    wrong_shape = _copy_dir(saved_dir, tmp_path / "wrong_shape")
    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, str(wrong_shape / HEAD_WEIGHTS_NAME))
    with pytest.raises(ModelFormatError, match=r"shape \(1, 64\)"):
        PolicyWithRewardHead.from_pretrained(wrong_shape)

    bin_only = _copy_dir(saved_dir, tmp_path / "bin_only")
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="only safetensors"):
        PolicyWithRewardHead.from_pretrained(bin_only)


def test_reward_head_json_records_whether_the_head_was_trained(tmp_path):
    import json

    from drdo.models import HEAD_CONFIG_NAME, PolicyWithRewardHead, head_is_trained

    policy = PolicyWithRewardHead.from_pretrained("tiny")
    assert policy.head_trained is False  # a fresh head
    policy.save_pretrained(tmp_path / "fresh")
    assert head_is_trained(tmp_path / "fresh") is False
    assert PolicyWithRewardHead.from_pretrained(str(tmp_path / "fresh")).head_trained is False
    policy.head_trained = True
    policy.save_pretrained(tmp_path / "trained")
    assert head_is_trained(tmp_path / "trained") is True
    assert PolicyWithRewardHead.from_pretrained(str(tmp_path / "trained")).head_trained is True
    # a reward_head.json written before the key existed: the run's config.yaml decides, else unknown
    meta_path = tmp_path / "trained" / HEAD_CONFIG_NAME
    meta = json.loads(meta_path.read_text())
    del meta["trained"]
    meta_path.write_text(json.dumps(meta))
    assert head_is_trained(tmp_path / "trained") is None
    for stage, reward, expected in (("oracle", "head", True), ("sft", "head", False), ("drdo", "head", True),
                                    ("drdo", "implicit", False), ("dpo", "head", False)):
        (tmp_path / "trained" / "config.yaml").write_text(f"stage: {stage}\nreward: {reward}\n")
        assert head_is_trained(tmp_path / "trained") is expected, stage
    assert head_is_trained(tmp_path / "nowhere") is None and head_is_trained("tiny") is None
