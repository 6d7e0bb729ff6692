"""lightllm.patch on PyTorch's Transformer layers: every configuration they accept runs lightllm's
kernels, in training and in inference (the fast path is replaced, not bypassed), with outputs by
the tolerance rule and gradients by the 3x rule against float64, and the ops counted."""

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn

import lightllm
from lightllm.testing import DispatchedOps, assert_parity, assert_three_way, patched_three_way

D, HEADS, FF = 32, 4, 72
ACTIVATIONS = {
    "relu": F.relu,  # PyTorch's default
    "gelu": "gelu",
    "gelu_tanh": nn.GELU(approximate="tanh"),
}
# Ops of PyTorch's own that a fully patched layer must never dispatch.
TORCH_PATHS = {"_transformer_encoder_layer_fwd", "_native_multi_head_attention",
               "native_layer_norm", "_scaled_dot_product_attention_math",
               "_scaled_dot_product_flash_attention_for_cpu", "gelu", "relu"}


@contextlib.contextmanager
def _fast_path(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _padding(batch, seq, lengths):
    pad = torch.zeros(batch, seq, dtype=torch.bool, device=DEVICE)
    for i, n in enumerate(lengths):
        pad[i, n:] = True
    return pad


def _encoder(norm_first, batch_first, activation, layers=2, **kw):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first, **kw)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(DEVICE)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_no_grad", "train"])
def test_encoder_stack(train, norm_first, batch_first, activation):
    model = _encoder(norm_first, batch_first, ACTIVATIONS[activation])
    b, s = 3, 13
    x = torch.randn((b, s, D) if batch_first else (s, b, D), device=DEVICE)
    pad = _padding(b, s, [13, 9, 4])

    def forward(m, x):
        return m(x, src_key_padding_mask=pad)

    # PyTorch's inference fast path computes exact GeLU for nn.GELU(approximate="tanh") (it
    # keeps only "relu or gelu"), 1e-4 off its own training path; lightllm follows the declared
    # activation, so the tanh case is compared with PyTorch's eager path.
    fast_path = activation != "gelu_tanh"
    with _fast_path(fast_path):
        results, ops, report = patched_three_way(model, forward, [x], train=train, grad=train)
    names = ["dx"] + [n for n, _ in model.named_parameters()]
    assert_three_way(results, names)
    # Per layer: attention, the fused Add & Norm, the fused feed-forward, and the one plain norm.
    for op in ("sdpa_fwd", "add_layer_norm_fwd", "feed_forward_fwd", "layer_norm_fwd"):
        assert ops.lightllm[op] == 2, (op, ops.lightllm)
    assert not TORCH_PATHS & set(ops.aten), ops.aten
    assert sorted(report.by_kind()) == ["attention", "layer", "norm"]


def test_layers_without_bias():
    model = _encoder(True, True, "gelu", bias=False)
    x = torch.randn(2, 7, D, device=DEVICE)
    results, ops, _ = patched_three_way(model, lambda m, x: m(x), [x], train=True, grad=True)
    assert_three_way(results, ["dx"] + [n for n, _ in model.named_parameters()])
    assert ops.lightllm["feed_forward_fwd"] == 2 and ops.lightllm["add_layer_norm_fwd"] == 2


def test_encoder_masks_and_causality():
    """An additive float src_mask, a bool one, and is_causal with its mask, beside padding."""
    model = _encoder(False, True, "gelu")
    x = torch.randn(2, 11, D, device=DEVICE)
    pad = _padding(2, 11, [11, 7])
    causal = nn.Transformer.generate_square_subsequent_mask(11, device=DEVICE)
    bool_mask = torch.rand(11, 11, device=DEVICE) < 0.3
    bool_mask.fill_diagonal_(False)  # True = blocked; every query keeps itself
    cases = [
        lambda m, x: m(x, mask=causal.to(x.dtype), is_causal=True),
        lambda m, x: m(x, mask=causal.to(x.dtype), src_key_padding_mask=pad),
        lambda m, x: m(x, mask=bool_mask, src_key_padding_mask=pad),
    ]
    for forward in cases:
        results, ops, _ = patched_three_way(model, forward, [x], train=True, grad=True)
        assert_three_way(results, ["dx"] + [n for n, _ in model.named_parameters()])
        assert ops.lightllm["sdpa_fwd"] == 2


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_no_grad", "train"])
def test_decoder_stack(train, norm_first):
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=norm_first)
    model = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(D)).to(DEVICE)
    tgt = torch.randn(3, 9, D, device=DEVICE)
    memory = torch.randn(3, 14, D, device=DEVICE)
    causal = nn.Transformer.generate_square_subsequent_mask(9, device=DEVICE)
    memory_pad = _padding(3, 14, [14, 10, 3])

    def forward(m, tgt, memory):
        return m(tgt, memory, tgt_mask=causal.to(tgt.dtype), tgt_is_causal=True,
                 memory_key_padding_mask=memory_pad)

    results, ops, _ = patched_three_way(model, forward, [tgt, memory], train=train, grad=train)
    assert_three_way(results, ["dtgt", "dmemory"] + [n for n, _ in model.named_parameters()])
    # Per layer: self- and cross-attention, two fused Add & Norms, the feed-forward, one plain
    # norm; plus the stack's final norm.
    assert ops.lightllm["sdpa_fwd"] == 4
    assert ops.lightllm["add_layer_norm_fwd"] == 4
    assert ops.lightllm["feed_forward_fwd"] == 2
    assert ops.lightllm["layer_norm_fwd"] == 3
    assert not TORCH_PATHS & set(ops.aten), ops.aten


