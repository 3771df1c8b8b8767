"""HMER-MTL (trungtndev/HMER-MTL): LitMTL checkpoints, CoMER's keys ('comer_model.*') plus the second output layer
'comer_model.decoder.proj_imp.*', which becomes hmerzoo's ``structure_skeleton`` head ``heads.skeleton``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..registry import CONVERTERS
from ..vocab import Vocabulary
from .comer import (COMER_OPTIM, COMER_PREFIXES, SKELETON_KEY, comer_model_section, has_skeleton_head, inner_comer,
                    is_comer_family)
from .core import Converted, Converter, check_vocab_size, complete_recipe, rename_keys, require

HMER_MTL_PREFIXES = [(SKELETON_KEY, "heads.skeleton.linear.")] + COMER_PREFIXES
HMER_MTL_SPECIALS = ["<pad>", "<sos>", "<eos>", "<space>"]  # mtl/datamodule/vocab.py: <space> = 3


def convert_state_dict_hmer_mtl(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official HMER-MTL state dict -> hmerzoo state dict (``proj_imp`` -> ``heads.skeleton.linear``)."""
    state = inner_comer(official_state)
    require(state, SKELETON_KEY + "weight", "HMER-MTL")
    return rename_keys(state, HMER_MTL_PREFIXES, "HMER-MTL")


def convert_hmer_mtl(official_state: dict[str, torch.Tensor], dictionary: Path,
                     hparams: dict | None = None) -> Converted:
    # HMER-MTL's vocabulary adds <space>=3 (mtl/datamodule/vocab.py), so every dictionary id is CoMER's + 1
    hparams = hparams or {}
    vocab = Vocabulary.from_dictionary(str(dictionary), HMER_MTL_SPECIALS)
    state = convert_state_dict_hmer_mtl(official_state)
    check_vocab_size(vocab, int(require(state, "decoder.proj.weight", "HMER-MTL").shape[0]), dictionary, "HMER-MTL")
    model_section = comer_model_section(official_state, hparams, model="HMER-MTL")
    # lambda_1 weighs the main cross-entropy, lambda_2 the skeleton head (official config: 1 and 1)
    model_section["heads"] = {"skeleton": {"type": "structure_skeleton",
                                           "weight": float(hparams.get("lambda_2", 1.0))}}
    loss = {"type": "cross_entropy", "weight": float(hparams.get("lambda_1", 1.0))}
    recipe = complete_recipe("hmer_mtl", model_section,
                             fallback={"name": "hmer_mtl", "vocab": {"specials": list(HMER_MTL_SPECIALS)},
                                       "loss": loss, "optim": dict(COMER_OPTIM)})
    recipe["loss"] = loss
    return Converted(recipe=recipe, vocab=vocab, state=state)


@CONVERTERS.register("hmer_mtl")
class HMERMTLConverter(Converter):
    """HMER-MTL (trungtndev/HMER-MTL) Lightning checkpoints or state dicts: CoMER's keys + 'decoder.proj_imp'."""

    family = "HMER-MTL"
    keys = "keys 'comer_model.encoder.*', 'comer_model.decoder.*' with 'comer_model.decoder.proj_imp.*'"

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        return is_comer_family(state) and has_skeleton_head(state)

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        return convert_hmer_mtl(state, dictionary, hparams)
