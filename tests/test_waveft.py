"""Tests for waveft.py: exactness against PEFT and against autograd through the dense dW, the fast path's
precision and memory guarantees, injection, merge, save/load, training, and every error message."""
import copy

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import dwt
import waveft
from conftest import need, randomize, run, tiny_unet  # peft is the reference: its tests take the `peft` fixture


def peft_layer(out_f, in_f, k, wavelet, use_idwt=True, dtype=torch.float64):
    peft = need("peft")
    model = nn.Sequential(nn.Linear(in_f, out_f).to(dtype))
    cfg = peft.WaveFTConfig(n_frequency=k, wavelet_family=wavelet, use_idwt=use_idwt, target_modules=["0"],
                            init_weights=False)
    return peft.inject_adapter_in_model(cfg, model)[0]


@pytest.mark.parametrize("wavelet", ["db1", "db2", "db3", "db4"])
@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (9, 7), (12, 5), (5, 16)])
def test_delta_weight_and_positions_equal_peft(wavelet, shape):
    k = min(20, shape[0] * shape[1])
    layer = peft_layer(*shape, k, wavelet)
    ours = waveft.WaveFTLinear(nn.Linear(shape[1], shape[0]).double(), k, 25.0, wavelet, 777, True)
    assert torch.equal(ours.waveft_positions, layer.waveft_indices["default"])
    with torch.no_grad():
        ours.waveft_spectrum.copy_(layer.waveft_spectrum["default"])
        expected = layer.get_delta_weight("default")
        # 1e-9: PEFT's built-in filter tables carry ~10 significant digits (ours: float64 exact)
        torch.testing.assert_close(ours.delta_weight(), expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    assert expected.abs().max() > 0


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (12, 5), (5, 16)])  # even, odd, rectangular both ways
def test_fourierft_equals_peft_delta_weight_forward_and_init(shape, peft):
    """FourierFT as PEFT computes it: the same positions, dW = scaling Re(IFFT2(C)) in float32, the same forward;
    and the same initial spectrum, PEFT's default (init_weights=False: standard normal from the global RNG), which
    init_seed reproduces without touching the global RNG."""
    torch.manual_seed(0)
    base = nn.Linear(shape[1], shape[0])
    ours = waveft.FourierFTLinear(copy.deepcopy(base), 20, 64.0, 777, init_seed=3)
    torch.manual_seed(3)  # PEFT's spectrum is the next draw of the global RNG
    config = peft.FourierFTConfig(n_frequency=20, scaling=64.0, target_modules=["0"])
    layer = peft.inject_adapter_in_model(config, nn.Sequential(base))[0]
    assert torch.equal(ours.fourierft_positions, layer.indices["default"])
    assert torch.equal(ours.fourierft_spectrum, layer.fourierft_spectrum["default"])
    with torch.no_grad():
        expected = layer.get_delta_weight("default")
        torch.testing.assert_close(ours.delta_weight(), expected, rtol=0, atol=0)
        x = torch.randn(3, shape[1])
        torch.testing.assert_close(ours(x), layer(x), rtol=1e-5, atol=1e-6)
    assert expected.abs().min() > 0  # a global basis: every entry of W moves


def test_weight_domain_baseline_equals_peft():
    layer = peft_layer(9, 6, 17, "db1", use_idwt=False)
    ours = waveft.WaveFTLinear(nn.Linear(6, 9).double(), 17, 25.0, "db1", 777, use_idwt=False)
    with torch.no_grad():
        ours.waveft_spectrum.copy_(layer.waveft_spectrum["default"])
        torch.testing.assert_close(ours.delta_weight(), layer.get_delta_weight("default"), rtol=0, atol=0)


@pytest.mark.parametrize("wavelet", ["db1", "db2", "db4"])
def test_padding_and_centring_as_the_readme_states(wavelet):
    """docs/waveft.md, "Padding and centring": C pads an even side by L - 2 and an odd one by L - 1, the positions
    move by (L - 2) / 2, and of the IDWT (n rows for an even n, n + 1 for an odd one) the first n rows (columns) are
    kept."""
    L = len(dwt.wavelet_filters(wavelet)[0])
    for out_f, in_f in [(8, 9), (9, 8)]:
        layer = waveft.WaveFTLinear(nn.Linear(in_f, out_f).double(), 6, 1.0, wavelet, 3, True)
        with torch.no_grad():
            layer.waveft_spectrum.normal_()
        rows, cols = (n + L - 2 + n % 2 for n in (out_f, in_f))
        C = torch.zeros(rows, cols, dtype=torch.float64)
        C[tuple(layer.waveft_positions + (L - 2) // 2)] = layer.waveft_spectrum.detach()
        h, w = rows // 2, cols // 2
        full = dwt.idwt2((C[:h, :w], (C[:h, w:], C[h:, :w], C[h:, w:])), wavelet)
        assert full.shape == (out_f + out_f % 2, in_f + in_f % 2)
        assert torch.equal(layer.delta_weight().detach(), full[:out_f, :in_f])



@pytest.mark.parametrize("wavelet", ["db1", "db2", "db4"])
@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (9, 7), (12, 5)])
@pytest.mark.parametrize("use_idwt", [True, False], ids=["idwt", "no-idwt"])
def test_explicit_a_s_b_equals_the_definition(wavelet, shape, use_idwt):
    """delta_weight_separable, dW = scaling * A S B^T with dense A (out x C_rows), S (C in band order) and B
    (in x C_cols), the identity the fast path computes with, equals delta_weight on odd and even sides."""
    layer = waveft.WaveFTLinear(nn.Linear(shape[1], shape[0]).double(), 10, 3.0, wavelet, 5, use_idwt)
    with torch.no_grad():
        layer.waveft_spectrum.normal_(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.delta_weight_separable(), layer.delta_weight(), rtol=0, atol=1e-12)


