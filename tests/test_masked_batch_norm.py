"""The ARM's masked BatchNorm (masked sums, no boolean index) equals BatchNorm run on the valid positions alone."""
import copy

import pytest
import torch
import torch.nn as nn

from hmerzoo.host_syncs import HostSyncCounter
from hmerzoo.layers.masked_batch_norm import batch_norm_valid


def indexed_reference(bn: nn.Module, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """torch's own BatchNorm on the gathered valid positions, padded positions passed through (the official way)."""
    channels_last = x.permute(0, 2, 3, 1)
    picked = channels_last[~pad]
    normed = bn(picked[:, :, None, None]).flatten(1) if isinstance(bn, nn.BatchNorm2d) else bn(picked)
    return channels_last.masked_scatter((~pad)[..., None], normed).permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind", [nn.BatchNorm1d, nn.BatchNorm2d])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_outputs_gradients_and_running_statistics_match_torch(kind, momentum):
    torch.manual_seed(0)
    bn = kind(6, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    reference = copy.deepcopy(bn)
    probe = torch.randn(3, 6, 5, 7)  # a fixed non-uniform upstream gradient
    for _ in range(3):  # several steps, so the running averages (and the cumulative average) are exercised
        x = torch.randn(3, 6, 5, 7, requires_grad=True)
        pad = torch.rand(3, 5, 7) < 0.3
        out = batch_norm_valid(bn, x, pad)
        want = indexed_reference(reference, x, pad)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[pad.unsqueeze(1).expand_as(out)], x[pad.unsqueeze(1).expand_as(x)])
        (grad,) = torch.autograd.grad((out * probe).sum(), x)
        (want_grad,) = torch.autograd.grad((want * probe).sum(), x)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == int(reference.num_batches_tracked)
    bn.eval()
    reference.eval()
    torch.testing.assert_close(batch_norm_valid(bn, x, pad), indexed_reference(reference, x, pad), rtol=1e-5, atol=1e-5)


def test_no_host_sync_in_training_or_eval():
    bn = nn.BatchNorm1d(4)
    x, pad = torch.randn(2, 4, 3, 5), torch.rand(2, 3, 5) < 0.5
    for training in (True, False):
        bn.train(training)
        with HostSyncCounter() as counter:
            batch_norm_valid(bn, x, pad)
        assert counter.total == 0, counter.summary()
