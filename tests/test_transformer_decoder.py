"""The shared transformer decoder base: per-image keys/values shared by hypothesis rows, the layer's cross-attention
hook, and the capabilities decoders declare."""
from __future__ import annotations

import pytest
import torch

from hmerzoo.decoders.abm import ABMDecoder
from hmerzoo.decoders.base import DecoderCapabilities
from hmerzoo.decoders.bttr import BTTRDecoder
from hmerzoo.decoders.comer import CoMERDecoder
from hmerzoo.layers.transformer import TransformerDecoderLayer
from hmerzoo.sequence import teacher_forcing_tensors

TINY = dict(in_channels=32, vocab_size=12, pad_id=0, sos_id=1, eos_id=2, d_model=32, nhead=4, num_layers=3,
            dim_feedforward=64)


def tiny(kind: str):
    torch.manual_seed(0)
    decoder = BTTRDecoder(**TINY) if kind == "bttr" else CoMERDecoder(**TINY, dc=8)
    for module in decoder.modules():  # non-trivial BatchNorm statistics (CoMER's ARM)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return decoder.eval()


def memory() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    mem = torch.randn(2, 3, 5, 32)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 3:] = True  # image 1 is narrower
    return mem, mask


@pytest.mark.parametrize("kind", ["bttr", "comer"])
def test_rows_share_their_image_keys_values(kind: str) -> None:
    """Several hypotheses per image, unevenly spread, step like their teacher-forced rows; reordering within the
    same images moves no key/value tensor (the very same tensors stay in the state)."""
    decoder = tiny(kind)
    mem, mask = memory()
    tokens = [[3, 4, 5, 6], [7, 8, 9, 10]]
    rows = torch.tensor([0, 0, 1, 1, 1, 0])
    inputs, _ = teacher_forcing_tensors(tokens, "l2r", 1, 2, 0)
    with torch.no_grad():
        teacher, _ = decoder.teacher_forced(mem, mask, tokens, "l2r")
        state = decoder.init_state(mem, mask, "l2r")
        state = decoder.reorder_state(state, rows)
        keys = state.cross.keys
        outputs = []
        for t in range(inputs.shape[1]):
            logits, state = decoder.step(state, inputs[rows, t])
            outputs.append(logits)
            same = torch.arange(rows.numel())
            state = decoder.reorder_state(state, same)
            assert all(a is b for a, b in zip(state.cross.keys, keys))
    assert state.cross.keys[0].shape[0] == 2  # one entry per image, not per row
    torch.testing.assert_close(torch.stack(outputs, dim=1), teacher[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bttr", "comer"])
def test_log_likelihood_reads_the_given_image(kind: str) -> None:
    decoder = tiny(kind)
    mem, mask = memory()
    seqs, index = [[3, 4], [5], [6, 7, 8]], [1, 0, 1]
    with torch.no_grad():
        grouped = decoder.log_likelihood(mem, mask, seqs, memory_index=torch.tensor(index))
        alone = torch.stack([decoder.log_likelihood(mem[i:i + 1], mask[i:i + 1], [s])[0]
                             for i, s in zip(index, seqs)])
    torch.testing.assert_close(grouped, alone, atol=1e-5, rtol=1e-5)
    assert grouped.max() < 0


def test_layer_hook_replaces_the_cross_attention() -> None:
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(32, 4, 64, 0.0).eval()
    x, mem = torch.randn(2, 3, 32), torch.randn(2, 7, 32)
    k, v = layer.multihead_attn.project_key_value(mem)
    plain, _, _, extra = layer(x, k, v, None, None)
    assert extra is None

    def same(attn, q_in, keys, values, mask, layout):
        return attn.attend(attn.project_query(q_in), keys, values, mask), "seen"

    def zero(attn, q_in, keys, values, mask, layout):
        return torch.zeros_like(q_in), None

    hooked, _, _, extra = layer(x, k, v, None, None, cross_attention=same)
    torch.testing.assert_close(hooked, plain)
    assert extra == "seen"
    assert not torch.allclose(layer(x, k, v, None, None, cross_attention=zero)[0], plain)


def test_capabilities_are_declared() -> None:
    bttr, comer = tiny("bttr"), tiny("comer")
    assert bttr.capabilities == DecoderCapabilities(directions=("l2r", "r2l"), supports_mixed_directions=True,
                                                    memory_padding_invariant=True, shares_image_memory=True)
    assert comer.capabilities.supports_mixed_directions and comer.capabilities.shares_image_memory
    # the faithful CBAM pools over padding: not invariant; its mask-aware variant is
    assert not CoMERDecoder(**TINY, cbam=True).capabilities.memory_padding_invariant
    assert CoMERDecoder(**TINY, cbam=True, cbam_mask_aware=True).capabilities.memory_padding_invariant
    abm = ABMDecoder(in_channels=8, vocab_size=12, sos_id=1, eos_id=2, hidden_size=16, embed_dim=16,
                     attention_dim=16, coverage_channels=8, directions=["l2r"])
    assert abm.capabilities == DecoderCapabilities(directions=("l2r",), supports_mixed_directions=False,
                                                   memory_padding_invariant=False, shares_image_memory=True)
