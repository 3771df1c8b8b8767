"""ICAL (qingzhenduyu/ICAL): LitICAL checkpoints, keys 'ical_model.encoder.*' and 'ical_model.decoder.*'.

ICAL is CoMER (same encoder, decoder and key names under the attribute ``ical_model``) whose decoder adds the
implicit-character branch: ``decoder.SCCM.te.layers.0`` (a torch TransformerEncoderLayer), ``decoder.imp_proj.1``,
``decoder.fusion.w_att`` and ``decoder.fusion_proj.1``; its explicit output layer is ``decoder.exp_proj``. In hmerzoo
the branch is the ``implicit_characters`` head ``heads.implicit`` and ``exp_proj`` is the decoder's ``proj``.

Its vocabulary is ``<pad> <sos> <eos> <space>`` then ``dictionary.txt``; the CROHME checkpoints' dictionary is the one
shipped in qingzhenduyu/TAMER ``lightning_logs/version_0/dictionary.txt`` (not CoMER's order).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..registry import CONVERTERS
from ..vocab import Vocabulary
from .comer import COMER_OPTIM, COMER_PREFIXES, comer_model_section
from .core import Converted, Converter, check_vocab_size, complete_recipe, has_prefix, rename_keys, require, strip_prefix

PREFIX = "ical_model."  # LitICAL keeps the model in the attribute 'ical_model'
SCCM = "decoder.SCCM.te.layers.0."
HEAD = "heads.implicit."
ICAL_PREFIXES = [
    (SCCM, HEAD + "sccm."),
    ("decoder.imp_proj.1.", HEAD + "implicit_proj."),
    ("decoder.fusion.w_att.", HEAD + "gate."),
    ("decoder.fusion_proj.1.", HEAD + "fusion_proj."),
    ("decoder.exp_proj.", "decoder.proj."),
] + [(old, new) for old, new in COMER_PREFIXES if old != "decoder.proj."]
ICAL_SPECIALS = ["<pad>", "<sos>", "<eos>", "<space>"]  # ical/datamodule/vocab.py: <space> = 3
ICAL_SCCM_HEADS = 8  # hard-coded in the official SCCM (nn.TransformerEncoderLayer(d_model, nhead=8, ...))


def inner_ical(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_prefix(official_state, PREFIX, ("encoder.", "decoder."))


def convert_state_dict_ical(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ICAL state dict (with or without ``ical_model.``) -> hmerzoo state dict."""
    state = inner_ical(official_state)
    require(state, SCCM + "self_attn.in_proj_weight", "ICAL")
    return rename_keys(state, ICAL_PREFIXES, "ICAL")


def convert_ical(official_state: dict[str, torch.Tensor], dictionary: Path, hparams: dict | None = None) -> Converted:
    hparams = hparams or {}
    vocab = Vocabulary.from_dictionary(str(dictionary), ICAL_SPECIALS)
    state = convert_state_dict_ical(official_state)
    check_vocab_size(vocab, int(require(state, "decoder.proj.weight", "ICAL").shape[0]), dictionary, "ICAL")
    inner = inner_ical(official_state)
    model_section = comer_model_section(inner, hparams, model="ICAL")
    model_section["heads"] = {"implicit": {
        "type": "implicit_characters", "fuse": True, "nhead": ICAL_SCCM_HEADS,
        "dim_feedforward": int(inner[SCCM + "linear1.weight"].shape[0]),
        "dropout": float(hparams.get("dropout", 0.3)),
        "dynamic_weight": bool(hparams.get("dynamic_weight", True))}}
    recipe = complete_recipe("ical", model_section,
                             fallback={"name": "ical", "vocab": {"specials": list(ICAL_SPECIALS)},
                                       "optim": dict(COMER_OPTIM), "decode": {"mode": "comer"}})
    return Converted(recipe=recipe, vocab=vocab, state=state)


@CONVERTERS.register("ical")
class ICALConverter(Converter):
    """ICAL (qingzhenduyu/ICAL) Lightning checkpoints or state dicts: keys 'ical_model.*' with 'decoder.SCCM.*'."""

    family = "ICAL"
    keys = "keys 'ical_model.encoder.*', 'ical_model.decoder.*' with 'ical_model.decoder.SCCM.*'"

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        return has_prefix(state, PREFIX + "decoder.SCCM.") or has_prefix(state, "decoder.SCCM.")

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        return convert_ical(state, dictionary, hparams)
