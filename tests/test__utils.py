"""The helpers every kernel module shares (kernels/_utils.py)."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from lightllm.kernels import _utils


def test_autotune_configs_keep_one_config_under_the_interpreter(monkeypatch):
    configs = [triton.Config({"BLOCK": b}) for b in (64, 128, 256)]
    monkeypatch.setattr(_utils, "INTERPRET", True)
    assert _utils.autotune_configs(configs) == configs[:1]
    monkeypatch.setattr(_utils, "INTERPRET", False)
    assert _utils.autotune_configs(configs) == configs


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("0", False)])
def test_autotune_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("LIGHTLLM_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("LIGHTLLM_AUTOTUNE", value)
    assert _utils.autotune_enabled() is enabled


def _double_kernel():
    @triton.jit
    def _double(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)

    return _double


def test_autotune_off_runs_the_first_config_untimed(monkeypatch):
    """LIGHTLLM_AUTOTUNE=0: the first pruned config, and no timing even of a lone config (triton
    3.6's Autotuner.run times what pruning leaves; the wrapper answers that without running)."""
    timed = []
    monkeypatch.setattr(triton.runtime.Autotuner, "_bench",
                        lambda self, *args, config, **meta: timed.append(config) or [1.0] * 3)
    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    tuner = _utils.autotune(configs, key=["N"])(_double_kernel())

    monkeypatch.setenv("LIGHTLLM_AUTOTUNE", "0")
    assert tuner.prune_configs({}) == configs[:1]
    assert tuner._bench(config=configs[0]) == [0.0, 0.0, 0.0] and timed == []
    x = torch.randn(37)
    y = torch.empty_like(x)
    tuner[lambda meta: (triton.cdiv(37, meta["BLOCK"]),)](x, y, 37)
    assert torch.equal(y, 2 * x) and timed == []
    assert tuner.best_config is configs[0]

    monkeypatch.setenv("LIGHTLLM_AUTOTUNE", "1")
    assert tuner.prune_configs({}) == configs
    tuner._bench(config=configs[1])
    assert timed == [configs[1]]


@pytest.mark.parametrize("n, cap, block", [(0, 1024, 1), (1, 1024, 1), (3, 1024, 4),
                                           (1023, 1024, 1024), (1500, 1024, 1024),
                                           (20000, 4096, 4096)])
def test_row_block(n, cap, block):
    assert _utils.row_block(n, cap) == block


@pytest.mark.parametrize("block, warps", [(1, 1), (256, 1), (1024, 4), (4096, 16), (65536, 16)])
def test_warps_for_block(block, warps):
    assert _utils.warps_for_block(block) == warps


@pytest.mark.parametrize("poison", [True, False])
def test_empty_poisons_float_outputs_only_when_asked(monkeypatch, poison):
    monkeypatch.setattr(_utils, "POISON_OUTPUTS", poison)
    out = _utils.empty((3, 5), dtype=torch.float16, device="cpu")
    assert out.shape == (3, 5) and out.dtype == torch.float16
    if poison:
        assert out.isnan().all()
    ints = _utils.empty((4,), dtype=torch.int32, device="cpu")  # NaN has no integer form
    assert ints.dtype == torch.int32


def test_device_facts():
    """One table: the driver's facts on a GPU, Hopper's limits with a few SMs elsewhere (the
    interpreter), and `pretend` swaps it for every launcher at once."""
    import dataclasses

    from lightllm.kernels import _device

    t = torch.empty(1, device=DEVICE)
    facts = _device.facts(t.device)
    assert _device.sm_count(t) == facts.sms > 0
    assert facts.smem_per_block <= facts.smem_per_sm and facts.regs_per_sm >= 32 * 1024
    if not t.is_cuda:
        assert facts == dataclasses.replace(_device.HOPPER, name=facts.name, sms=4)
    big = dataclasses.replace(_device.HOPPER, sms=1000)
    with _device.pretend(big):
        assert _device.sm_count(t) == 1000 and _device.facts(t.device) is big
    assert _device.facts(t.device) == facts
