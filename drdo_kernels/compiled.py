"""``torch.compile`` support: under compilation every fused function is ONE opaque custom operator.

The fused functions plan their work from the data (which tokens are scored, how chunks of whole
pairs fall), which needs the labels on the host. A compiled graph cannot hold that, so while
``torch.compile`` traces, each public function decorated with :func:`compilable` emits a call to
the custom operator ``drdo::fused`` instead of its body; the operator runs the eager function
(planning included) when the graph runs. No host synchronisation is left in the traced region,
and ``fullgraph=True`` holds.

* The options (the loss spec and its fields, the backend, the reduction, the logit transform,
  ...) are Python constants of the call: they are encoded once, at trace time, into a string
  argument of the operator (:func:`_call_key`, ``torch.compiler.assume_constant_result``), with
  the names of the loss's metrics, so the traced code rebuilds ``(loss, metrics)`` exactly as the
  eager function returns it.
* Autograd: a loss reduced to a scalar ("mean", "sum") computes its input gradients inside the
  operator's forward, as the eager chunked path does (6·N·H·V FLOPs, no recompute), and the
  backward scales them. Outputs with more than one element (per-token log-probs, per-pair losses)
  take ``drdo::fused_vjp`` in the backward, which reruns the eager function under autograd with
  the upstream gradient (the forward's FLOPs again).
* Fake (meta) implementations give every output's shape and dtype from the inputs' alone.
* A vocabulary-parallel head (DTensors, :mod:`.vocab_parallel`) is one operator too: it takes
  each rank's shard (``to_local()``, differentiable) with the process group's name and the
  rank's rows as constants, and rebuilds the DTensors inside, where the eager path runs its
  collectives. Any other call on DTensors (an FSDP2-sharded head used outside its module's
  forward) runs eagerly as a graph break whose reason names it (:data:`DTENSOR_HEAD_REASON`).

Eager calls (``torch.compiler.is_compiling()`` False) run the function itself, untouched.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json

import torch

__all__ = ["compilable", "COMPILED_FUNCTIONS"]

#: name -> (eager function, positional parameter names, tensor parameter names, kind, spec type, its fields)
COMPILED_FUNCTIONS: dict[str, tuple] = {}


def compilable(kind: str, spec_type=None, keyword_tensors: tuple[str, ...] = ()):
    """Decorator: ``fn`` becomes one ``drdo::fused`` call while ``torch.compile`` traces.

    fn's positional parameters are its tensors (or None), ``keyword_tensors`` names keyword-only
    ones; kind: "logprobs" (returns a tensor shaped as the labels) or "loss" (returns (loss,
    metrics)); spec_type: the loss spec a "loss" function builds from ``spec`` and its fields.
    """
    def wrap(fn):
        name = fn.__name__
        params = inspect.signature(fn).parameters.values()
        positional = tuple(p.name for p in params if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD)
        fields = tuple(spec_type.__dataclass_fields__) if spec_type is not None else ()
        COMPILED_FUNCTIONS[name] = (fn, positional, positional + tuple(keyword_tensors), kind, spec_type, fields)

        EAGER_BETWEEN_GRAPHS[name] = _run_eagerly(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            return _traced_call(name, args, kwargs)

        return wrapper

    return wrap


#: Why a call on DTensors that is not vocabulary-parallel is left out of the graph (Dynamo prints it
#: at the graph break).
DTENSOR_HEAD_REASON = ("drdo: a fused call on DTensors that is not vocabulary-parallel (an FSDP2-sharded head "
                       "used outside its module's forward) runs eagerly between compiled graphs")

#: name -> the eager function excluded from compilation (:func:`_run_eagerly`)
EAGER_BETWEEN_GRAPHS: dict = {}


def _vocab_parallel_locals(named: dict) -> tuple[dict, dict | None] | None:
    """The tensors the operator takes, by name, and the vocabulary-parallel head it rebuilds.

    A vocabulary-parallel call (``vocab_parallel.local_head``) passes each rank's plain tensors,
    taken with a differentiable ``to_local()``, and {"group", "n_vocab", "device", "rows"}; a call without
    DTensors passes its tensors and None; any other call on DTensors returns None (it runs eagerly).
    """
    from .inputs import is_dtensor
    from .vocab_parallel import local_head

    local = local_head(named.get("lm_head_weight"), named.get("hidden"), named.get("bias"))
    head = None
    if local is not None:
        weight, hidden, bias, shard = local
        named = dict(named, lm_head_weight=weight, hidden=hidden, bias=bias)
        # the rank's rows are part of the call: each rank's graph differs, as its shapes may
        # (uneven shards), so no compile cache hands one rank's graph to another
        head = {"group": shard.group.group_name, "n_vocab": shard.n_vocab, "device": weight.device.type,
                "rows": [shard.start, shard.size]}
    if any(is_dtensor(t) for t in named.values()):
        return None
    return named, head


def _run_eagerly(fn):
    """``fn`` excluded from compilation, with :data:`DTENSOR_HEAD_REASON` where torch takes a reason."""
    try:
        return torch.compiler.disable(fn, reason=DTENSOR_HEAD_REASON)
    except TypeError:  # torch < 2.8
        return torch.compiler.disable(fn)


def _traced_call(name: str, args, kwargs):
    """What a compiled graph runs in place of ``name``'s body (no data-dependent Python here)."""
    _, positional, tensor_names, kind, _, _ = COMPILED_FUNCTIONS[name]
    given = dict(zip(positional, args))
    given.update(kwargs)
    plain = _vocab_parallel_locals({n: given.pop(n, None) for n in tensor_names})
    if plain is None:
        return EAGER_BETWEEN_GRAPHS[name](*args, **kwargs)
    named, head = plain
    if head is not None:
        given["vocab_parallel_head"] = head
    inputs = [named[n] for n in tensor_names]
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in inputs]
    missing = [t is None for t in inputs]
    spec = given.pop("spec", None)
    if spec is not None:  # its fields: a frozen dataclass cannot cross into _call_key, its values can
        given["spec_fields"] = {field: getattr(spec, field) for field in COMPILED_FUNCTIONS[name][5]}
    call, metric_names = _call_key(name, given)
    placeholder = next(t for t in inputs if t is not None).new_empty(0)
    outputs = torch.ops.drdo.fused([placeholder if t is None else t for t in inputs], missing, needs, call)
    if kind == "logprobs":  # (logp, entropy) with return_entropy=True
        return outputs[0] if len(outputs) == 1 else (outputs[0], outputs[1])
    loss, values = outputs[0], outputs[1]
    metrics = dict(zip(metric_names, values.unbind(0)))
    metrics["loss"] = loss.detach()
    return loss, metrics


