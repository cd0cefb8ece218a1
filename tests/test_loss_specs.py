"""One home per knob: the loss specs of drdo.losses hold every default and every check.

Every entry point (the library, the command line, a YAML file, the demo and its variants, the
TRL config) refuses the same bad value with the same message, and reaches the kernel with the
same spec; no module re-declares a loss default.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch

import drdo_kernels
from drdo.cli import main, parse_args, train_config_from_args
from drdo.config import TrainConfig, resolve
from drdo.losses import DPOSpec, DRDOSpec, EDPOSpec, OracleSpec, SFTSpec, drdo_loss
from drdo_kernels import FusedLinearDRDOLoss

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECS = (DRDOSpec, DPOSpec, EDPOSpec, OracleSpec, SFTSpec)
#: Bad values, the spec (or library call) that refuses them, and the CLI flags that set them.
BAD = [
    ("alpha", -1.0, lambda: DRDOSpec(alpha=-1.0), ["--alpha", "-1"]),
    ("gamma", -1.0, lambda: DRDOSpec(gamma=-1.0), ["--gamma", "-1"]),
    ("beta", 0.0, lambda: DRDOSpec(beta=0.0), ["--reward", "implicit", "--beta", "0"]),
    ("backend", "cuda", lambda: drdo_kernels.logprobs.check_backend("cuda"), ["--backend", "cuda"]),
]


def _message(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("name, value, refuse, flags", BAD, ids=[b[0] for b in BAD])
def test_every_entry_point_refuses_a_bad_value_with_the_same_message(tmp_path, capsys, name, value, refuse, flags):
    message = _message(refuse)
    # the library: the reference loss, the fused loss and its module
    pairs = [torch.zeros(2) for _ in range(6)]
    library = [lambda: FusedLinearDRDOLoss(**{name: value})]
    if name != "backend":
        library.append(lambda: drdo_loss(*pairs, **{name: value}))
    for call in library:
        assert _message(call) == message
    # the command line, a YAML file, the demo
    data = tmp_path / "d.jsonl"
    common = ["--data", str(data), "--output-dir", str(tmp_path / "out")]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("".join(f"{flag.lstrip('-')}: {arg}\n" for flag, arg in zip(flags[::2], flags[1::2])))
    for argv in (["train", *flags, *common], ["train", "--config", str(yaml_file), *common],
                 ["demo", *([f for f in flags if f not in ("--reward", "implicit")] if name != "beta" else
                            ["--beta", "0"]), "--output-dir", str(tmp_path / "demo")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("drdo: error: ") and err[-1].endswith(message), (argv, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()
    # the demo's variants
    if name != "backend":
        from drdo.config import ConfigError
        from drdo.demo.variants import validate_variants

        entry = {"name": "v", name: value, **({"reward": "implicit"} if name == "beta" else {})}
        with pytest.raises(ConfigError) as info:
            validate_variants([entry])
        assert str(info.value).endswith(message)
    # the TRL config
    pytest.importorskip("trl")
    from drdo.integrations.trl import DRDOConfig

    with pytest.raises(ValueError) as info:
        DRDOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True,
                   **({name: value} if name != "beta" else {"reward": "implicit", "beta": value}))
    assert str(info.value) == message


def test_every_entry_point_reaches_the_kernel_with_the_same_spec(tmp_path, monkeypatch):
    """alpha 0.5, gamma 1, unlikelihood "paper" given through each entry point build one DRDOSpec,
    and the training objective hands exactly that spec to the fused kernel."""
    want = DRDOSpec(alpha=0.5, gamma=1.0, unlikelihood="paper")
    flags = ["--alpha", "0.5", "--gamma", "1", "--unlikelihood", "paper"]
    common = ["--data", "d.jsonl", "--output-dir", str(tmp_path / "o")]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("alpha: 0.5\ngamma: 1\nunlikelihood: paper\n")
    specs = {
        "library": FusedLinearDRDOLoss(0.5, 1.0, unlikelihood="paper").spec,
        "cli": train_config_from_args(parse_args(["train", *flags, *common])).loss_spec(),
        "yaml": train_config_from_args(parse_args(["train", "--config", str(yaml_file), *common])).loss_spec(),
    }
    from drdo.demo.run import _stage_config, settings_from_args

    demo = settings_from_args(parse_args(["demo", "--alpha", "0.5", "--gamma", "1", "--quick"]))
    specs["demo"] = dataclasses.replace(
        _stage_config(demo, "drdo", "d.jsonl", "o", model="tiny", steps=1, lr=1e-3, seed=0,
                      drdo={"unlikelihood": "paper"})).loss_spec()
    pytest.importorskip("trl")
    from drdo.integrations.trl import DRDOConfig

    specs["trl"] = DRDOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, alpha=0.5,
                              gamma=1.0, unlikelihood="paper").drdo_spec
    assert all(spec == want for spec in specs.values()), specs
    seen = []
    fused = drdo_kernels.fused_objective_loss
    monkeypatch.setattr(drdo_kernels, "fused_objective_loss",
                        lambda spec, *a, **k: seen.append(spec) or fused(spec, *a, **k))
    from drdo.models import PolicyWithRewardHead
    from drdo.training.objectives import StageObjective

    config = resolve(TrainConfig(stage="drdo", data="d", output_dir="o", alpha=0.5, gamma=1.0, unlikelihood="paper"))
    root = StageObjective(PolicyWithRewardHead.from_pretrained("tiny"), config)
    ids = torch.randint(0, 200, (2, 6))
    labels = ids.clone()
    labels[:, :2] = -100
    root(ids, torch.ones_like(ids), labels, oracle_rewards=torch.tensor([1.0, 0.0]))
    assert seen == [want]


def _declared_defaults(path: pathlib.Path, names: set[str]) -> list[str]:
    """'file:line name' of each literal default given to one of ``names``: a function parameter, a
    class-level field (``x = 0.1``, ``x: float = option(0.1, ...)``, ``field(default=0.1)``), or a
    numeric dict entry ``"x": 0.1``."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    spec_classes = {c.__name__ for c in SPECS} if path.name == "losses.py" else set()

    def literal(node) -> bool:
        return isinstance(node, ast.Constant) and node.value is not None

    def default_of(value):
        if literal(value):
            return value
        if isinstance(value, ast.Call):
            if getattr(value.func, "id", None) == "option" and value.args and literal(value.args[0]):
                return value.args[0]
            return next((k.value for k in value.keywords if k.arg == "default" and literal(k.value)), None)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name not in spec_classes:
            for item in node.body:
                target = item.target if isinstance(item, ast.AnnAssign) else (
                    item.targets[0] if isinstance(item, ast.Assign) and len(item.targets) == 1 else None)
                if isinstance(target, ast.Name) and target.id in names and getattr(item, "value", None) is not None \
                        and default_of(item.value) is not None:
                    found.append(f"{path.relative_to(ROOT)}:{item.lineno} {target.id}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.arg}" for a, d in pairs
                      if a.arg in names and literal(d)]
        elif isinstance(node, ast.Dict):  # numbers and flags (string values there are type signatures and such)
            found += [f"{path.relative_to(ROOT)}:{k.lineno} {k.value}" for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value in names and literal(v)
                      and not isinstance(v.value, str)]
    return found