# The quarter table of waveft.py's docstring: (row, column) half of C -> the Haar block's signs (x 1/2)
QUARTERS = {"cA": (0, 0, [[1, 1], [1, 1]]), "cH": (0, 1, [[1, 1], [-1, -1]]), "cV": (1, 0, [[1, -1], [1, -1]]),
            "cD": (1, 1, [[1, -1], [-1, 1]])}


@pytest.mark.parametrize("quarter", QUARTERS)
def test_quarter_table(quarter):
    """A Haar coefficient at (i, j) of a quarter paints the 2 x 2 block at rows 2i, 2i + 1 and columns 2j, 2j + 1
    of dW with the quarter's signs / 2: high-pass along the out axis (the row index) for C's right half, along the
    in axis (the column index) for its bottom half."""
    row_half, col_half, signs = QUARTERS[quarter]
    layer = waveft.WaveFTLinear(nn.Linear(8, 8).double(), 1, 1.0, "db1", 0, True)
    layer.waveft_positions = torch.tensor([[4 * row_half + 1], [4 * col_half + 2]])  # (i, j) = (1, 2) of the quarter
    with torch.no_grad():
        layer.waveft_spectrum.fill_(1.0)
    expected = torch.zeros(8, 8, dtype=torch.float64)
    expected[2:4, 4:6] = 0.5 * torch.tensor(signs, dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=0, atol=1e-12)

def reference(layer, x):
    """Plain autograd through the dense definition: y = x (W + dW)^T + b."""
    return F.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias)


@pytest.mark.parametrize("wavelet,use_idwt", [("db1", True), ("db2", True), ("db4", True), ("db1", False)])
@pytest.mark.parametrize("shape,tokens,dense", [  # dense: N (out + in) >= out in, one matmul with W + dW
    ((13, 10), (3, 2), True), ((13, 10), (40, 3), True), ((6, 17), (5,), True), ((16, 16), (2, 50), True),
    ((3, 12), (40,), True),  # 3 rows: merged grad_x with an empty row block
    ((13, 10), (2,), False), ((16, 16), (3,), False), ((6, 17), (1, 2), False), ((3, 12), (2,), False)])