# ----------------------------------------------------------------------------- the call's constants


def _encode(value):
    """A JSON-able form of an option (loss specs as their type and fields)."""
    if hasattr(value, "to_dict") and hasattr(value, "build"):
        return {"__spec__": type(value).__name__, **value.to_dict()}
    return value


def _decode(value):
    if isinstance(value, dict) and "__spec__" in value:
        from drdo import losses

        fields = {k: v for k, v in value.items() if k != "__spec__"}
        return getattr(losses, value["__spec__"])(**fields)
    return value


def _defaults(fn) -> dict:
    parameters = inspect.signature(fn).parameters.items()
    return {k: p.default for k, p in parameters if p.default is not inspect.Parameter.empty}


@torch.compiler.assume_constant_result
def _call_key(name: str, options: dict) -> tuple[str, tuple[str, ...]]:
    """(the operator's call string, the loss's metric names) for ``name`` called with ``options``
    (every argument that is not a tensor); evaluated once at trace time."""
    fn, _, tensor_names, kind, spec_type, _ = COMPILED_FUNCTIONS[name]
    options = {**{k: v for k, v in _defaults(fn).items() if k not in tensor_names}, **options}
    if "spec_fields" in options:
        options["spec"] = spec_type(**options.pop("spec_fields"))
    names: tuple[str, ...] = ()
    if kind == "loss":
        fields = {k: v for k, v in options.items() if k in spec_type.__dataclass_fields__}
        spec = spec_type.build(options.get("spec"), **fields)
        names = _metric_names(spec, options.get("reduction", "mean"))
    call = json.dumps({"fn": name, "tensors": list(tensor_names), "kind": kind, "metrics": list(names),
                       "options": {k: _encode(v) for k, v in options.items()}}, sort_keys=True)
    return call, names


def _metric_names(spec, reduction: str) -> tuple[str, ...]:
    """The metric names of ``spec``'s loss: its reference on one dummy pair (every score given)."""
    from drdo.losses import objective_loss

    with torch.no_grad():
        _, metrics = objective_loss(spec, torch.tensor([-1.0, -2.0]), torch.tensor([1, 1]),
                                    rewards=torch.tensor([0.5, -0.5]), oracle=torch.tensor([[1.0, 0.0]]),
                                    ref_logps=torch.tensor([-1.5, -1.5]), reduction=reduction)
    return tuple(k for k in metrics if k != "loss")


