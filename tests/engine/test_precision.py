"""Mixed precision on CPU: what `auto` chooses, and that autocast covers the network only."""

import pytest
import torch

from retinanet.engine.precision import _cpu_has_native_bf16, autocast, grad_scaler, resolve_amp

CPU = torch.device("cpu")


def test_fp32_is_none_whichever_way_it_is_written():
    assert resolve_amp(None, CPU) is None and resolve_amp("", CPU) is None
    assert grad_scaler(None, CPU) is None and grad_scaler("bf16", CPU) is None


def test_auto_on_cpu_is_bf16_exactly_where_the_cpu_computes_it(monkeypatch):
    expected = "bf16" if _cpu_has_native_bf16() else None
    assert resolve_amp("auto", CPU) == expected
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    _cpu_has_native_bf16.cache_clear()
    try:
        assert resolve_amp("auto", CPU) is None
    finally:
        _cpu_has_native_bf16.cache_clear()


def test_unknown_and_impossible_choices_are_named():
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_amp("fp8", CPU)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", CPU)


def test_autocast_runs_matmuls_in_bf16_and_fp32_is_a_no_op():
    a = torch.randn(4, 4)
    with autocast("bf16", CPU):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(None, CPU):
        assert (a @ a).dtype == torch.float32