def test_whole_transformer():
    torch.manual_seed(2)
    model = nn.Transformer(D, HEADS, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=FF, dropout=0.0, batch_first=True).to(DEVICE)
    src, tgt = torch.randn(2, 10, D, device=DEVICE), torch.randn(2, 7, D, device=DEVICE)
    causal = nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)
    src_pad = _padding(2, 10, [10, 6])

    def forward(m, src, tgt):
        return m(src, tgt, tgt_mask=causal.to(src.dtype), src_key_padding_mask=src_pad,
                 memory_key_padding_mask=src_pad)

    results, ops, report = patched_three_way(model, forward, [src, tgt], train=True, grad=True)
    assert_three_way(results, ["dsrc", "dtgt"] + [n for n, _ in model.named_parameters()])
    assert ops.lightllm["sdpa_fwd"] == 3 and ops.lightllm["feed_forward_fwd"] == 2
    assert not TORCH_PATHS & set(ops.aten), ops.aten
    assert len(report.by_kind()["layer"]) == 3  # encoder stack, encoder layer, decoder layer


def test_nested_tensor_fast_path_is_replaced():
    """In eval under no_grad with a padding mask PyTorch's stack packs a nested tensor and pads
    the output back with zeros; the patched stack stays dense and gives the same outputs."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D)).to(DEVICE).eval()
    assert model.use_nested_tensor
    x = torch.randn(3, 12, D, device=DEVICE)
    pad = _padding(3, 12, [12, 8, 5])  # right padding: PyTorch converts
    ours = copy.deepcopy(model)
    lightllm.patch(ours)
    with torch.no_grad():
        want = model(x, src_key_padding_mask=pad)
        with DispatchedOps() as ops:
            got = ours(x, src_key_padding_mask=pad)
        want64 = copy.deepcopy(model).double()(x.double(), src_key_padding_mask=pad)
    assert_parity(got, want64, want)
    # The padded rows are the final norm of zeros, exactly as PyTorch's.
    torch.testing.assert_close(got[pad], want[pad], atol=0, rtol=0)
    assert ops.lightllm["sdpa_fwd"] == 2 and "_nested_tensor_from_mask" not in ops.aten


def test_dropout_in_training():
    """Dropout stays on in training (outputs differ call to call, gradients flow) and off in
    eval (repeatable), with the fused kernels in both."""
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.2, activation="gelu",
                                       batch_first=True).to(DEVICE)
    lightllm.patch(layer)
    x = torch.randn(2, 9, D, device=DEVICE, requires_grad=True)
    with DispatchedOps() as ops:
        a = layer(x)
    b = layer(x)
    assert not torch.equal(a, b)
    assert ops.lightllm["linear_act_fwd"] == 1 and ops.lightllm["add_layer_norm_fwd"] == 1
    (a * torch.randn_like(a)).sum().backward()
    assert torch.isfinite(x.grad).all() and layer.linear1.weight.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x), atol=0, rtol=0)


def test_other_activation_runs_eagerly_and_is_reported():
    model = _encoder(True, True, F.silu)
    x = torch.randn(2, 6, D, device=DEVICE)
    results, ops, report = patched_three_way(model, lambda m, x: m(x), [x], train=True, grad=True)
    assert_three_way(results, ["dx"] + [n for n, _ in model.named_parameters()])
    assert ops.lightllm["feed_forward_fwd"] == 0 and ops.aten["silu"] == 2
    assert ops.lightllm["add_layer_norm_fwd"] == 2
    assert "activation silu runs eagerly" in str(report)


def test_layer_with_replaced_parts_is_left_alone():
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True).to(DEVICE)
    layer.norm2 = nn.RMSNorm(D).to(DEVICE)
    report = lightllm.patch(layer)
    assert type(layer) is nn.TransformerEncoderLayer
    assert "norm2 is RMSNorm" in report.left_alone[""]
    assert isinstance(layer.self_attn, lightllm.nn.MultiheadAttention)


def test_hooks_state_and_unpatch():
    model = _encoder(False, True, "relu")
    seen = []
    model.layers[0].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, D, device=DEVICE)
    with torch.no_grad():
        want = model(x)
    report = lightllm.patch(model)
    assert lightllm.patch(model).swapped == {}  # patching twice changes nothing
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state
    with torch.no_grad():
        model(x)
    assert seen == ["TransformerEncoderLayer", "TransformerEncoderLayer"]
    assert type(model.layers[0]) is lightllm.nn.TransformerEncoderLayer
    assert lightllm.unpatch(model) == len(report)
    assert type(model.layers[0]) is nn.TransformerEncoderLayer
    assert type(model.layers[0].norm1) is nn.LayerNorm
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_functools_partial_gelu_is_fused():
    model = _encoder(False, True, functools.partial(F.gelu, approximate="tanh"), layers=1)
    x = torch.randn(2, 5, D, device=DEVICE)
    results, ops, _ = patched_three_way(model, lambda m, x: m(x), [x], train=False, grad=False)
    assert_three_way(results, [])
    assert ops.lightllm["feed_forward_fwd"] == 1


def test_torch_compile_fullgraph_of_a_patched_layer():
    torch._dynamo.reset()
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True,
                                       norm_first=True).to(DEVICE)
    want_layer = copy.deepcopy(layer)
    lightllm.patch(layer)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 7, D, device=DEVICE, requires_grad=True)
    y = compiled(x)
    r = torch.randn_like(y)
    (y * r).sum().backward()
    x2 = x.detach().requires_grad_(True)
    y2 = want_layer(x2)
    (y2 * r).sum().backward()
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