def test_fast_path_equals_dense_autograd_float64(wavelet, use_idwt, shape, tokens, dense):
    """(a) outputs and gradients (input and spectrum) match to 1e-6 relative, for both forward strategies
    (few tokens: factored A S B^T; many tokens: W + dW); each case asserts which one it took."""
    torch.manual_seed(0)
    layer = waveft.WaveFTLinear(nn.Linear(shape[1], shape[0]).double(), 30, 25.0, wavelet, 777, use_idwt)
    with torch.no_grad():
        layer.waveft_spectrum.normal_()
    x = torch.randn(*tokens, shape[1], dtype=torch.float64, requires_grad=True)
    g = torch.randn(*tokens, shape[0], dtype=torch.float64)
    grads = []
    for fn in (layer, lambda x: reference(layer, x)):
        y = fn(x)
        grads.append((y, *torch.autograd.grad(y, (x, layer.waveft_spectrum), g)))
    assert layer(x).grad_fn.dense_matmul is dense
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("fast", [True, False])
def test_low_precision_weight_keeps_small_updates(fast):
    """(b) with a bf16 W, a dW of 1e-4 relative to W still changes the output by x dW^T: the adapter runs
    in the spectrum's float32 (merging into bf16 W would round such an update away entirely). The definition
    path (fast=False) computes W + dW in float32 for the same reason."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(torch.bfloat16)
    layer = waveft.WaveFTLinear(base, 200, 25.0, "db1", 777, True, fast=fast)
    assert layer.waveft_spectrum.dtype == torch.float32
    x = torch.randn(3, 64)
    y0 = layer(x)
    with torch.no_grad():
        layer.waveft_spectrum.normal_()
        layer.waveft_spectrum.mul_(1e-4 * base.weight.float().abs().mean() / layer.delta_weight().abs().max())
        dW = layer.delta_weight()
        xb = x.to(torch.bfloat16)
        naive = F.linear(xb, base.weight + dW.to(torch.bfloat16)).float() - F.linear(xb, base.weight).float()
    y1 = layer(x.requires_grad_())
    expected = x.detach() @ dW.T
    torch.testing.assert_close(y1 - y0, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    assert (naive - expected).abs().max() > 0.5 * expected.abs().max()  # merging into bf16 W loses it
    y1.square().sum().backward()
    assert layer.waveft_spectrum.grad.dtype == torch.float32 and layer.waveft_spectrum.grad.abs().sum() > 0
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("tokens", [3, 400])
def test_no_out_by_in_tensor_saved_for_backward(tokens):
    """(c) autograd keeps only x, the frozen W itself and the k-vector; nothing of size out x in is new."""
    layer = waveft.WaveFTLinear(nn.Linear(48, 64), 100, 25.0, "db2", 777, True)
    x = torch.randn(tokens, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    new = [t for t in saved if t.data_ptr() not in (layer.base.weight.data_ptr(), x.data_ptr())]
    assert len(saved) >= 2 and all(t.numel() < 64 * 48 for t in new), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert layer.waveft_spectrum.grad is not None and x.grad is not None


def test_zero_init_is_base_model_and_only_spectra_train(unet_inputs):
    unet = tiny_unet()
    before = run(unet, unet_inputs)
    params = waveft.inject(unet, k=100)
    assert torch.equal(run(unet, unet_inputs), before)
    layers = waveft.adapted_layers(unet)
    assert len(layers) == 32 and len(params) == 32
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    assert all(n.endswith("waveft_spectrum") for n, _ in trainable) and len(trainable) == 32
    assert waveft.count_parameters(unet) == 100 * 32 == sum(p.numel() for _, p in trainable)
    shapes = {tuple(m.base.weight.shape) for _, m in layers}
    assert shapes == {(64, 64), (64, 32)}
    for _, m in layers:  # one cached draw per shape (each layer holds its own copy as a buffer)
        assert torch.equal(m.waveft_positions, waveft.draw_positions(*m.base.weight.shape, 100, 777))
    plans = {id(waveft._plan(m.waveft_positions, m.base.weight.shape, "db1", True, "cpu")) for _, m in layers}
    assert len(plans) == 2  # one index plan per shape
    assert {id(m._plan_memo[2]) for _, m in layers} == plans  # and the forward above used exactly those


def test_lora_zero_init_and_count(unet_inputs):
    unet = tiny_unet()
    before = run(unet, unet_inputs)
    waveft.inject(unet, method="lora", rank=2)
    assert torch.equal(run(unet, unet_inputs), before)
    expected = sum(2 * (m.base.in_features + m.base.out_features) for _, m in waveft.adapted_layers(unet))
    assert waveft.count_parameters(unet) == expected


@pytest.mark.parametrize("method", ["waveft", "lora", "fourierft"])
def test_merge_equals_unmerged_and_unmerge_restores(unet_inputs, method):
    unet = tiny_unet()
    weights = {n: p.clone() for n, p in unet.named_parameters()}
    waveft.inject(unet, method=method, k=300, wavelet="db3")
    randomize(unet, std=0.004 if method == "waveft" else 0.1)
    unmerged = run(unet, unet_inputs)
    assert (unmerged - run(tiny_unet(), unet_inputs)).abs().max() > 1e-3  # the adapter does something
    waveft.merge(unet)
    torch.testing.assert_close(run(unet, unet_inputs), unmerged, rtol=1e-4, atol=1e-5)
    waveft.unmerge(unet)
    for n, m in waveft.adapted_layers(unet):
        torch.testing.assert_close(m.base.weight, weights[n + ".weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(run(unet, unet_inputs), unmerged, rtol=1e-5, atol=1e-6)


def test_merge_refuses_nan():
    model = nn.Sequential(nn.Linear(8, 8))
    waveft.inject(model, k=4, target_modules=["0"])
    with torch.no_grad():
        model[0].waveft_spectrum[0] = float("nan")
    weight = model[0].base.weight.clone()
    with pytest.raises(ValueError, match="'0'.*NaN"):
        waveft.merge(model)
    assert torch.equal(model[0].base.weight, weight) and not model[0].merged


@pytest.mark.parametrize("method", ["waveft", "lora", "fourierft"])
def test_save_load_round_trip(tmp_path, unet_inputs, method):
    unet = tiny_unet()
    waveft.inject(unet, method=method, k=150, wavelet="db2", seed=5, rank=1, scaling=10.0, exclude_modules=["attn2.to_k"])
    randomize(unet, std=0.05)
    expected = run(unet, unet_inputs)
    path = tmp_path / "adapter.safetensors"
    waveft.save(unet, path, extra_metadata={"step": 7})
    fresh = tiny_unet()
    meta = waveft.load(fresh, path)
    torch.testing.assert_close(run(fresh, unet_inputs), expected, rtol=0, atol=0)
    assert meta == waveft.read_metadata(path)
    assert (meta["method"], meta["k"], meta["scaling"], meta["wavelet"], meta["seed"], meta["rank"], meta["step"]) \
        == (method, 150, 10.0, "db2", 5, 1, 7)
    assert meta["use_idwt"] is True and meta["target_modules"] == list(waveft.DEFAULT_TARGETS)
    assert len(meta["layers"]) == 28 and meta["layers"]["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"] == [64, 32]
    waveft.load(fresh, path)  # loading again into an adapted model also works
    assert waveft.count_parameters(fresh) == waveft.count_parameters(unet)


def three_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 7))


def rewritten(path, out, change):
    """A copy of the adapter file at `out` with change(tensors) applied (its metadata kept)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    change(tensors)
    safetensors.torch.save_file(tensors, str(out), metadata=metadata)
    return out


