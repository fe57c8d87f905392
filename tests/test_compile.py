"""dwt.py and a WaveFT layer under torch.compile give the uncompiled results (issue 9 B2).

With backend="eager", torch 2.13 once traced the filter construction `(-1.0) ** torch.arange(L)` as
`-(1.0 ** arange)`, so every compiled detail band and inverse was silently wrong (aot_eager and inductor happened
to be right). The filters are now python floats designed at import, outside any trace. These tests compare each
backend (eager, aot_eager and the default inductor, which compiles C++ and is therefore kept to one small dwt
case) with the plain eager call."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dwt
import waveft


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Every test traces from scratch (a cached graph from another test would hide a tracing error)."""
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs; avoids waiting on a descheduled thread on the shared machine
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def transforms(x, wavelet, mode):
    """dwt/idwt along a middle dim and dwt2/idwt2."""
    cA, cD = dwt.dwt(x, wavelet, mode, dim=1)
    bands = dwt.dwt2(x, wavelet, mode)
    return [cA, cD, dwt.idwt(cA, cD, wavelet, mode, dim=1), *bands[1], dwt.idwt2(bands, wavelet, mode)]


def assert_compiled_equals_eager(fn, backend, *args):
    expected = fn(*args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(compiled) == len(expected)
    for i, (ours, ref) in enumerate(zip(compiled, expected)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"output {i}: {m}")
    dynamo_warnings = [str(w.message) for w in caught if "Dynamo" in str(w.message)]  # e.g. "lru_cache-wrapped"
    assert not dynamo_warnings, dynamo_warnings


X = torch.randn(2, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend, wavelet, mode", [("eager", "db2", "symmetric"),
                                                    ("aot_eager", "sym4", "periodization")])
def test_dwt_compiled_equals_eager(backend, wavelet, mode):
    assert_compiled_equals_eager(transforms, backend, X, wavelet, mode)


def test_dwt_inductor_equals_eager():
    """The default backend generates and compiles C++ (seconds per kernel, more on a loaded machine): one small
    graph with a detail band and an inverse, the outputs the wrong signs broke. Scalar C++ (vec_isa_ok=False): on
    a fresh machine inductor would first compile a probe program per SIMD instruction set (~15 s on 2 cores), and
    what is tested here is the traced graph, not the vector code generator."""
    import torch._inductor.config
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        assert_compiled_equals_eager(lambda x: [*dwt.dwt(x, "coif1"), dwt.idwt(x, x, "coif1")], "inductor", X)


def tiny_waveft_model(shape, wavelet):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0])).double()
    (spectrum,) = waveft.inject(model, k=23, wavelet=wavelet, target_modules=["0"])
    return model, spectrum


def output_and_grad(model, spectrum, x, g):
    y = model(x)
    return y, torch.autograd.grad(y, spectrum, g)[0]


def test_waveft_layer_compiled_first_equals_dense_definition():
    """A WaveFT layer compiled before its first forward builds its caches inside the trace, and the uncompiled
    layer then shares them; so both are checked against the dense definition y = x (W + dW)^T + b, with
    dW(s) = sum_i s_i dW(e_i) read off waveft.merge (public API only; dW is linear in the spectrum s).
    The layer shape is used by no other test, so no cached state from elsewhere is reused."""
    shape = (12, 9)
    model, spectrum = tiny_waveft_model(shape, "db2")
    eye = torch.eye(shape[1], dtype=torch.float64)

    def merged_weight():  # W + dW(spectrum) and b, read off a merged copy (its forward is a plain nn.Linear)
        merged = copy.deepcopy(model)
        waveft.merge(merged)
        bias = merged(torch.zeros(shape[1], dtype=torch.float64))
        return (merged(eye) - bias).T, bias

    with torch.no_grad():
        weight, bias = merged_weight()  # the spectrum starts at 0
        basis = []
        for i in range(spectrum.numel()):
            spectrum.zero_()[i] = 1.0
            basis.append(merged_weight()[0] - weight)  # dW(e_i)
        basis = torch.stack(basis)  # (k, out, in)
        spectrum.copy_(torch.randn(spectrum.shape, dtype=torch.float64))
    x = torch.randn(3, 5, shape[1], dtype=torch.float64)
    g = torch.randn(3, 5, shape[0], dtype=torch.float64)

    y_compiled, grad_compiled = output_and_grad(torch.compile(model, backend="eager"), spectrum, x, g)
    y_eager, grad_eager = output_and_grad(model, spectrum, x, g)
    s = spectrum.detach().clone().requires_grad_()
    y_dense = F.linear(x, weight + torch.einsum("k,koi->oi", s, basis), bias)
    (grad_dense,) = torch.autograd.grad(y_dense, s, g)
    for y, grad in [(y_compiled, grad_compiled), (y_eager, grad_eager)]:
        torch.testing.assert_close(y, y_dense, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, grad_dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-12, atol=1e-12)
    assert grad_dense.abs().min() > 0 and (y_dense - F.linear(x, weight, bias)).abs().max() > 0.1


