"""The EMA of train.ema_decay: the formula, the first update's copy, integer buffers copied, no host syncs."""
from __future__ import annotations

import torch
import torch.nn as nn

from hmerzoo.host_syncs import HostSyncCounter
from hmerzoo.training import make_ema


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_ema_follows_the_formula_without_host_syncs():
    model = _model()
    decay = 0.9
    ema = make_ema(model, decay)
    expected = None
    with HostSyncCounter() as syncs:
        for k in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            model.train()(torch.randn(5, 4))  # moves the running statistics and num_batches_tracked
            ema.update_parameters(model)
            current = {name: t.detach().clone() for name, t in model.state_dict().items()}
            if expected is None:
                expected = dict(current)  # the first update copies
            else:
                expected = {name: t + (1 - decay) * (current[name] - t) if t.is_floating_point() else current[name]
                            for name, t in expected.items()}
    assert syncs.total == 0, syncs.summary()
    got = ema.module.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert int(got["1.num_batches_tracked"]) == 4  # copied, not averaged
    assert int(ema.n_averaged) == 4
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy


def test_a_restored_count_is_read_back():
    """A resumed run sets n_averaged by hand (fill_): the next update averages instead of copying."""
    model = _model()
    ema = make_ema(model, 0.5)
    ema.n_averaged.fill_(3)
    before = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, before + 0.5 * (model[0].weight - before))
    assert int(ema.n_averaged) == 4
