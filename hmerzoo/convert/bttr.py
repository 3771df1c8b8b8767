"""BTTR (Green-Wood/BTTR): LitBTTR checkpoints, keys 'bttr.encoder.*' and 'bttr.decoder.*'.

The renames mirror hmerzoo's parameter names in ``encoders/densenet.py``, ``necks`` (``bttr_projection``) and
``decoders/bttr.py``: renaming a parameter there breaks ``tests/test_convert.py`` and the BTTR parity test.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..registry import CONVERTERS
from ..vocab import Vocabulary
from .core import (Converted, Converter, check_vocab_size, complete_recipe, count_indexed, densenet_section,
                   has_prefix, rename_keys, require, strip_prefix)

PREFIX = "bttr."  # LitBTTR keeps the model in its attribute 'bttr'
BTTR_PREFIXES = [
    ("encoder.model.", "encoder."),
    ("encoder.feature_proj.0.", "neck.feature_proj."),
    ("encoder.norm.", "neck.norm."),
    ("decoder.word_embed.0.", "decoder.word_embed."),
    ("decoder.word_embed.1.", "decoder.embed_norm."),
    ("decoder.pos_enc.", "decoder.pos_enc."),
    ("decoder.model.layers.", "decoder.layers."),
    ("decoder.proj.", "decoder.proj."),
]
BTTR_SPECIALS = ["<pad>", "<sos>", "<eos>"]
BTTR_OPTIM = {"type": "adadelta", "lr": 1.0, "eps": 1.0e-6, "weight_decay": 1.0e-4}


def _inner(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inner BTTR module's state dict (a LitBTTR one without its prefix, or one saved without it)."""
    return strip_prefix(official_state, PREFIX, ("encoder.", "decoder."))


def convert_state_dict_bttr(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official BTTR state dict (with or without the ``bttr.`` prefix) -> hmerzoo state dict (same tensors)."""
    return rename_keys(_inner(official_state), BTTR_PREFIXES, "BTTR")


def bttr_model_section(official_state: dict[str, torch.Tensor], hparams: dict | None = None) -> dict:
    """hmerzoo ``model:`` section of a BTTR checkpoint, sizes read off the tensors (nhead/dropout from the
    checkpoint's hyper-parameters when it has them, else the official config's 8 / 0.3)."""
    hparams = hparams or {}
    state = _inner(official_state)
    encoder = densenet_section(state, "encoder.model.", "BTTR")
    d_model = int(require(state, "encoder.feature_proj.0.weight", "BTTR").shape[0])
    decoder_layers = count_indexed(state, "decoder.model.layers.")
    if not decoder_layers:
        raise CheckpointError("the checkpoint has no decoder layers; it is not a BTTR checkpoint")
    return {
        "encoder": encoder,
        "neck": {"type": "bttr_projection", "d_model": d_model},
        "decoder": {"type": "bttr", "d_model": d_model, "nhead": int(hparams.get("nhead", 8)),
                    "num_layers": decoder_layers,
                    "dim_feedforward": int(require(state, "decoder.model.layers.0.linear1.weight", "BTTR").shape[0]),
                    "dropout": float(hparams.get("dropout", 0.3)),
                    "max_positions": int(require(state, "decoder.pos_enc.pe", "BTTR").shape[0])},
    }


def convert_bttr(official_state: dict[str, torch.Tensor], dictionary: Path, hparams: dict | None = None) -> Converted:
    # BTTR's vocabulary: <pad>=0, <sos>=1, <eos>=2, then dictionary.txt in file order (bttr/datamodule/vocab.py)
    vocab = Vocabulary.from_dictionary(str(dictionary), BTTR_SPECIALS)
    state = convert_state_dict_bttr(official_state)
    check_vocab_size(vocab, int(require(state, "decoder.proj.weight", "BTTR").shape[0]), dictionary, "BTTR")
    # the weights define the architecture, so the model section always comes from the checkpoint
    recipe = complete_recipe("bttr", bttr_model_section(official_state, hparams),
                             fallback={"name": "bttr", "optim": dict(BTTR_OPTIM)})
    return Converted(recipe=recipe, vocab=vocab, state=state)


@CONVERTERS.register("bttr")
class BTTRConverter(Converter):
    """BTTR (Green-Wood/BTTR) Lightning checkpoints or state dicts: keys 'bttr.encoder.*', 'bttr.decoder.*'."""

    family = "BTTR"
    keys = "keys 'bttr.encoder.*', 'bttr.decoder.*'"

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        # the prefix, or the inner module's projection: BTTR's is a Sequential ('.0.'), CoMER's a Linear
        return has_prefix(state, PREFIX) or "encoder.feature_proj.0.weight" in state

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        return convert_bttr(state, dictionary, hparams)
