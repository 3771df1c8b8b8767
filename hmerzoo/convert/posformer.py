"""PosFormer (SJTU-DeepVisionLab/PosFormer): LitPosFormer checkpoints, keys 'model.encoder.*', 'model.decoder.*'
and 'model.posdecoder.*'.

The encoder and the word decoder are CoMER's (same key names under the attribute ``model``); the main decoder's
coverage leaves out the steps reading ``{``, ``^``, ``_`` (hmerzoo's ``coverage_skip``, no parameters). The position
decoder ``posdecoder`` (``pos_embed``, ``pos_enc``, ``norm``, ``model.layers``, ``model.arm``, ``layernum_proj``,
``pos_proj``) becomes hmerzoo's ``position_forest`` head ``heads.position``. Its vocabulary is ``<pad> <sos> <eos>``
then ``Pos_Former/datamodule/dictionary.txt``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..registry import CONVERTERS
from ..vocab import Vocabulary
from .comer import COMER_PREFIXES, COMER_OPTIM, comer_model_section
from .core import (Converted, Converter, check_vocab_size, complete_recipe, has_prefix, rename_keys, require,
                   strip_prefix)

PREFIX = "model."  # LitPosFormer keeps the model in the attribute 'model'
POS = "posdecoder."
HEAD = "heads.position.decoder."
POSFORMER_PREFIXES = [
    (f"{POS}{old}", f"{HEAD}{new}") for old, new in (
        ("pos_embed.", "code_embed."), ("pos_enc.", "pos_enc."), ("norm.", "input_norm."),
        ("model.layers.", "layers."), ("model.arm.conv.", "arm.conv."), ("model.arm.proj.", "arm.proj."),
        ("model.arm.post_norm.bn.", "arm.norm.bn."), ("layernum_proj.", "level_proj."), ("pos_proj.", "relation_proj."))
] + COMER_PREFIXES
POSFORMER_SPECIALS = ["<pad>", "<sos>", "<eos>"]
COVERAGE_SKIP = ["{", "^", "_"]  # official arm.py: ids 110, 82, 83 of its dictionary
LOSS_SCALE = 1 / 1.5  # official total: (CE + 0.25 CE_level + 0.25 CE_pos) / 1.5


def inner_posformer(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_prefix(official_state, PREFIX, ("encoder.", "decoder.", POS))


def convert_state_dict_posformer(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official PosFormer state dict (with or without ``model.``) -> hmerzoo state dict."""
    state = inner_posformer(official_state)
    require(state, POS + "pos_embed.0.weight", "PosFormer")
    return rename_keys(state, POSFORMER_PREFIXES, "PosFormer")


def convert_posformer(official_state: dict[str, torch.Tensor], dictionary: Path,
                      hparams: dict | None = None) -> Converted:
    hparams = hparams or {}
    vocab = Vocabulary.from_dictionary(str(dictionary), POSFORMER_SPECIALS)
    state = convert_state_dict_posformer(official_state)
    check_vocab_size(vocab, int(require(state, "decoder.proj.weight", "PosFormer").shape[0]), dictionary, "PosFormer")
    inner = inner_posformer(official_state)
    model_section = comer_model_section(inner, hparams, model="PosFormer")
    model_section["decoder"]["coverage_skip"] = list(COVERAGE_SKIP)
    model_section["heads"] = {"position": {
        "type": "position_forest", "level_weight": 0.25, "relation_weight": 0.25, "scale": LOSS_SCALE,
        "hidden": int(require(inner, POS + "layernum_proj.0.weight", "PosFormer").shape[0]),
        "dropout": float(hparams.get("dropout", 0.3))}}
    recipe = complete_recipe("posformer", model_section,
                             fallback={"name": "posformer", "vocab": {"specials": list(POSFORMER_SPECIALS)},
                                       "optim": dict(COMER_OPTIM),
                                       "loss": {"type": "cross_entropy", "weight": LOSS_SCALE}})
    return Converted(recipe=recipe, vocab=vocab, state=state)


@CONVERTERS.register("posformer")
class PosFormerConverter(Converter):
    """PosFormer (SJTU-DeepVisionLab/PosFormer) Lightning checkpoints or state dicts: keys 'model.encoder.*',
    'model.decoder.*' and 'model.posdecoder.*'."""

    family = "PosFormer"
    keys = "keys 'model.encoder.*', 'model.decoder.*' and 'model.posdecoder.*'"

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        return has_prefix(state, PREFIX + POS) or has_prefix(state, POS)

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        return convert_posformer(state, dictionary, hparams)