def test_refused_load_changes_nothing(tmp_path):
    """Every check comes before the first copy: a load refused at the last layer leaves all layers bit-identical,
    and one refused while loading into a model without adapters leaves it without adapters (and unfrozen)."""
    source = three_linears()
    waveft.inject(source, k=6, target_modules=["0", "1", "2"])
    randomize(source, std=1.0, seed=1)
    good = tmp_path / "good.safetensors"
    waveft.save(source, good)

    def bad_positions(t):
        t["2.waveft_positions"][0, 0] = 7  # layer 2 has 7 rows: 0..6

    def bad_shape(t):
        t["2.waveft_spectrum"] = torch.zeros(5)

    bad = [rewritten(good, tmp_path / "positions.safetensors", bad_positions),
           rewritten(good, tmp_path / "shape.safetensors", bad_shape)]
    target = three_linears()
    waveft.inject(target, k=6, target_modules=["0", "1", "2"])
    randomize(target, std=1.0, seed=2)
    merged_target = copy.deepcopy(target)
    waveft.merge(merged_target[2])  # only the last layer
    refusals = [(target, bad[0], r"positions of layer '2' fall outside its \(7, 5\) weight"),
                (target, bad[1], r"'2.waveft_spectrum' has shape \(5,\), the model expects \(6,\)"),
                (merged_target, good, r"layer '2' is merged"),
                (three_linears(), bad[0], "positions of layer '2'"), (three_linears(), bad[1], "2.waveft_spectrum")]
    for model, path, message in refusals:
        before = {key: value.clone() for key, value in model.state_dict().items()}
        trainable = [p.requires_grad for p in model.parameters()]
        with pytest.raises(ValueError, match=message):
            waveft.load(model, path)
        after = model.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before), message
        assert [p.requires_grad for p in model.parameters()] == trainable and hasattr(model, "_waveft_config") == \
            bool(waveft.adapted_layers(model))
    waveft.load(target, good)  # and the good file loads
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_load_checks_lora_shapes_and_takes_positions_into_adapted_layers(tmp_path):
    """load checks each tensor's shape before it changes the model (a LoRA file with a wrong lora_B changes nothing,
    with or without adapters in the model); a file without positions gets the seed's; and positions loaded into a
    layer that held others are what its forward (its index plan) uses from then on."""
    lora = three_linears()
    waveft.inject(lora, method="lora", rank=2, target_modules=["0", "1", "2"])
    good = tmp_path / "lora.safetensors"
    waveft.save(lora, good)
    bad = rewritten(good, tmp_path / "bad.safetensors", lambda t: t.update({"1.lora_B": torch.zeros(5, 3)}))
    adapted = three_linears()
    waveft.inject(adapted, method="lora", rank=2, target_modules=["0", "1", "2"])
    for model in (three_linears(), adapted):
        before = {key: value.clone() for key, value in model.state_dict().items()}
        trainable = [p.requires_grad for p in model.parameters()]
        with pytest.raises(ValueError, match=r"'1.lora_B' has shape \(5, 3\), the model expects \(5, 2\)"):
            waveft.load(model, bad)
        after = model.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)
        assert [p.requires_grad for p in model.parameters()] == trainable
    source = nn.Sequential(nn.Linear(10, 12))
    waveft.inject(source, k=7, target_modules=["0"])
    randomize(source, std=1.0)
    saved = tmp_path / "a.safetensors"
    waveft.save(source, saved)
    fresh = nn.Sequential(nn.Linear(10, 12))
    waveft.load(fresh, rewritten(saved, tmp_path / "unplaced.safetensors", lambda t: t.pop("0.waveft_positions")))
    assert torch.equal(fresh[0].waveft_positions, source[0].waveft_positions)  # the seed's
    custom = nn.Sequential(nn.Linear(10, 12))
    custom.load_state_dict({"0.weight": source[0].base.weight, "0.bias": source[0].base.bias})
    waveft.inject(custom, k=7, target_modules=["0"])
    with torch.no_grad():
        custom[0].waveft_positions = torch.tensor([[0, 1, 2, 3, 4, 5, 11], [9, 8, 7, 6, 5, 4, 0]])
    x = torch.randn(40, 10)
    custom(x)  # builds (and remembers) the index plan of these positions
    waveft.load(custom, saved)
    torch.testing.assert_close(custom(x), source(x), rtol=0, atol=0)


