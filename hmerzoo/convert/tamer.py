"""TAMER (qingzhenduyu/TAMER): LitTAMER checkpoints, keys 'tamer_model.encoder.*' and 'tamer_model.decoder.*'.

TAMER is CoMER (same encoder, decoder and key names under the attribute ``tamer_model``) plus the structure module
``decoder.struct_sim.{l2r,r2l}_struct_sim`` (a torch TransformerEncoderLayer ``trm.layers.0``, ``to_q``, ``to_k``,
``to_sim.1``), which becomes hmerzoo's ``tree_structure`` head ``heads.structure``. Its vocabulary is
``<pad> <sos> <eos>`` then ``dictionary.txt`` (the CROHME one ships in ``lightning_logs/version_0/``; not CoMER's order).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..registry import CONVERTERS
from ..vocab import Vocabulary
from .comer import COMER_PREFIXES, comer_model_section
from .core import Converted, Converter, check_vocab_size, complete_recipe, has_prefix, rename_keys, require, strip_prefix

PREFIX = "tamer_model."  # LitTAMER keeps the model in the attribute 'tamer_model'
STRUCT = "decoder.struct_sim."
HEAD = "heads.structure."
TAMER_PREFIXES = [
    (f"{STRUCT}{d}_struct_sim.{old}", f"{HEAD}{d}.{new}")
    for d in ("l2r", "r2l")
    for old, new in (("trm.layers.0.", "layer."), ("to_q.", "to_q."), ("to_k.", "to_k."), ("to_sim.1.", "to_sim."))
] + COMER_PREFIXES
TAMER_SPECIALS = ["<pad>", "<sos>", "<eos>"]
TAMER_OPTIM = {"type": "adadelta", "lr": 1.0, "eps": 1.0e-6, "weight_decay": 1.0e-4}
TAMER_STRUCT_HEADS = 8  # hard-coded in the official StructSimOneDir (nn.TransformerEncoderLayer(d_model, nhead=8))


def inner_tamer(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_prefix(official_state, PREFIX, ("encoder.", "decoder."))


def convert_state_dict_tamer(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official TAMER state dict (with or without ``tamer_model.``) -> hmerzoo state dict."""
    state = inner_tamer(official_state)
    require(state, STRUCT + "l2r_struct_sim.to_q.weight", "TAMER")
    return rename_keys(state, TAMER_PREFIXES, "TAMER")


def convert_tamer(official_state: dict[str, torch.Tensor], dictionary: Path,
                  hparams: dict | None = None) -> Converted:
    hparams = hparams or {}
    vocab = Vocabulary.from_dictionary(str(dictionary), TAMER_SPECIALS)
    state = convert_state_dict_tamer(official_state)
    check_vocab_size(vocab, int(require(state, "decoder.proj.weight", "TAMER").shape[0]), dictionary, "TAMER")
    inner = inner_tamer(official_state)
    model_section = comer_model_section(inner, hparams, model="TAMER")
    model_section["heads"] = {"structure": {
        "type": "tree_structure", "weight": 1.0, "rescore": True, "nhead": TAMER_STRUCT_HEADS,
        "dim_feedforward": int(inner[STRUCT + "l2r_struct_sim.trm.layers.0.linear1.weight"].shape[0]),
        "dropout": float(hparams.get("dropout", 0.3))}}
    recipe = complete_recipe("tamer", model_section,
                             fallback={"name": "tamer", "vocab": {"specials": list(TAMER_SPECIALS)},
                                       "optim": dict(TAMER_OPTIM), "decode": {"mode": "tamer"}})
    return Converted(recipe=recipe, vocab=vocab, state=state)


@CONVERTERS.register("tamer")
class TAMERConverter(Converter):
    """TAMER (qingzhenduyu/TAMER) Lightning checkpoints or state dicts: keys 'tamer_model.*' with
    'decoder.struct_sim.*'."""

    family = "TAMER"
    keys = "keys 'tamer_model.encoder.*', 'tamer_model.decoder.*' with 'tamer_model.decoder.struct_sim.*'"

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        return has_prefix(state, PREFIX + STRUCT) or has_prefix(state, STRUCT)

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        return convert_tamer(state, dictionary, hparams)
