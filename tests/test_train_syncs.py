"""Host syncs of the training step (issue 14: target <= 1 per step) and the sync-free code that got it there."""
from __future__ import annotations

import pytest
import torch

from benchmark_modules import load_benchmark
from hmerzoo.batch import Batch
from hmerzoo.builder import build_component
from hmerzoo.heads.mutual_distillation import MutualDistillation
from hmerzoo.registry import OPTIMIZERS
from hmerzoo.sequence import IGNORE_INDEX, DecoderOutput, teacher_forcing_tensors

# Upper bounds per training step (benchmarks/syncs.py's tiny models, fp32, one step after a warm-up). The one read
# every recipe has is train_step's single .tolist() of the losses and gradient norm (the ARM's masked BatchNorm
# takes its statistics from masked sums, so CoMER and HMER-MTL add none).
TRAIN_STEP_SYNCS = {name: 1 for name in ("abm", "bttr", "can", "comer", "comer_count", "comer_implicit_skeleton",
                                         "comer_implicit_tree", "hmer_mtl", "ical", "mask_match", "posformer",
                                         "tamer")}


@pytest.mark.parametrize("name", sorted(TRAIN_STEP_SYNCS))
def test_training_step_syncs_stay_at_their_bound(name, sample_root):
    from hmerzoo.runtime import seed_everything
    from hmerzoo.training import train_step

    syncs = load_benchmark("syncs")
    seed_everything(0)
    model, recipe = syncs.tiny_model(name, sample_root)
    batch = syncs.small_batch(sample_root, recipe, 3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_component(OPTIMIZERS, recipe["optim"], "optim", {"params": params})
    grad_clip = (recipe.get("train") or {}).get("grad_clip")
    device = torch.device("cpu")
    model.train()
    train_step(model, batch, optimizer, params, device, "fp32", grad_clip=grad_clip, step=1)  # warm-up
    with syncs.Counter() as counter:
        train_step(model, batch, optimizer, params, device, "fp32", grad_clip=grad_clip, step=2)
    assert counter.total <= TRAIN_STEP_SYNCS[name], counter.summary()
    assert counter.count("blocking copy") == 0, counter.summary()
    assert [e.where.split(":")[0] for e in counter.events if e.kind == "read"] == ["hmerzoo/training/step.py"]


def _reference_teacher_forcing(tokens, direction, sos, eos, pad):
    """The per-element construction teacher_forcing_tensors had before, kept as the reference."""
    start, stop = (sos, eos) if direction == "l2r" else (eos, sos)
    length = max((len(t) for t in tokens), default=0) + 1
    inp = torch.full((len(tokens), length), pad, dtype=torch.long)
    out = torch.full((len(tokens), length), IGNORE_INDEX, dtype=torch.long)
    for i, seq in enumerate(tokens):
        seq = list(seq) if direction == "l2r" else list(seq)[::-1]
        inp[i, 0] = start
        inp[i, 1:len(seq) + 1] = torch.tensor(seq, dtype=torch.long)
        out[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        out[i, len(seq)] = stop
    return inp, out


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_teacher_forcing_tensors_match_the_reference_without_syncs(direction):
    from hmerzoo.host_syncs import HostSyncCounter

    tokens = [[5, 6, 7], [], [8], [9, 10, 11, 12, 13]]
    with HostSyncCounter() as counter:
        inp, out = teacher_forcing_tensors(tokens, direction, 1, 2, 0, device="cpu")
    assert counter.total == 0, counter.summary()
    ref_inp, ref_out = _reference_teacher_forcing(tokens, direction, 1, 2, 0)
    assert torch.equal(inp, ref_inp) and torch.equal(out, ref_out)
    assert inp.dtype == out.dtype == torch.long and inp.shape == (4, 6)
    if direction == "r2l":
        assert inp[3].tolist() == [2, 13, 12, 11, 10, 9] and out[1].tolist() == [1] + [IGNORE_INDEX] * 5
    empty_inp, empty_out = teacher_forcing_tensors([], direction, 1, 2, 0)
    assert empty_inp.shape == empty_out.shape == (0, 1)


@pytest.mark.parametrize("pairing", ["official", "target"])
def test_mutual_distillation_pairs_from_the_captions_equal_those_from_the_targets(pairing):
    """The training path reads the caption lengths from batch.tokens (no sync); the loss must equal the one
    computed from the targets on the device (batch None), pair for pair."""
    from hmerzoo.host_syncs import HostSyncCounter

    torch.manual_seed(0)
    tokens = [[4, 5, 6], [7], [], [8, 9]]
    steps, vocab = max(map(len, tokens)) + 1, 10
    _, l2r_targets = teacher_forcing_tensors(tokens, "l2r", 1, 2, 0)
    _, r2l_targets = teacher_forcing_tensors(tokens, "r2l", 1, 2, 2)
    logits = torch.randn(2 * len(tokens), steps, vocab)
    output = DecoderOutput(logits=logits, targets=torch.cat((l2r_targets, r2l_targets)),
                           directions=["l2r"] * len(tokens) + ["r2l"] * len(tokens))
    batch = Batch(torch.zeros(len(tokens), 1, 4, 4), torch.zeros(len(tokens), 4, 4, dtype=torch.bool), tokens)
    head = MutualDistillation(weight=0.5, temperature=4.0, pairing=pairing)
    with HostSyncCounter() as counter:
        from_captions = head(output, batch)
    assert counter.total == 0, counter.summary()
    from_targets = head(output, None)
    assert float(from_captions) > 0
    torch.testing.assert_close(from_captions, from_targets, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TRAIN_STEP_SYNCS))
def test_greedy_decoding_reads_the_device_once_per_step(name, sample_root):
    """Validation's greedy decoding: one packed read per step ("are all rows done?"); the difference between a
    12-step and a 6-step decode isolates the per-step cost from the one-off ones (encoder, init, final read)."""
    from hmerzoo.runtime import seed_everything

    syncs = load_benchmark("syncs")
    seed_everything(0)
    model, recipe = syncs.tiny_model(name, sample_root)
    batch = syncs.small_batch(sample_root, recipe, 3)
    model.eval()
    steps = syncs.counting_steps(model.decoder, [model.vocab.sos_id, model.vocab.eos_id])  # never stops early
    totals = {}
    for max_len in (6, 12):
        before = steps()
        with torch.no_grad(), syncs.Counter() as counter:
            model.greedy(batch.images, batch.image_mask, max_len=max_len)
        assert steps() - before == max_len
        totals[max_len] = counter.total
    assert totals[12] - totals[6] == 6, totals