def test_load_uses_saved_positions(tmp_path):
    model = nn.Sequential(nn.Linear(10, 12))
    waveft.inject(model, k=7, target_modules=["0"])
    with torch.no_grad():
        model[0].waveft_positions = torch.tensor([[0, 1, 2, 3, 4, 5, 11], [9, 8, 7, 6, 5, 4, 0]])
        model[0].waveft_spectrum.normal_()
    x = torch.randn(4, 10)
    path = tmp_path / "a.safetensors"
    waveft.save(model, path)
    fresh = nn.Sequential(nn.Linear(10, 12))
    fresh.load_state_dict({"0.weight": model[0].base.weight, "0.bias": model[0].base.bias})
    waveft.load(fresh, path)
    assert torch.equal(fresh[0].waveft_positions, model[0].waveft_positions)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_adam_reduces_loss_on_toy_regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher[0].weight.add_(0.05 * torch.randn_like(teacher[0].weight))
    params = waveft.inject(model, k=400, target_modules=["0", "2"])
    opt = torch.optim.Adam(params, lr=1e-3)
    x = torch.randn(256, 32)
    target = teacher(x).detach()
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_matching_rules_and_summary(capsys):
    unet = tiny_unet()
    waveft.inject(unet, target_modules=r".*attn1\.to_(q|v)", exclude_modules=["up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"],
                  k=10, verbose=True)
    names = [n for n, _ in waveft.adapted_layers(unet)]
    assert len(names) == 7 and all(n.endswith(("attn1.to_q", "attn1.to_v")) for n in names)
    out = capsys.readouterr().out
    assert "64 x 64" in out and "7" in out and "total trainable parameters: 70" in out


def test_errors(tmp_path):
    unet = tiny_unet()
    with pytest.raises(ValueError, match=r"no module matched.*to_qq.*nn.Linear modules in this model, e.g. \['time_embedding"):
        waveft.inject(unet, target_modules=["to_qq"])
    with pytest.raises(ValueError, match=r"'down_blocks.1.attentions.0.transformer_blocks.0.attn1' .*Attention.*not an nn.Linear"):
        waveft.inject(unet, target_modules=r".*attn1")
    with pytest.raises(ValueError, match=r"k=0 .*attn1.to_q.* 64 x 64"):
        waveft.inject(unet, k=0)
    with pytest.raises(ValueError, match=r"k=4097 .*64 x 64.*4096"):
        waveft.inject(unet, k=4097)
    with pytest.raises(ValueError, match=r"unknown wavelet 'sym11'.*db1"):
        waveft.inject(unet, wavelet="sym11")
    with pytest.raises(ValueError, match="unknown method"):
        waveft.inject(unet, method="vera")
    assert not waveft.adapted_layers(unet) and all(p.requires_grad for p in unet.parameters())  # errors change nothing
    with pytest.raises(ValueError, match="no adapters to save"):
        waveft.save(unet, tmp_path / "x.safetensors")
    waveft.inject(unet, k=10)
    with pytest.raises(ValueError, match="already has adapters"):
        waveft.inject(unet, k=10)
    path = tmp_path / "unet.safetensors"
    waveft.save(unet, path)
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"(?s)another model.*not adapted Linear layers in the model \(32\)"):
        waveft.load(other, path)
    wider = tiny_unet()
    wider.mid_block.attentions[0].transformer_blocks[0].attn1.to_q = nn.Linear(64, 65, bias=False)
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*mid_block.*attn1.to_q: file \(64, 64\), model \(65, 64\)"):
        waveft.load(wider, path)
    other_k = tiny_unet()
    waveft.inject(other_k, k=11, wavelet="db2")
    with pytest.raises(ValueError, match=r"another adapter config.*k: file 10, model 11; wavelet: file 'db1', model 'db2'"):
        waveft.load(other_k, path)
    pickled = tmp_path / "adapter.bin"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="cannot read .*adapter.bin as a safetensors"):
        waveft.load(tiny_unet(), pickled)


