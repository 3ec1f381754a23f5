"""``torch.compile`` and the kernels: under compilation `gradmod.kernels.modulate_modalities_` is one custom
operator (``torch.ops.gradmod.modulate_modalities_``), so the kernel call path has no graph break and the
compiled call does what the eager one does. On the CPU this covers the reference and foreach backends (the
operator runs the eager implementation, so its tracing does not depend on the backend); on a CUDA device
the Triton backend is compiled with inductor too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import gradmod
from gradmod import kernels
from gradmod.kernels import NoiseKey, modulate_modalities_

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gradient_groups(device: str = "cpu") -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shapes = [[(30,), (4, 5)], [(7,), (3, 3, 2)]]
    return [[torch.randn(shape, generator=generator).to(device) for shape in shapes_m] for shapes_m in shapes]


def clone(groups):
    return [[g.clone() for g in grads] for grads in groups]


def calls(device: str = "cpu"):
    """``(name, function)`` pairs that call `modulate_modalities_` as an applier does, one variant each."""
    k = torch.tensor([0.5, 1.0], device=device)
    c = torch.ones(2, device=device)
    step = torch.tensor(3, device=device)

    def host_step(groups, backend):
        modulate_modalities_(groups, k * 1.0, c, NoiseKey(7, 3), backend)

    def device_step(groups, backend):  # capture-safe mode: the step is a device tensor (Triton only)
        modulate_modalities_(groups, k, c, NoiseKey(7, step), backend)

    def no_noise(groups, backend):
        modulate_modalities_(groups, k, None, None, backend)

    def given_stds(groups, backend):
        stds = [[g.std() for g in grads] for grads in groups]
        modulate_modalities_(groups, k, c, NoiseKey(7, 3, shard=1), backend, stds=stds)

    return {"host step": host_step, "device step": device_step, "no noise": no_noise, "given stds": given_stds}


@pytest.mark.parametrize("variant", ["host step", "device step", "no noise", "given stds"])
def test_kernel_call_traces_as_one_operator_without_graph_breaks(variant, monkeypatch):
    """The traced call is one graph holding the operator, and the operator hands the eager implementation
    the call it was given (groups, coefficients, key with its step, σ)."""
    received = []
    monkeypatch.setattr(kernels, "_modulate", lambda *args: received.append(args))
    call = calls()[variant]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(call)(gradient_groups(), "foreach")
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    code = "\n".join(graph.code for graph in explanation.graphs)
    assert "torch.ops.gradmod.modulate_modalities_" in code
    expected = []
    monkeypatch.setattr(kernels.torch.compiler, "is_compiling", lambda: False)  # the eager call, recorded
    call(gradient_groups(), "foreach")
    expected, received = received[-1], received[0]
    groups, coefficients, noise_scales, key, backend, stds = received
    assert [[g.shape for g in grads] for grads in groups] == [[g.shape for g in grads] for grads in expected[0]]
    assert torch.equal(coefficients, expected[1]) and backend == "foreach"
    assert (noise_scales is None) == (expected[2] is None) and (stds is None) == (expected[5] is None)
    if key is not None:
        assert (key.seed, key.shard, int(key.step)) == (expected[3].seed, expected[3].shard, int(expected[3].step))
        assert key.on_device == expected[3].on_device


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("variant", ["host step", "no noise", "given stds"])
def test_compiled_call_equals_eager(backend, variant):
    """``aot_eager`` functionalises the in-place operator: the compiled call must still modulate in place."""
    call = calls()[variant]
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    eager_groups, compiled_groups = gradient_groups(), gradient_groups()
    call(eager_groups, backend)
    compiled(compiled_groups, backend)
    for eager, out in zip(eager_groups, compiled_groups):
        assert all(torch.equal(e, o) for e, o in zip(eager, out))
    assert not torch.equal(compiled_groups[0][0], gradient_groups()[0][0]), "the gradients must have changed"


def test_device_step_reaches_the_operator_as_a_tensor():
    """Under compilation a device step stays a tensor (the generator backends then refuse it, as eagerly)."""
    call = calls()["device step"]
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="seed a torch.Generator from the step on the host"):
        compiled(gradient_groups(), "foreach")


def _optimizer_step_graph_breaks(modulate: bool, use_modulator: bool) -> dict[str, int]:
    """Graph breaks of ``optimizer.step()`` with a step pre-hook that modulates (or does nothing), by reason.

    Counted by Dynamo's graph-break counter, which records every break (``explain`` counts only those that
    split two non-empty graphs, so torch's own break at the optimizer's boundary shows only when the hook
    leaves something to compile before it)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    audio, visual = nn.Linear(8, 4), nn.Linear(8, 4)
    optimizer = torch.optim.SGD([*audio.parameters(), *visual.parameters()], lr=0.1)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    if use_modulator:
        modulator = gradmod.OGMGE({"audio": audio, "visual": visual}, alpha=0.5, backend="foreach", validate=False)
        modulator.attach(optimizer)
        if not modulate:
            modulator.applier.apply = lambda *args, **kwargs: None
        modulator.observe(logits={"audio": audio(torch.randn(16, 8)), "visual": visual(torch.randn(16, 8))},
                          target=torch.randint(0, 4, (16,)))
    else:
        k, c = torch.tensor([0.5, 1.0]), torch.ones(2)

        def hook(opt, args, kwargs):
            if modulate:
                groups = [[p.grad for p in audio.parameters()], [p.grad for p in visual.parameters()]]
                modulate_modalities_(groups, k, c, NoiseKey(1, 2), "foreach")

        optimizer.register_step_pre_hook(hook)
    torch._dynamo.explain(optimizer.step)()
    return dict(counters["graph_break"])


def test_modulating_hook_adds_no_graph_break_to_the_optimizer_step():
    """A step pre-hook calling the kernels breaks the compiled ``optimizer.step()`` no more than an empty hook
    (torch's optimizer has graph breaks of its own)."""
    assert _optimizer_step_graph_breaks(modulate=True, use_modulator=False) == _optimizer_step_graph_breaks(
        modulate=False, use_modulator=False
    )


def test_modulator_kernels_add_no_graph_break_to_the_optimizer_step():
    """With gradmod's own hook: applying the coefficients (kernels) adds no break to those of the rest of the
    step (the modulator's bookkeeping, torch's optimizer)."""
    assert _optimizer_step_graph_breaks(modulate=True, use_modulator=True) == _optimizer_step_graph_breaks(
        modulate=False, use_modulator=True
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton compiled)")
@pytest.mark.parametrize("variant", ["host step", "device step", "no noise", "given stds"])
def test_triton_call_compiles_with_inductor_and_equals_eager(variant):
    call = calls("cuda")[variant]
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True)
    eager_groups, compiled_groups = gradient_groups("cuda"), gradient_groups("cuda")
    call(eager_groups, "triton")
    compiled(compiled_groups, "triton")
    for eager, out in zip(eager_groups, compiled_groups):
        assert all(torch.equal(e, o) for e, o in zip(eager, out))