def test_waveft_layer_aot_eager_equals_eager():
    """aot_eager traces forward and backward into one joint graph; compiled after an eager forward (quick)."""
    model, spectrum = tiny_waveft_model((9, 14), "sym3")
    with torch.no_grad():
        spectrum.normal_()
    x = torch.randn(3, 5, 14, dtype=torch.float64)
    g = torch.randn(3, 5, 9, dtype=torch.float64)
    y, grad = output_and_grad(model, spectrum, x, g)
    y_compiled, grad_compiled = output_and_grad(torch.compile(model, backend="aot_eager"), spectrum, x, g)
    torch.testing.assert_close(y_compiled, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_compiled, grad, rtol=1e-12, atol=1e-12)
    assert grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------------
# Whole-graph compile (issue 16): fullgraph=True, so that any graph break fails. The fast path's sparse kernels run
# inside one custom op each way, so the compiled layer computes exactly what the eager one does.

def recipe_layer(shape=(12, 9), k=23):
    """A WaveFT layer on the recipe's path: bf16 frozen weight (odd in: padded and cropped), float32 spectrum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0])).to(torch.bfloat16)
    (spectrum,) = waveft.inject(model, k=k, wavelet="db2", target_modules=["0"])
    with torch.no_grad():
        spectrum.normal_()
    return model, spectrum


def autocast_output_and_grads(model, spectrum, x, g):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    return (y, *torch.autograd.grad(y, (x, spectrum), g))


@pytest.mark.parametrize("eager_first", [False, True])
def test_waveft_layer_compiles_whole_graph(eager_first):
    """aot_eager (forward and backward traced into one joint graph), fullgraph: compiled before any eager call (the
    plan is made when the layer is made) or after one (no data-pointer comparison in the graph); under bf16
    autocast, few and many tokens. The compiled layer gives the eager outputs and gradients exactly."""
    model, spectrum = recipe_layer()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for tokens in (2, 40):  # the factored path and, in float32, one matmul with W + dW (below: float64 model)
        x = torch.randn(tokens, 9, requires_grad=True)
        g = torch.randn(tokens, 12)
        runs = [autocast_output_and_grads(m, spectrum, x, g) for m in ((model, compiled) if eager_first
                                                                       else (compiled, model))]
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    model64 = nn.Sequential(nn.Linear(9, 12)).double()
    (s64,) = waveft.inject(model64, k=23, wavelet="db2", target_modules=["0"])
    x, g = torch.randn(40, 9, dtype=torch.float64, requires_grad=True), torch.randn(40, 12, dtype=torch.float64)
    assert model64(x).grad_fn.dense_matmul  # many float64 tokens: the W + dW path, compiled too
    for a, b in zip(output_and_grad(torch.compile(model64, backend="aot_eager", fullgraph=True), s64, x, g),
                    output_and_grad(model64, s64, x, g)):
        assert torch.equal(a, b)


def test_compiled_layer_follows_new_positions_and_device_moves():
    """The plan is made outside the graph, so whatever changes the positions must remake it before a compiled call:
    load_state_dict (in place: the layer's hook), a move (.to: _apply). The compiled layer then equals eager."""
    model, spectrum = recipe_layer()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, g = torch.randn(3, 9, requires_grad=True), torch.randn(3, 12)
    before = autocast_output_and_grads(compiled, spectrum, x, g)
    state = model.state_dict()
    state["0.waveft_positions"] = waveft.draw_positions(12, 9, 23, seed=1)
    model.load_state_dict(state)
    after = autocast_output_and_grads(compiled, spectrum, x, g)
    assert not torch.equal(after[0], before[0])
    for a, b in zip(after, autocast_output_and_grads(model, spectrum, x, g)):
        assert torch.equal(a, b)
    model.float()  # a cast (_apply): the plan is looked up again, the same one
    assert torch.equal(compiled(x), model(x))


def test_waveft_layer_inductor_equals_eager():
    """The default backend on one layer (its C++ is scalar, as in test_dwt_inductor_equals_eager): the compile of
    forward and backward is quick (the layer is one custom op each way) and the results are eager's."""
    import torch._inductor.config
    model, spectrum = recipe_layer()
    x, g = torch.randn(3, 9, requires_grad=True), torch.randn(3, 12)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        compiled = autocast_output_and_grads(torch.compile(model, fullgraph=True), spectrum, x, g)
    for a, b in zip(compiled, autocast_output_and_grads(model, spectrum, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_train_compile_gives_the_eager_losses(tmp_path, monkeypatch, tiny_run_dir, dreambooth_dir):
    """train_dreambooth.py --compile: the tiny SDXL UNet with WaveFT compiled whole (fullgraph) for training. Its
    first two steps' losses equal those of the eager run of the same options (the session's tiny run) within
    float rounding; --compile is in config.json, not in the run's name (it does not change the result).
    aot_eager, not inductor: inductor's C++ compile of the whole UNet takes minutes on this CPU."""
    import csv
    import train_dreambooth
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    run = train_dreambooth.main(["--subject", "dog6", "--k", "2000", "--model", "tiny", "--data-dir",
                                 str(dreambooth_dir), "--output-dir", str(tmp_path), "--resolution", "64",
                                 "--steps", "2", "--grad-accum", "2", "--validation-prompts", "0", "--compile"])
    assert run.name == "dog6-waveft-k2000-tiny-steps2-ga2"
    assert json.loads((run / "config.json").read_text())["compile"] is True
    losses = [[float(row["loss"]) for row in csv.DictReader(open(d / "loss.csv"))] for d in (run, tiny_run_dir)]
    assert len(losses[0]) == 2
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1][:2]), rtol=1e-5, atol=0)
