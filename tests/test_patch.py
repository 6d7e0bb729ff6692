"""lightllm.patch: swaps supported modules in place, keeps parameters, changes only the kernels."""

import copy

import pytest
import torch
from conftest import DEVICE
from lightllm.kernels import layer_norm as layer_norm_kernel

import lightllm


class MyNorm(torch.nn.LayerNorm):
    """A model's own LayerNorm variant: patch must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2


def _model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "encoder": torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                                    batch_first=True),
        "head_norm": torch.nn.LayerNorm(32),
        "own_norm": MyNorm(32),
        "softmax": torch.nn.Softmax(dim=-1),
    }).to(DEVICE)


def _forward(model, x):
    h = model["encoder"](x)
    return model["softmax"](model["own_norm"](model["head_norm"](h)))


def test_patch_swaps_in_place_and_keeps_parameters(monkeypatch):
    model = _model()
    x = torch.randn(2, 9, 32, device=DEVICE)
    expected = _forward(model, x)
    params_before = {k: v.data_ptr() for k, v in model.state_dict().items()}

    report = lightllm.patch(model)

    assert set(report.swapped) == {"encoder.self_attn", "encoder.norm1", "encoder.norm2",
                                   "head_norm", "softmax"}
    assert type(model["own_norm"]) is MyNorm
    assert isinstance(model["head_norm"], lightllm.nn.LayerNorm)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == params_before
    assert "encoder.norm1" in str(report)

    launches = []
    real = layer_norm_kernel.layer_norm_fwd
    monkeypatch.setattr(layer_norm_kernel, "layer_norm_fwd",
                        lambda *a: launches.append(1) or real(*a))
    out = _forward(model, x)  # training mode: the encoder runs its modules, not PyTorch's fast path
    assert len(launches) == 3
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)

    assert lightllm.unpatch(model) == 5
    assert type(model["head_norm"]) is torch.nn.LayerNorm


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lightllm.patch(lambda x: x)


def test_patch_reports_nothing_to_do():
    report = lightllm.patch(torch.nn.Linear(3, 3))
    assert len(report) == 0
    assert "no supported module" in str(report)


@pytest.mark.parametrize("norm_first", [False, True])
def test_patched_encoder_trains_like_the_original(norm_first):
    """One training step of a patched TransformerEncoder: same loss and parameter gradients."""
    torch.manual_seed(1)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True, norm_first=norm_first)
    original = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    original = original.to(DEVICE)
    patched = copy.deepcopy(original)
    assert len(lightllm.patch(patched)) == 6  # per layer: self_attn, norm1, norm2
    x = torch.randn(3, 11, 32, device=DEVICE)
    padding = torch.zeros(3, 11, dtype=torch.bool, device=DEVICE)
    padding[1, 7:] = True  # a padded sequence exercises the key-padding mask
    losses = []
    for model in (original, patched):
        out = model(x, src_key_padding_mask=padding)
        loss = out[~padding].pow(2).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(original.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
