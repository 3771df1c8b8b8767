"""Beam search reads the device once per decoder step (issue 14), for every shipped recipe's search mode."""
from __future__ import annotations

import pytest
import torch

from benchmark_modules import load_benchmark

# every shipped recipe that decodes (the Mask & Match pre-training stages have no decoder)
RECIPES = ("abm", "bttr", "can", "comer", "comer_count", "comer_implicit_skeleton", "comer_implicit_tree", "hmer_mtl",
           "ical", "mask_match", "posformer", "tamer")


@pytest.mark.parametrize("name", RECIPES)
def test_beam_search_reads_the_device_once_per_step(name, sample_root):
    """A search of 12 steps against one of 6 (the ends pushed down, so both run to max_len): the extra steps
    cost exactly one read each, that read is the search loop's packed one, and no step copies or waits otherwise."""
    from hmerzoo.runtime import seed_everything

    syncs = load_benchmark("syncs")
    seed_everything(0)
    model, recipe = syncs.tiny_model(name, sample_root)
    batch = syncs.small_batch(sample_root, recipe, 3)
    model.eval()
    steps = syncs.counting_steps(model.decoder, [model.vocab.sos_id, model.vocab.eos_id])
    found = syncs.beam_counts(model, recipe, batch, steps, 3, (6, 12))
    short, long = found["counters"]
    extra_steps = found["steps"][1] - found["steps"][0]
    assert extra_steps == 6, found["steps"]  # a bidirectional mode steps both directions in one batch
    assert long.total - short.total == extra_steps, (short.summary(), long.summary())
    loop_reads = [c.count("read") for c in (short, long)]
    per_site = [sum(n for where, kind, n in c.by_site() if where.startswith("hmerzoo/decoding/beam.py"))
                for c in (short, long)]
    assert per_site[1] - per_site[0] == extra_steps and loop_reads[1] - loop_reads[0] == extra_steps
    assert long.count("data-dependent") == long.count("bool-mask index") == 0, long.summary()


def test_beam_search_results_do_not_depend_on_the_host_bookkeeping_hint(sample_root):
    """The transformer decoder regroups rows from the search's host list (takes_memory_rows); without it, from
    the device (torch.unique): both must give the same hypotheses and scores."""
    from hmerzoo.decoding import beam_search
    from hmerzoo.runtime import seed_everything

    syncs = load_benchmark("syncs")
    seed_everything(0)
    model, recipe = syncs.tiny_model("bttr", sample_root)
    batch = syncs.small_batch(sample_root, recipe, 3)
    model.eval()
    vocab = model.vocab
    step = model.decoder.step

    def eager_to_stop(state, last):  # an untrained model rarely stops: favour the end token so beams finish
        logits, state = step(state, last)
        return logits.index_add(1, torch.tensor([vocab.eos_id, vocab.sos_id]), torch.full((len(logits), 2), 2.5)), state

    model.decoder.step = eager_to_stop
    with torch.no_grad():
        memory, mask = model.encode(batch.images, batch.image_mask)
        args = dict(sos_id=vocab.sos_id, eos_id=vocab.eos_id, beam_size=4, max_len=10)
        hinted = beam_search(model.decoder, memory, mask, ["l2r", "r2l", "l2r"], **args)
        model.decoder.takes_memory_rows = False  # instance attribute: the device path
        try:
            plain = beam_search(model.decoder, memory, mask, ["l2r", "r2l", "l2r"], **args)
        finally:
            del model.decoder.takes_memory_rows
    assert [[(h.tokens, h.score, h.finished) for h in g] for g in hinted] == \
        [[(h.tokens, h.score, h.finished) for h in g] for g in plain]
    assert sum(len(g) for g in hinted) > 3 and all(h.finished for g in hinted for h in g)
    assert len({len(h.tokens) for g in hinted for h in g}) > 2  # beams ended at different steps