def _unpack(call: str, inputs):
    """(eager function, its keyword arguments with ``inputs`` in place, the call's description)."""
    desc = json.loads(call)
    fn = COMPILED_FUNCTIONS[desc["fn"]][0]
    kwargs = {k: _decode(v) for k, v in desc["options"].items()}
    desc["head"] = kwargs.pop("vocab_parallel_head", None)
    kwargs.update(zip(desc["tensors"], inputs))
    return fn, kwargs, desc


def _run(fn, kwargs: dict, desc):
    """``fn(**kwargs)``; a vocabulary-parallel call gets its head back as DTensors, built from the
    rank's tensors with a differentiable ``from_local`` (so gradients reach the plain inputs)."""
    head = desc["head"]
    if head is None:
        return fn(**kwargs)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = _mesh_of_group(head["group"], head["device"])
    n_vocab, weight, bias = head["n_vocab"], kwargs["lm_head_weight"], kwargs.get("bias")
    if weight.shape[0] != head["rows"][1]:
        raise RuntimeError(f"drdo::fused: this rank's LM-head shard has {weight.shape[0]} rows where the traced "
                           f"call holds rows {head['rows']} of {n_vocab}")
    n_hidden = weight.shape[1]
    kwargs = dict(kwargs, hidden=DTensor.from_local(kwargs["hidden"], mesh, [Replicate()], run_check=False),
                  lm_head_weight=DTensor.from_local(weight, mesh, [Shard(0)], run_check=False,
                                                    shape=torch.Size([n_vocab, n_hidden]), stride=(n_hidden, 1)))
    if bias is not None:
        kwargs["bias"] = DTensor.from_local(bias, mesh, [Shard(0)], run_check=False, shape=torch.Size([n_vocab]),
                                            stride=(1,))
    return fn(**kwargs)


