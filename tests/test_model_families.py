"""The fused log-probs and losses agree with each model family's OWN logits, transforms included.

For every transformers causal-LM family with a distinct head (Gemma 2 / 3 soft-cap their logits,
Cohere scales them, Granite divides them, GPT-2 / OPT tie them to the input embedding, ...) a
tiny random model is built from its config, its LM head scaled so that the logits reach ±50, and:

* :class:`PolicyWithRewardHead` finds the transform (``logit_transform``) by itself;
* the fused per-token log-probs on every backend match ``log_softmax(model(...).logits)`` of the
  model's own forward run in float64;
* the DRDO loss's gradients (hidden states and LM-head weight) on every backend match autograd
  through the model's own float64 forward (the hidden state fed to its LM head by a hook).
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import drdo_kernels as dk
from drdo.losses import DRDOSpec, drdo_loss
from drdo.models import PolicyWithRewardHead, probe_logit_transform

V, H, ROWS, T = 96, 32, 4, 11
BACKENDS = ["reference", "torch", "chunked", "triton", "auto"]
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, head_dim=8, **_IDS)

#: family -> (config class, causal-LM class, config keywords, the transform its forward applies)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}, (1.0, None)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}, (1.0, None)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}, (1.0, None)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}, (1.0, None)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {}, (1.0, None)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"final_logit_softcapping": 30.0}, (1.0, 30.0)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"final_logit_softcapping": 20.0}, (1.0, 20.0)),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.25}, (0.25, None)),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {"logits_scaling": 8.0}, (0.125, None)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}, (1.0, None)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64, **_IDS), (1.0, None)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM,
            dict(vocab_size=V, hidden_size=H, ffn_dim=2 * H, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, word_embed_proj_dim=H, **_IDS), (1.0, None)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {}, (1.0, None)),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}, (1.0, None)),
}


def build(family: str) -> torch.nn.Module:
    """A tiny float64 model of ``family`` whose raw logits reach about ±50."""
    config_cls, model_cls, extra, _ = FAMILIES[family]
    config = config_cls(**(extra if "vocab_size" in extra else {**_DECODER, **extra}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = model_cls(config).double().eval()
    ids, _ = batch()
    with torch.no_grad():
        hidden = lm.base_model(input_ids=ids, use_cache=False)[0]
        raw = lm.get_output_embeddings()(hidden)
        lm.get_output_embeddings().weight.mul_(50.0 / raw.abs().max())
    return lm


def batch():
    """input_ids [ROWS, T]; labels [ROWS, T] aligned (next token), a 3-token prompt ignored, and
    the last position ignored."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (ROWS, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3:-1] = ids[:, 4:]
    return ids, labels


def own_forward(lm, ids):
    """The model's own float64 forward, with the hidden state its LM head receives as a leaf that
    requires grad: (hidden [R, T, H] float64, logits [R, T, V] float64, built from that leaf)."""
    leaf = {}

    def take_input(_module, args):
        leaf["hidden"] = args[0].detach().requires_grad_(True)
        return (leaf["hidden"],)

    hook = lm.get_output_embeddings().register_forward_pre_hook(take_input)
    try:
        logits = lm(input_ids=ids, use_cache=False).logits
    finally:
        hook.remove()
    return leaf["hidden"], logits


def gathered(logits, labels):
    """[R, T] log_softmax(logits) at labels, 0 where ignored (float64)."""
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp.masked_fill(labels == -100, 0.0)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    lm = build(request.param)
    return request.param, lm, PolicyWithRewardHead(lm)


def test_policy_finds_each_familys_transform(family):
    name, lm, policy = family
    scale, softcap = FAMILIES[name][3]
    assert policy.logit_transform == {"logit_scale": scale, "softcap": softcap}
    assert probe_logit_transform(lm) == policy.logit_transform


def test_policy_logits_are_the_models_own(family):
    _, lm, policy = family
    ids, _ = batch()
    hidden, own = own_forward(lm, ids)
    assert policy.lm_head(hidden).abs().max() > 40  # raw logits reach ±50: the transform works far from 0
    torch.testing.assert_close(policy.logits(hidden.detach()), own.detach(), rtol=1e-12, atol=1e-12)