@pytest.mark.parametrize("wavelet", ["db1"])  # other wavelets: dW equality with PEFT above
def test_spectrum_interchange_with_peft(unet_inputs, wavelet, peft):
    """A spectrum trained here, copied into a PEFT WaveFTConfig model, gives the same outputs, and back."""
    ours, theirs = tiny_unet(), tiny_unet()
    waveft.inject(ours, k=120, wavelet=wavelet)
    cfg = peft.WaveFTConfig(n_frequency=120, wavelet_family=wavelet, target_modules=list(waveft.DEFAULT_TARGETS))
    theirs = peft.inject_adapter_in_model(cfg, theirs)
    pairs = [(m.waveft_spectrum, dict(theirs.named_modules())[name].waveft_spectrum["default"])
             for name, m in waveft.adapted_layers(ours)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mine, peft_spectrum in pairs:  # trained here -> PEFT
            peft_spectrum.copy_(mine.normal_(generator=g).mul_(0.05))
    torch.testing.assert_close(run(ours, unet_inputs), run(theirs, unet_inputs), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for mine, peft_spectrum in pairs:  # trained in PEFT -> here
            mine.copy_(peft_spectrum.normal_(generator=g).mul_(0.05))
    expected = run(theirs, unet_inputs)
    assert (expected - run(tiny_unet(), unet_inputs)).abs().max() > 1e-3
    torch.testing.assert_close(run(ours, unet_inputs), expected, rtol=1e-5, atol=1e-5)


def test_frozen_spectrum_still_gives_input_gradient():
    layer = waveft.WaveFTLinear(nn.Linear(12, 9).double(), 20, 25.0, "db2", 777, True)
    with torch.no_grad():
        layer.waveft_spectrum.normal_()
    layer.waveft_spectrum.requires_grad_(False)
    for tokens in (2, 50):  # both forward strategies
        x = torch.randn(tokens, 12, dtype=torch.float64, requires_grad=True)
        ours, = torch.autograd.grad(layer(x).square().sum(), x)
        ref, = torch.autograd.grad(reference(layer, x).square().sum(), x)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_replaced_positions_get_their_own_plan():
    """Layers with the seed's positions share one cached plan per shape; a layer whose positions were
    replaced (or loaded) must not use, or overwrite, that shared plan."""
    custom, drawn = (nn.Sequential(nn.Linear(10, 12)) for _ in range(2))
    for m in (custom, drawn):
        waveft.inject(m, k=7, target_modules=["0"])
    with torch.no_grad():
        custom[0].waveft_positions = torch.tensor([[0, 1, 2, 3, 4, 5, 11], [9, 8, 7, 6, 5, 4, 0]])
        for m in (custom, drawn):
            m[0].waveft_spectrum.normal_()
    for tokens in (4, 40):
        x = torch.randn(tokens, 10)
        for m in (custom, drawn):
            torch.testing.assert_close(m(x), reference(m[0], x), rtol=1e-5, atol=1e-4)


def test_autocast_bf16_runs_base_in_bf16_and_adapter_in_float32():
    """Under torch.autocast (the training script's bf16 mode) the frozen matmul runs in bf16 like nn.Linear,
    the adapter and its gradient stay float32 and match the float32 reference to bf16 accuracy."""
    torch.manual_seed(0)
    layer = waveft.WaveFTLinear(nn.Linear(48, 40), 60, 25.0, "db2", 777, True)
    with torch.no_grad():
        layer.waveft_spectrum.normal_(std=0.01)
    for tokens in (3, 100):
        x = torch.randn(tokens, 48, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        gs, gx = torch.autograd.grad(y.float().square().sum(), (layer.waveft_spectrum, x))
        y_ref = reference(layer, x)
        gs_ref, gx_ref = torch.autograd.grad(y_ref.square().sum(), (layer.waveft_spectrum, x))
        assert gs.dtype == torch.float32
        for ours, ref in ((y.float(), y_ref), (gs, gs_ref), (gx, gx_ref)):
            torch.testing.assert_close(ours, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("method", ["waveft", "lora", "fourierft"])
def test_remove_restores_the_original_linear_layers(method, unet_inputs):
    unet = tiny_unet()
    originals = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    weights = {n: m.weight.clone() for n, m in originals.items()}
    before = run(unet, unet_inputs)
    waveft.inject(unet, method=method, k=50)
    randomize(unet, std=0.1)
    waveft.merge(unet)  # remove also unmerges
    assert waveft.remove(unet) is unet
    assert waveft.adapted_layers(unet) == [] and not hasattr(unet, "_waveft_config")
    after = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    assert after.keys() == originals.keys() and all(after[n] is originals[n] for n in after)
    for n, m in after.items():
        torch.testing.assert_close(m.weight, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(run(unet, unet_inputs), before, rtol=1e-5, atol=1e-5)
    waveft.inject(unet, method="waveft", k=10)  # a fresh adapter can go in again
    assert len(waveft.adapted_layers(unet)) == 32
    with pytest.raises(ValueError, match="no adapters"):
        waveft.remove(nn.Linear(2, 2))


def test_lora_init_is_reproducible_from_init_seed():
    def lora_weights(init_seed):
        unet = tiny_unet()
        torch.manual_seed(123 if init_seed is None else 0)  # the global RNG must not matter when init_seed is given
        waveft.inject(unet, method="lora", rank=2, init_seed=init_seed)
        return [m.lora_A.detach().clone() for _, m in waveft.adapted_layers(unet)]
    a, b, c = lora_weights(42), lora_weights(42), lora_weights(43)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # layers are not all given the same A
    bounds = [1 / x.shape[1] ** 0.5 for x in a]  # PEFT's kaiming_uniform_(a=sqrt(5)) range: U(-1/sqrt(in), ..)
    assert all(x.abs().max() <= bound and x.abs().max() > 0.8 * bound for x, bound in zip(a, bounds))


def test_positions_changed_in_place_are_picked_up():
    """A layer that has run a forward caches its index plan; load_state_dict copies new positions into the same
    buffer (in place). The next forward must use them: forward == x (W + dW)^T + b == the merged layer."""
    torch.manual_seed(0)
    layer = waveft.WaveFTLinear(nn.Linear(10, 12), 7, 25.0, "db2", 777, True)
    other = waveft.WaveFTLinear(nn.Linear(10, 12), 7, 25.0, "db2", 5, True)  # other seed: other positions
    other.load_state_dict(layer.state_dict())  # equal W, b; positions drawn from seed 5 get overwritten below
    with torch.no_grad():
        other.waveft_positions.copy_(waveft.draw_positions(12, 10, 7, 5))
        other.waveft_spectrum.normal_()
    for tokens in (4, 40):  # both forward strategies
        x = torch.randn(tokens, 10)
        layer(x)  # builds and caches the plan for seed 777's positions
        positions = layer.waveft_positions
        layer.load_state_dict(other.state_dict())
        assert layer.waveft_positions is positions and torch.equal(positions, other.waveft_positions)  # in place
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
        with torch.no_grad():
            layer.waveft_positions[0].copy_(waveft.draw_positions(12, 10, 7, 777)[0])  # a partial in-place edit
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_adapters_stay_float32_when_the_model_is_cast_to_bf16(unet_inputs):
    """pipe.to(torch.bfloat16) after inject casts every floating tensor of the UNet; the adapters must stay
    float32 (exact values, same Parameter objects, so an optimizer built before still trains them) and the
    bf16 model must train. A float64 cast still makes them float64 (float64 models train float64 adapters)."""
    for method in ("waveft", "lora", "fourierft"):
        unet = tiny_unet()
        params = waveft.inject(unet, method=method, k=100)
        randomize(unet, std=0.01)
        values = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=1e-3)
        unet.to(torch.bfloat16)
        assert all(p.dtype == torch.float32 for p in params) and all(torch.equal(p, v) for p, v in zip(params, values))
        assert {p.dtype for n, p in unet.named_parameters() if not p.requires_grad} == {torch.bfloat16}
        now = [p for _, m in waveft.adapted_layers(unet) for p in waveft._adapter_params(m)]
        assert all(a is b for a, b in zip(now, params))  # the optimizer holds the model's parameters
        inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in unet_inputs.items()}
        inputs["added_cond_kwargs"] = {k: v.to(torch.bfloat16) for k, v in unet_inputs["added_cond_kwargs"].items()}
        unet(**inputs).sample.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        assert not all(torch.equal(p, v) for p, v in zip(params, values))
        unet.half()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
        unet.double()
        assert all(p.dtype == torch.float64 for p in params)


def test_positions_depend_on_the_seed():
    """draw_positions caches by (out, in, k, seed): two seeds on one shape must give their own draws."""
    first, second = waveft.draw_positions(12, 10, 7, 1), waveft.draw_positions(12, 10, 7, 2)
    assert not torch.equal(first, second)
    flat = torch.randperm(120, generator=torch.Generator().manual_seed(2))[:7]
    assert torch.equal(second, torch.stack([flat // 10, flat % 10]))
    a, b = (waveft.WaveFTLinear(nn.Linear(10, 12), 7, 25.0, "db1", seed, True) for seed in (1, 2))
    assert torch.equal(a.waveft_positions, first) and torch.equal(b.waveft_positions, second)


def test_lora_forward_is_w_plus_delta_weight_with_scaling():
    """LoRA with scaling != 1: y = x (W + scaling * B A)^T + b, and delta_weight() is that scaling * B A."""
    torch.manual_seed(0)
    layer = waveft.LoRALinear(nn.Linear(10, 12).double(), 3, 2.5, init_seed=0)
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer.delta_weight(), 2.5 * layer.lora_B @ layer.lora_A, rtol=0, atol=0)
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias),
                               rtol=1e-12, atol=1e-12)


def definition_and_fast(shape, k, wavelet, use_idwt, dtype, device, seed=0):
    """Two copies of one WaveFT layer with the same random spectrum: fast=False (the definition) and fast=True."""
    torch.manual_seed(seed)
    base = nn.Linear(shape[1], shape[0]).to(device, dtype)
    layers = [waveft.WaveFTLinear(copy.deepcopy(base), k, 25.0, wavelet, 777, use_idwt, fast=fast)
              for fast in (False, True)]
    spectrum = torch.randn(k, dtype=layers[0].waveft_spectrum.dtype, device=device) * 0.01
    with torch.no_grad():
        for layer in layers:
            layer.waveft_spectrum.copy_(spectrum)
    return layers


@pytest.mark.parametrize("wavelet,use_idwt", [("db1", True), ("db3", True), ("db1", False), ("db3", False)])
@pytest.mark.parametrize("tokens,dense", [((2,), False), ((4, 30), True)])  # 20 x 24: few < 20 < many tokens
def test_definition_switch_equals_fast_path_float64(device, wavelet, use_idwt, tokens, dense):
    """inject(..., fast=False) makes forward literally F.linear(x, W + delta_weight(), b) (autograd through
    dwt.idwt2); it gives the fast path's outputs, input and coefficient gradients to 1e-10 in float64."""
    definition, fast = definition_and_fast((20, 24), 40, wavelet, use_idwt, torch.float64, device)
    x = torch.randn(*tokens, 24, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(*tokens, 20, dtype=torch.float64, device=device)
    results = []
    for layer in (definition, fast):
        y = layer(x)
        results.append((y, *torch.autograd.grad(y, (x, layer.waveft_spectrum), g)))
    assert torch.equal(definition(x), reference(definition, x))  # literally the definition, not a re-derivation
    assert "_WaveFTFunction" not in type(definition(x).grad_fn).__name__
    assert fast(x).grad_fn.dense_matmul is dense  # each fast strategy is checked
    for ours, ref in zip(results[1], results[0]):
        assert ours.abs().max() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("tokens", [3, 100])  # few and many tokens
def test_definition_switch_under_bf16_autocast(device, tokens):
    """Under bf16 autocast the definition path computes W + dW and the matmul in the adapter's float32 (autocast off:
    a bf16 W + dW would round small updates away), so it equals its own float32 result to 1e-6; the fast path runs
    the frozen matmul in bf16 like nn.Linear, so the two agree to bf16 accuracy: 3e-2 of the largest value."""
    definition, fast = definition_and_fast((40, 48), 60, "db3", True, torch.float32, device)
    x = torch.randn(tokens, 48, device=device, requires_grad=True)
    exact = [definition(x), *torch.autograd.grad(definition(x).square().sum(), (x, definition.waveft_spectrum))]
    results = []
    for layer in (definition, fast):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = layer(x)
        results.append((y, *torch.autograd.grad(y.float().square().sum(), (x, layer.waveft_spectrum))))
    for ours, ref in zip(results[0], exact):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_fast_path_device_selection(monkeypatch):
    """The fast path needs sparse CSR kernels (CPU, CUDA); elsewhere (Apple's mps) layers compute the definition
    and say so once. Simulated here by taking "cpu" off the list of devices that have them."""
    assert waveft.fast_path_supported("cpu") and waveft.fast_path_supported(torch.device("cuda", 1).type)
    assert not waveft.fast_path_supported("mps") and not waveft.fast_path_supported("meta")
    definition, fast = definition_and_fast((12, 10), 20, "db2", True, torch.float32, "cpu")
    monkeypatch.setattr(waveft, "SPARSE_CSR_DEVICES", ("cuda",))
    monkeypatch.setattr(waveft, "_WARNED_DEVICES", set())
    x = torch.randn(5, 10)
    with pytest.warns(UserWarning, match="no sparse CSR kernels on 'cpu'.*definition") as caught:
        for _ in range(3):
            assert torch.equal(fast(x), definition(x))
    assert len([w for w in caught if "sparse CSR" in str(w.message)]) == 1  # said once, not per layer or step
    assert "_WaveFTFunction" not in type(fast(x).grad_fn).__name__  # the fast path never ran


def test_fast_is_a_runtime_choice_not_saved(tmp_path, unet_inputs):
    """fast changes no adapter file; load injects fast layers by default, or fast=False ones."""
    paths = []
    for fast in (True, False):
        unet = tiny_unet()
        waveft.inject(unet, k=50, wavelet="db2", fast=fast)
        assert all(m.fast is fast for _, m in waveft.adapted_layers(unet))
        randomize(unet, std=0.01)
        paths.append(tmp_path / f"fast-{fast}.safetensors")
        waveft.save(unet, paths[-1])
    assert waveft.read_metadata(paths[0]) == waveft.read_metadata(paths[1])  # (the header's key order may differ)
    assert not any("fast" in key for key in waveft.read_metadata(paths[0]))
    tensors = [safetensors.torch.load_file(p) for p in paths]
    assert tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][n], tensors[1][n]) for n in tensors[0])
    outputs = []
    for fast in (None, False):
        fresh = tiny_unet()
        waveft.load(fresh, paths[0]) if fast is None else waveft.load(fresh, paths[0], fast=fast)
        assert all(m.fast is (fast is None) for _, m in waveft.adapted_layers(fresh))
        outputs.append(run(fresh, unet_inputs))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
