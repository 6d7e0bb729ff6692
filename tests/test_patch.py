"""lightllm.patch: swaps supported modules in place, keeps parameters, changes only the kernels."""


import pytest
import torch
from conftest import DEVICE

import lightllm
from lightllm.kernels import norm as norm_kernel


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

    assert set(report.swapped) == {"encoder", "encoder.self_attn", "encoder.norm1",
                                   "encoder.norm2", "head_norm", "softmax"}
    assert report.by_kind() == {"layer": ["encoder"], "attention": ["encoder.self_attn"],
                                "norm": ["encoder.norm1", "encoder.norm2", "head_norm"],
                                "softmax": ["softmax"]}
    assert type(model["own_norm"]) is MyNorm
    assert "MyNorm subclasses torch.nn.LayerNorm" in report.left_alone["own_norm"]
    assert isinstance(model["head_norm"], lightllm.nn.LayerNorm)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == params_before
    text = str(report)
    assert "swapped 6 module(s)" in text and "encoder.norm1" in text
    assert "left alone (1):" in text and "own_norm: MyNorm subclasses" in text

    launches = []
    real = norm_kernel.layer_norm_fwd
    monkeypatch.setattr(norm_kernel, "layer_norm_fwd",
                        lambda *a: launches.append(1) or real(*a))
    out = _forward(model, x)
    assert len(launches) == 3  # the encoder's two norms (one in the fused Add & Norm), head_norm
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)

    assert lightllm.unpatch(model) == 6
    assert type(model["head_norm"]) is torch.nn.LayerNorm


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lightllm.patch(lambda x: x)


def test_patch_reports_nothing_to_do():
    report = lightllm.patch(torch.nn.Linear(3, 3))
    assert len(report) == 0
    assert "no supported module" in str(report)


def test_report_groups_repeated_layers():
    model = torch.nn.Sequential(*[torch.nn.LayerNorm(8) for _ in range(12)])
    text = str(lightllm.patch(model))
    assert "* (x12): torch.nn.LayerNorm -> lightllm.nn.LayerNorm" in text