def _fp32_error(value, exact):
    return float((value.double() - exact).abs().max() / exact.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_logprobs_match_the_models_logits(family, backend):
    _, lm, policy = family
    ids, labels = batch()
    hidden, own = own_forward(lm, ids)
    exact = gathered(own.detach(), labels)
    head = lm.get_output_embeddings()
    bias = None if head.bias is None else head.bias.detach().float()
    fused = dk.fused_linear_logprobs(head.weight.detach().float(), hidden.detach().float(), labels, bias=bias,
                                     backend=backend, chunk_tokens=5, **policy.logit_transform)
    plain = gathered(_float32_logits(lm, hidden.detach().float(), head.weight.detach().float()), labels)
    assert _fp32_error(fused, exact) <= 4 * _fp32_error(plain, exact) + 1e-6


def _float32_logits(lm, hidden, weight):
    """The yardstick: float32 inputs through plain PyTorch, full logits, the family's transform as
    its config declares it (written out here, independently of drdo.models)."""
    head, text = lm.get_output_embeddings(), lm.config
    raw = torch.nn.functional.linear(hidden, weight, None if head.bias is None else head.bias.detach().float())
    raw = raw * getattr(text, "logit_scale", 1.0) / getattr(text, "logits_scaling", 1.0)
    softcap = getattr(text, "final_logit_softcapping", None)
    return raw if softcap is None else softcap * torch.tanh(raw / softcap)


def _drdo(z, n_rows):
    """DRDO with the implicit reward beta * z, on summed log-probs z [2B]."""
    spec = DRDOSpec(alpha=0.5, gamma=2.0, reward="implicit", beta=0.1)
    oracle = torch.linspace(-1.0, 1.0, n_rows, dtype=z.dtype)
    b, rhat = n_rows // 2, spec.beta * z
    return drdo_loss(z[:b], z[b:], rhat[:b], rhat[b:], oracle[:b], oracle[b:], spec=spec)[0], spec, oracle


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_drdo_gradients_match_the_models_own(family, backend):
    _, lm, policy = family
    ids, labels = batch()
    head = lm.get_output_embeddings()
    hidden, own = own_forward(lm, ids)
    head.weight.grad = None
    loss64, spec, oracle = _drdo(gathered(own, labels).sum(-1), ROWS)
    loss64.backward()
    exact = {"hidden": hidden.grad, "weight": head.weight.grad.clone()}
    head.weight.grad = None

    h = hidden.detach().float().requires_grad_(True)
    w = head.weight.detach().float().requires_grad_(True)
    bias = None if head.bias is None else head.bias.detach().float()
    loss, _ = dk.fused_linear_drdo_loss(w, h, labels, oracle.float(), bias=bias, spec=spec, backend=backend,
                                        chunk_tokens=5, **policy.logit_transform)
    loss.backward()
    h32 = hidden.detach().float().requires_grad_(True)
    w32 = head.weight.detach().float().requires_grad_(True)
    plain_loss, _, _ = _drdo(gathered(_float32_logits(lm, h32, w32), labels).float().sum(-1), ROWS)
    plain_loss.backward()
    got, exact_loss, plain = loss.item(), loss64.item(), plain_loss.item()
    assert abs(got - exact_loss) <= 4 * abs(plain - exact_loss) + 1e-6 * max(1.0, abs(exact_loss))
    for name, grad, plain_grad in (("hidden", h.grad, h32.grad), ("weight", w.grad, w32.grad)):
        err, yardstick = _fp32_error(grad, exact[name]), _fp32_error(plain_grad, exact[name])
        assert err <= 4 * yardstick + 1e-6, f"{name}: relative error {err:.2e} (plain float32: {yardstick:.2e})"


# ------------------------------------------------------------------ the transform reaches every caller


@pytest.fixture(scope="module")
def capped_dir(tmp_path_factory):
    """A tiny soft-capped Gemma 2 over the tiny tokenizer's vocabulary, saved as an HF directory;
    a cap of 5 bends most of its logits."""
    from drdo.tokenizer import TINY_VOCAB_SIZE

    config = tf.Gemma2Config(**{**_DECODER, "vocab_size": TINY_VOCAB_SIZE, "final_logit_softcapping": 5.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = tf.Gemma2ForCausalLM(config)
    lm.lm_head.weight.data.mul_(8.0)
    path = tmp_path_factory.mktemp("gemma2")
    lm.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("stage", ["drdo", "dpo"])
def test_training_step_applies_the_models_transform(tmp_path, capped_dir, stage):
    """The training loop's fused step (backend="auto") equals its full-logits step, whose logits
    are the model's own (soft-capped): the loop passes the transform without being asked."""
    from test_step_gradients import TOL, _step_gradients, long_rows, relative_errors
    from test_train import cfg, write_rows

    data = write_rows(tmp_path / "pairs.jsonl", long_rows(6))
    common = dict(stage=stage, model=capped_dir, tokenizer="tiny", batch_size=6, micro_batch_size=6,
                  max_length=96, max_prompt_length=24)
    fused = _step_gradients(cfg(data, tmp_path / "a", backend="auto", **common))
    reference = _step_gradients(cfg(data, tmp_path / "b", backend="reference", **common))
    errors = relative_errors(fused, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{stage}: {worst} relative error {errors[worst]:.2e}"


def test_drdo_trainer_applies_the_models_transform(tmp_path, capped_dir):
    """DRDOTrainer's fused loss on a soft-capped Gemma 2 equals drdo_loss on the model's own logits."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from test_step_gradients import long_rows
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from drdo.integrations.trl import REWARD_HEAD_ATTR, DRDOConfig, DRDOTrainer
    from drdo.tokenizer import get_tokenizer

    args = DRDOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=1,
                      report_to="none", use_cpu=True, seed=0, max_length=96, alpha=0.5, bf16=False)
    lm = tf.Gemma2ForCausalLM.from_pretrained(capped_dir, dtype=torch.float32).eval()
    trainer = DRDOTrainer(model=lm, args=args, train_dataset=Dataset.from_list(long_rows(6)),
                          processing_class=get_tokenizer("tiny"))
    model = trainer._base_model()
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    loss = model(drdo_batch=trainer.data_collator(rows))["loss"]

    batch = DataCollatorForPreference(pad_token_id=trainer._tokenizer.pad_token_id)(rows)
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        own_logits = model(input_ids=ids, attention_mask=mask).logits  # the model's own, soft-capped
        logps = gathered(own_logits[:, :-1], ids.masked_fill(comp == 0, -100)[:, 1:]).sum(-1)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rewards = getattr(model, REWARD_HEAD_ATTR)(hidden[torch.arange(ids.shape[0]), mask.sum(1) - 1]).squeeze(-1)
    oracle = torch.tensor([r["oracle_chosen"] for r in rows] + [r["oracle_rejected"] for r in rows]).double()
    n = len(rows)
    expected = drdo_loss(logps[:n], logps[n:], rewards[:n].double(), rewards[n:].double(), oracle[:n], oracle[n:],
                         alpha=0.5)[0]
    assert abs(loss.item() - expected.item()) <= 1e-4 * max(1.0, abs(expected.item()))