def _mesh_of_group(group_name: str, device_type: str):
    """The 1-D device mesh of the process group named ``group_name`` (the head's sharded dimension),
    built at each call: a cached mesh would keep the group alive past ``destroy_process_group()``.
    ``_resolve_process_group`` is c10d's own lookup by name (private, there since torch 2.2)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.distributed_c10d import _resolve_process_group

    return DeviceMesh.from_group(_resolve_process_group(group_name), device_type)


def _scalar_loss(desc) -> bool:
    return desc["kind"] == "loss" and desc["options"].get("reduction", "mean") != "none"


def _differentiable_outputs(desc) -> int:
    """How many leading outputs carry gradients: logp (and the entropy), or the loss."""
    return 1 + bool(desc["kind"] == "logprobs" and desc["options"].get("return_entropy"))


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _out_dtype(inputs) -> torch.dtype:
    floats = [t.dtype for t in inputs[:2] if t is not None]
    return torch.float64 if torch.float64 in floats else torch.float32


@contextlib.contextmanager
def _autograd_recorded():
    """Autograd inside an operator's kernel. The dispatcher runs a custom operator's kernel below
    the autograd key (excluded in the thread's dispatch state), so ``torch.enable_grad()`` alone
    records nothing there; the eager function needs its graph to give its gradients."""
    key = torch._C.DispatchKey.AutogradFunctionality
    was = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


def _leaves(inputs, needs):
    return [None if t is None else t.detach().requires_grad_(bool(need) and t.is_floating_point())
            for t, need in zip(inputs, needs)]


def _grads(outputs, leaves, needs, grad_outputs=None) -> list[torch.Tensor]:
    """Gradients of ``outputs`` w.r.t. the needed leaves ([0]-shaped empties elsewhere)."""
    wanted = [leaf for leaf, need in zip(leaves, needs) if need]
    got = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True) if wanted else ())
    out = []
    for leaf, need in zip(leaves, needs):
        g = next(got) if need else None
        if need and g is None:
            g = torch.zeros_like(leaf)
        out.append(g.detach() if need else torch.empty(0))
    return out


# ----------------------------------------------------------------------------- the operators


@torch.library.custom_op("drdo::fused", mutates_args=())
def fused(inputs: list[torch.Tensor], missing: list[bool], needs: list[bool], call: str) -> list[torch.Tensor]:
    """Run the eager function of ``call`` on ``inputs`` (``missing``: passed as None; the list holds
    an empty placeholder). Outputs: logprobs -> [logp] (or [logp, entropy]); loss -> [loss, metric
    values [n], and for a scalar loss the gradient of each input (needed ones; [0]-shaped empties
    elsewhere)]."""
    inputs = _given(inputs, missing)
    fn, kwargs, desc = _unpack(call, inputs)
    dtype = _out_dtype(inputs)
    if desc["kind"] == "logprobs":
        with torch.no_grad():
            return [out.to(dtype) for out in _as_list(_run(fn, kwargs, desc))]
    in_forward = _scalar_loss(desc) and any(needs)
    if not in_forward:
        with torch.no_grad():
            loss, metrics = _run(fn, kwargs, desc)
        return [loss.to(dtype), _metric_values(metrics, dtype)]
    leaves = _leaves(inputs, needs)
    kwargs.update(zip(desc["tensors"], leaves))
    with _autograd_recorded():
        loss, metrics = _run(fn, kwargs, desc)
        grads = _grads(loss, leaves, needs)
    return [loss.detach().to(dtype), _metric_values(metrics, dtype), *grads]


def _metric_values(metrics: dict, dtype) -> torch.Tensor:
    values = [v.detach().to(dtype).reshape(()) for k, v in metrics.items() if k != "loss"]
    return torch.stack(values) if values else torch.zeros(0, dtype=dtype)


def _given(inputs, missing):
    return [None if none else t for t, none in zip(inputs, missing)]


@fused.register_fake
def _fused_fake(inputs, missing, needs, call):
    inputs = _given(inputs, missing)
    desc = json.loads(call)
    named = dict(zip(desc["tensors"], inputs))
    dtype = _out_dtype(inputs)
    if desc["kind"] == "logprobs":
        labels = named["labels"]
        return [labels.new_empty(labels.shape, dtype=dtype) for _ in range(_differentiable_outputs(desc))]
    rows = named["hidden"].shape[0]
    loss_shape = () if _scalar_loss(desc) else (rows // 2,)
    out = [named["hidden"].new_empty(loss_shape, dtype=dtype),
           named["hidden"].new_empty((len(desc["metrics"]),), dtype=dtype)]
    if _scalar_loss(desc) and any(needs):
        out += [t.new_empty(t.shape) if need else t.new_empty(0) if t is not None else
                named["hidden"].new_empty(0) for t, need in zip(inputs, needs)]
    return out


@torch.library.custom_op("drdo::fused_vjp", mutates_args=())
def fused_vjp(inputs: list[torch.Tensor], missing: list[bool], needs: list[bool], call: str,
              grad_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of each needed input of ``call``'s differentiable outputs (log-probs and
    entropies, or per-pair losses) against ``grad_outputs``, by rerunning the eager function
    under autograd."""
    inputs = _given(inputs, missing)
    fn, kwargs, desc = _unpack(call, inputs)
    leaves = _leaves(inputs, needs)
    kwargs.update(zip(desc["tensors"], leaves))
    with _autograd_recorded():
        out = _as_list(_run(fn, kwargs, desc))[:_differentiable_outputs(desc)]
        return _grads(out, leaves, needs, [g.to(o.dtype) for g, o in zip(grad_outputs, out)])


@fused_vjp.register_fake
def _fused_vjp_fake(inputs, missing, needs, call, grad_outputs):
    return [t.new_empty(t.shape) if need else t.new_empty(0) for t, need in zip(inputs, needs)]


def _setup_context(ctx, inputs, output):
    tensors, missing, needs, call = inputs
    ctx.missing, ctx.needs, ctx.call = missing, needs, call
    desc = json.loads(call)
    ctx.in_forward = _scalar_loss(desc) and any(needs)
    ctx.outputs = [(o.shape, o.dtype, o.device) for o in output[:_differentiable_outputs(desc)]]
    ctx.dtypes = [t.dtype for t in tensors]
    ctx.save_for_backward(*(output[2:] if ctx.in_forward else tensors))


def _backward(ctx, grad_outputs):
    upstream = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                for g, (shape, dtype, device) in zip(grad_outputs, ctx.outputs)]
    if ctx.in_forward:
        g = upstream[0]
        grads = [d * g.to(d.dtype) if need else None for d, need in zip(ctx.saved_tensors, ctx.needs)]
    else:
        raw = torch.ops.drdo.fused_vjp(list(ctx.saved_tensors), ctx.missing, ctx.needs, ctx.call, upstream)
        grads = [d if need else None for d, need in zip(raw, ctx.needs)]
    grads = [None if d is None else d.to(dtype) for d, dtype in zip(grads, ctx.dtypes)]
    return grads, None, None, None


fused.register_autograd(_backward, setup_context=_setup_context)
