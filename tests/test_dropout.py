"""UniformMaskDropout: the vectorised mask on the CPU, torch's fused dropout on any other device (issue 14)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hmerzoo.layers import UniformMaskDropout


def test_cpu_path_is_the_uniform_mask_and_its_gradient():
    drop = UniformMaskDropout(0.25).train()
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(7)
    y = drop(x)
    torch.manual_seed(7)
    keep = torch.rand_like(x, dtype=torch.float32) < 0.75
    torch.testing.assert_close(y, x * keep * (1.0 / 0.75), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() * (1.0 / 0.75), rtol=0, atol=0)
    assert 0.65 < keep.float().mean() < 0.85
    assert drop.eval()(x) is x


def test_other_devices_take_the_fused_dropout(monkeypatch):
    """The dispatch is by device type: a meta tensor (no data, no GPU needed) goes to F.dropout, a CPU one never."""
    calls = []
    fused = F.dropout

    def spy(x, p=0.5, training=True, inplace=False):
        calls.append((x.device.type, p, training))
        return fused(x, p, training, inplace)

    monkeypatch.setattr(F, "dropout", spy)
    drop = UniformMaskDropout(0.3).train()
    out = drop(torch.empty(8, 16, device="meta"))
    assert out.shape == (8, 16) and out.device.type == "meta"
    assert calls == [("meta", 0.3, True)]
    drop(torch.ones(8, 16))
    assert len(calls) == 1  # the CPU path does not call it
    drop.eval()(torch.empty(2, 2, device="meta"))
    assert len(calls) == 1  # eval: identity on every device