def test_every_loss_default_is_declared_once():
    """The loss specs are the only place a loss hyperparameter's default is written down."""
    names = {f.name for spec in SPECS for f in dataclasses.fields(spec)} | {"oracle_alpha"}
    modules = [p for package in ("drdo", "drdo_kernels") for p in (ROOT / package).rglob("*.py")]
    found = [hit for path in modules for hit in _declared_defaults(path, names)]
    assert not found, f"loss defaults declared outside drdo.losses' specs: {found}"


def test_specs_are_frozen_and_checked_once():
    spec = DRDOSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.alpha = 1.0
    assert DRDOSpec.build(spec, alpha=1).alpha == 1.0 and DRDOSpec.build(spec) is spec
    with pytest.raises(TypeError, match="DRDOSpec has no option 'alpah'"):
        DRDOSpec.build(alpah=1)
    with pytest.raises(TypeError, match="expected a DRDOSpec"):
        DRDOSpec.build(DPOSpec())
    with pytest.raises(ValueError, match="alpha must be a number, got 'x'"):
        DRDOSpec(alpha="x")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        OracleSpec(alpha=2.0)


def test_backend_has_one_name_and_the_old_one_warns(tmp_path, capsys):
    """--backend everywhere; --kernel (and a YAML `kernel:` key) still work for a release, with a warning."""
    from drdo.policy_logprobs import BACKENDS

    assert BACKENDS is drdo_kernels.logprobs.BACKENDS and "reference" in BACKENDS
    common = ["--data", "d.jsonl", "--output-dir", "o"]
    assert train_config_from_args(parse_args(["train", "--backend", "torch", *common])).backend == "torch"
    assert capsys.readouterr().err == ""
    assert train_config_from_args(parse_args(["train", "--kernel", "torch", *common])).backend == "torch"
    assert "--kernel is a deprecated alias of --backend" in capsys.readouterr().err
    old = tmp_path / "old.yaml"
    old.write_text("kernel: reference\n")
    assert train_config_from_args(parse_args(["train", "--config", str(old), *common])).backend == "reference"
    assert f"the key 'kernel' in {old} is a deprecated alias of --backend" in capsys.readouterr().err
    pytest.importorskip("trl")
    from drdo.integrations.trl import DRDOConfig

    with pytest.warns(FutureWarning, match="kernel_backend"):
        config = DRDOConfig(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, kernel_backend="torch")
    assert config.backend == "torch"


