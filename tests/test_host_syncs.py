"""The host-sync counter: each kind of sync is seen, and sync-free code counts zero."""
import torch

from hmerzoo.host_syncs import HostSyncCounter


def test_each_kind_is_counted_with_its_call_site():
    x = torch.randn(6)
    with HostSyncCounter(frames_under="tests") as syncs:
        x.sum().item()                      # read
        bool(x[0] > 0)                      # read (__bool__)
        x.tolist()                          # read
        x[x > 0]                            # bool-mask index
        torch.nonzero(x > 0)                # data-dependent size
        torch.unique(x)                     # data-dependent size
        x.to("cpu")                         # blocking copy (names a device)
        torch.tensor([1, 2], device="cpu")  # blocking copy from Python data
    assert syncs.by_kind() == {"read": 3, "bool-mask index": 1, "data-dependent": 2, "blocking copy": 2}
    assert all(e.where.startswith("tests/test_host_syncs.py:") for e in syncs.events), syncs.events
    assert "8 host syncs" in syncs.summary()


def test_sync_free_code_counts_nothing():
    x = torch.randn(4, 5)
    with HostSyncCounter() as syncs:
        y = torch.where(x > 0, x, torch.zeros_like(x)).softmax(-1)
        y.to(torch.float64)                 # a dtype change is no device copy
        y.to("cpu", non_blocking=True)
        x[:, 1:3] = 0                       # slicing is not mask indexing
        x.index_select(0, torch.tensor([0, 2]))
        x.repeat_interleave(2, dim=0)       # an int count: known output size
    assert syncs.total == 0, syncs.summary()
