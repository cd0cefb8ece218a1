"""DRDO's readings of Eq. 6 in the training objective, checked against drdo.losses.drdo_loss:
reward_grad ("backbone" | "head"), length_normalize, the implicit reward's default beta, and
the diagnostics of drdo.training.diagnostics."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from drdo.config import ConfigError, TrainConfig, resolve
from drdo.data import PreferenceCollator, load_preference_dataset
from drdo.losses import DRDOSpec, drdo_loss, sequence_logprobs
from drdo.models import PolicyWithRewardHead
from drdo.tokenizer import get_tokenizer
from drdo.training import diagnostics
from drdo.training.objectives import StageObjective

KERNELS = ["reference", "torch"]
ROWS = [  # responses of different lengths, so token means differ from sums
    {"prompt": "dkm:", "chosen": "dkmdkm", "rejected": "qxz", "oracle_chosen": 0.9, "oracle_rejected": 0.1},
    {"prompt": "ab:", "chosen": "ab", "rejected": "zzzzzzzzz", "oracle_chosen": 0.4, "oracle_rejected": -0.7},
    {"prompt": "qrs:", "chosen": "qrsqr", "rejected": "q", "oracle_chosen": 0.2, "oracle_rejected": 0.3},
]


@pytest.fixture(scope="module")
def batch():
    tokenizer = get_tokenizer("tiny")
    return PreferenceCollator(tokenizer.pad_token_id)(list(load_preference_dataset(ROWS, tokenizer)))


def _objective(kernel, **kw):
    config = TrainConfig(stage="drdo", data="unused", output_dir="unused", backend=kernel, **kw)
    config = resolve(config)
    torch.manual_seed(0)
    policy = PolicyWithRewardHead.from_pretrained("tiny", seed=0)
    return StageObjective(policy, config)


def _run(objective, batch):
    keys = ("input_ids", "attention_mask", "labels", "oracle_rewards")
    loss, metrics = objective(**{k: batch[k] for k in keys})
    return loss, metrics


def _reference(objective, batch, *, length_normalize=False, implicit_beta=None, alpha, gamma=2.0):
    """Eq. 6 by hand: full logits -> sequence_logprobs (float64) -> drdo_loss(reduction="sum")."""
    with torch.no_grad():
        out = objective.policy(batch["input_ids"], batch["attention_mask"], return_logits=True)
    z, n = sequence_logprobs(out.logits.double(), batch["labels"])
    if length_normalize:
        z = z / n.double()
    rhat = out.rewards.double() if implicit_beta is None else implicit_beta * z
    o = batch["oracle_rewards"].double()
    b = z.shape[0] // 2
    loss, _ = drdo_loss(z[:b], z[b:], rhat[:b], rhat[b:], o[:b], o[b:], alpha=alpha, gamma=gamma, reduction="sum")
    return loss


def _backbone_grads(objective):
    return {name: p.grad for name, p in objective.policy.named_parameters() if not name.startswith("reward_head.")}


@pytest.mark.parametrize("kernel", KERNELS)
def test_reward_grad_head_keeps_distillation_off_the_backbone(kernel, batch):
    """alpha = 0 leaves only the distillation term: with reward_grad="head" not one backbone or
    LM-head gradient entry is non-zero; with "backbone" (the paper) they are; the loss is the
    reference either way."""
    grads = {}
    for mode in ("head", "backbone"):
        objective = _objective(kernel, alpha=0.0, reward_grad=mode)
        loss, _ = _run(objective, batch)
        expected = _reference(objective, batch, alpha=0.0)
        assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5), (mode, loss.item(), expected.item())
        loss.backward()
        assert objective.policy.reward_head.weight.grad.abs().sum() > 0
        grads[mode] = _backbone_grads(objective)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads["head"].values())
    assert sum(int(torch.count_nonzero(g)) for g in grads["backbone"].values() if g is not None) > 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_reward_grad_head_leaves_the_preference_gradient_unchanged(kernel, batch):
    """With alpha > 0 the LM parameters get exactly the preference gradient under "head":
    the same as "backbone" minus the distillation gradient (diagnostics.gradient_split)."""
    objective = _objective(kernel, alpha=0.5, reward_grad="head")
    loss, _ = _run(objective, batch)
    loss.backward()
    head = {k: v.clone() for k, v in _backbone_grads(objective).items() if v is not None}
    ref = _objective(kernel, alpha=0.5, reward_grad="backbone", diagnostics_every=0)
    out = ref.policy(batch["input_ids"], batch["attention_mask"], return_logits=True)
    z, _ = sequence_logprobs(out.logits, batch["labels"])
    o = batch["oracle_rewards"]
    pref, _ = drdo_loss(z[:3], z[3:], out.rewards[:3].detach(), out.rewards[3:].detach(), o[:3], o[3:],
                        alpha=0.5, reduction="sum")
    pref.backward()
    for name, p in ref.policy.named_parameters():
        if name in head:
            torch.testing.assert_close(head[name], p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("reward", ["head", "implicit"])
def test_length_normalize_is_the_reference_on_token_mean_logprobs(kernel, reward, batch):
    objective = _objective(kernel, alpha=0.5, reward=reward, length_normalize=True)
    loss, _ = _run(objective, batch)
    expected = _reference(objective, batch, alpha=0.5, length_normalize=True,
                          implicit_beta=0.1 if reward == "implicit" else None)
    summed = _reference(objective, batch, alpha=0.5, implicit_beta=0.1 if reward == "implicit" else None)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    assert not math.isclose(loss.item(), summed.item(), rel_tol=1e-3)  # the option changes the loss


@pytest.mark.parametrize("kernel", KERNELS)
def test_implicit_reward_beta_defaults_to_0_1(kernel, batch):
    objective = _objective(kernel, reward="implicit")
    assert objective.spec.beta == 0.1
    loss, _ = _run(objective, batch)
    assert math.isclose(loss.item(), _reference(objective, batch, alpha=0.1, implicit_beta=0.1).item(), rel_tol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(reward="implicit", reward_grad="head"), 'needs reward="head"'),
    (dict(reward_grad="shared"), "reward_grad"),
    (dict(diagnostics_every=-1), "diagnostics_every"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ConfigError, match=match):
        resolve(TrainConfig(stage="drdo", data="x", output_dir="y", **kw))


def test_drdo_options_are_drdo_only():
    with pytest.raises(ConfigError, match="--length-normalize"):
        resolve(TrainConfig(stage="dpo", data="x", output_dir="y", length_normalize=True))


# ---------------------------------------------------------------------------------------------- diagnostics


def test_pair_diagnostics_on_hand_made_pairs():
    z_w = torch.tensor([-2.0, -30.0, -5.0, -1.0])
    z_l = torch.tensor([-10.0, -3.0, -5.0, -0.5])
    n_w, n_l = torch.tensor([2, 30, 5, 1]), torch.tensor([10, 3, 5, 1])
    d = diagnostics.pair_diagnostics(z_w, z_l, n_w, n_l, gamma=2.0)
    weights = sorted((1 - 1 / (1 + math.exp(-(a - b)))) ** 2 for a, b in zip(z_w.tolist(), z_l.tolist()))
    assert math.isclose(d["diag_focal_median"].item(), weights[1], rel_tol=1e-9)  # torch: the lower median
    assert d["diag_focal_active"].item() == sum(w > 0.01 for w in weights) / 4
    m = [a - b for a, b in zip(z_w.tolist(), z_l.tolist())]
    dn = [a - b for a, b in zip(n_w.tolist(), n_l.tolist())]
    mm, mn = sum(m) / 4, sum(dn) / 4
    corr = sum((a - mm) * (b - mn) for a, b in zip(m, dn)) / math.sqrt(
        sum((a - mm) ** 2 for a in m) * sum((b - mn) ** 2 for b in dn))
    assert math.isclose(d["diag_margin_len_corr"].item(), corr, rel_tol=1e-9)
    l1m = sum(math.log(-math.expm1(z)) for z in z_l.tolist()) / 4
    assert math.isclose(d["diag_log1mexp_zl"].item(), l1m, rel_tol=1e-6)


def test_gradient_split_is_the_two_terms_written_out():
    """Norms of the gradients of the two terms of Eq. 6 on a hand-made backbone, float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w_b = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)   # "backbone"
    w_z = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)      # "LM head"
    w_r = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)      # reward head
    o = torch.randn(6, generator=g, dtype=torch.float64)
    alpha, gamma = 0.3, 2.0

    def forward():
        h = torch.tanh(x @ w_b)
        return -F.softplus(h @ w_z) - 1.0, h @ w_r  # z < 0, rhat

    z, rhat = forward()
    d = diagnostics.gradient_split(z[:3], z[3:], rhat[:3], rhat[3:], o[:3], o[3:], [w_b, w_z],
                                   spec=DRDOSpec(alpha=alpha, gamma=gamma))
    z, rhat = forward()
    distill = ((o[:3] - o[3:]) - (rhat[:3] - rhat[3:])).square().mean()
    p_w = torch.sigmoid(z[:3] - z[3:])
    pref = (-alpha * (1 - p_w) ** gamma * (z[:3] + torch.log(1 - torch.exp(z[3:])))).mean()
    gd = torch.cat([t.reshape(-1) for t in torch.autograd.grad(distill, [w_b, w_z], retain_graph=True,
                                                               materialize_grads=True)])
    gp = torch.cat([t.reshape(-1) for t in torch.autograd.grad(pref, [w_b, w_z])])
    assert math.isclose(d["diag_gnorm_distill"].item(), gd.norm().item(), rel_tol=1e-10)
    assert math.isclose(d["diag_gnorm_pref"].item(), gp.norm().item(), rel_tol=1e-10)
    assert math.isclose(d["diag_grad_cos"].item(), (gd @ gp / gd.norm() / gp.norm()).item(), rel_tol=1e-9)
    share = gd.norm() / (gd.norm() + gp.norm())
    assert math.isclose(d["diag_distill_share"].item(), share.item(), rel_tol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_objective_logs_diagnostics_on_diagnostic_steps(kernel, batch):
    objective = _objective(kernel, diagnostics_every=3)
    for step, expect in ((0, True), (1, False), (3, True), (None, False)):
        objective.diagnostic_step = step
        loss, metrics = _run(objective, batch)
        assert ("diag_gnorm_pref" in metrics) == expect, step
        loss.backward()  # the diagnostics left the graph usable
    head = _objective(kernel, diagnostics_every=1, reward_grad="head")
    head.diagnostic_step = 0
    _, metrics = _run(head, batch)
    assert metrics["diag_gnorm_distill"].item() == 0.0 and metrics["diag_distill_share"].item() == 0.0
    assert metrics["diag_gnorm_pref"].item() > 0


def test_training_writes_diagnostics_to_metrics_jsonl(tmp_path):
    from drdo.training.loop import train

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    config = TrainConfig(stage="drdo", model="tiny", data=str(data), output_dir=str(tmp_path / "out"), max_steps=3,
                         batch_size=2, micro_batch_size=1, lr=1e-3, max_length=32, max_prompt_length=8,
                         diagnostics_every=2, progress=False, plot=False)
    train(config)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [("diag_focal_median" in r) for r in rows] == [True, False, True]
    for key in ("diag_focal_median", "diag_focal_active", "diag_margin_len_corr", "diag_log1mexp_zl",
                "diag_gnorm_distill", "diag_gnorm_pref", "diag_distill_share", "diag_grad_cos"):
        assert math.isfinite(rows[0][key]), key
    assert 0.0 <= rows[0]["diag_distill_share"] <= 1.0 and rows[0]["diag_log1mexp_zl"] <= 0.0