def test_beta_with_a_reward_head_is_refused_where_it_is_given(tmp_path, capsys):
    """beta scales the implicit reward only: another value than the default with reward="head" is
    refused at every entry point (library, CLI, TRL); the default (the spec's, TRL's DPOConfig's, the
    one the CLI config records) passes."""
    message = 'beta=0.2 scales the implicit reward only; with reward="head" it would be ignored'
    pairs = [torch.zeros(2) for _ in range(6)]
    weight, hidden = torch.randn(5, 3), torch.randn(2, 3, 3)
    labels, oracle = torch.tensor([[0, 1, 2], [3, 4, 0]]), torch.zeros(2)
    for call in (lambda: DRDOSpec.build(beta=0.2), lambda: drdo_loss(*pairs, beta=0.2),
                 lambda: FusedLinearDRDOLoss(beta=0.2),
                 lambda: drdo_kernels.fused_linear_drdo_loss(weight, hidden, labels, oracle, oracle, beta=0.2),
                 lambda: DRDOSpec.build(DRDOSpec(reward="head"), beta=0.2)):
        with pytest.raises(ValueError, match=message):
            call()
    assert DRDOSpec.build(reward="implicit", beta=0.2).beta == 0.2
    assert DRDOSpec.build(DRDOSpec(reward="implicit"), beta=0.2).beta == 0.2
    assert main(["train", "--beta", "0.2", "--data", "d.jsonl", "--output-dir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    pytest.importorskip("trl")
    from drdo.integrations.trl import DRDOConfig

    assert DRDOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True).drdo_spec.reward == "head"
    with pytest.raises(ValueError, match=message):
        DRDOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, beta=0.2)
    assert DRDOSpec(beta=DRDOSpec.beta).beta == 0.1  # the default, given: harmless, accepted


def test_fused_drdo_refuses_reward_grad_head_it_cannot_apply():
    """The fused loss sees the rewards, not the graph that made them: reward_grad="head" is refused
    there; the training objective (fused_objective_loss) applies it to the rewards it passes."""
    g = torch.Generator().manual_seed(0)
    weight, hidden = torch.randn(5, 3, generator=g), torch.randn(2, 3, 3, generator=g)
    labels, oracle, rewards = torch.tensor([[0, 1, 2], [3, 4, 0]]), torch.zeros(2), torch.randn(2, generator=g)
    spec = DRDOSpec(reward_grad="head")
    for call in (lambda: FusedLinearDRDOLoss(reward_grad="head"), lambda: FusedLinearDRDOLoss(spec=spec),
                 lambda: drdo_kernels.fused_linear_drdo_loss(weight, hidden, labels, oracle, rewards,
                                                             reward_grad="head"),
                 lambda: drdo_kernels.fused_linear_drdo_loss(weight, hidden, labels, oracle, rewards, spec=spec)):
        with pytest.raises(ValueError, match=r'reward_grad="head" is not applied by the loss'):
            call()
    loss, _ = drdo_kernels.fused_objective_loss(spec, weight, hidden, labels, rewards=rewards, oracle=oracle)
    want, _ = drdo_kernels.fused_objective_loss(DRDOSpec(), weight, hidden, labels, rewards=rewards, oracle=oracle)
    torch.testing.assert_close(loss, want)
