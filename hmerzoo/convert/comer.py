"""CoMER (Green-Wood/CoMER): LitCoMER checkpoints, keys 'comer_model.encoder.*' and 'comer_model.decoder.*'.

HMER-MTL extends CoMER and keeps the same attribute and key names, so its converter (``hmer_mtl.py``) builds on the
renames and the architecture reading here. The renames mirror hmerzoo's parameter names in ``encoders/densenet.py``,
``necks`` (``comer_projection``) and ``decoders/comer.py`` (the attention refinement module and its CBAM).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..registry import CONVERTERS
from ..vocab import Vocabulary
from .core import (Converted, Converter, check_vocab_size, complete_recipe, count_indexed, densenet_section,
                   has_prefix, rename_keys, require, strip_prefix)

PREFIX = "comer_model."  # LitCoMER (and HMER-MTL's LitMTL) keep the model in the attribute 'comer_model'
COMER_PREFIXES = [
    ("encoder.model.", "encoder."),
    ("encoder.feature_proj.", "neck.feature_proj."),
    ("encoder.norm.", "neck.norm."),
    ("decoder.word_embed.0.", "decoder.word_embed."),
    ("decoder.word_embed.1.", "decoder.embed_norm."),
    ("decoder.pos_enc.", "decoder.pos_enc."),
    ("decoder.norm.", "decoder.input_norm."),
    ("decoder.model.layers.", "decoder.layers."),
    ("decoder.model.arm.conv.", "decoder.arm.conv."),
    ("decoder.model.arm.proj.", "decoder.arm.proj."),
    ("decoder.model.arm.post_norm.bn.", "decoder.arm.norm.bn."),
    ("decoder.model.arm.cbam.channel_attention.excitation.0.", "decoder.arm.cbam.channel_attention.reduce."),
    ("decoder.model.arm.cbam.channel_attention.excitation.2.", "decoder.arm.cbam.channel_attention.expand."),
    ("decoder.model.arm.cbam.spatial_attention.", "decoder.arm.cbam.spatial_attention."),
    ("decoder.proj.", "decoder.proj."),
]
COMER_OPTIM = {"type": "sgd", "lr": 0.08, "momentum": 0.9, "weight_decay": 1.0e-4}
COMER_SPECIALS = ["<pad>", "<sos>", "<eos>"]
# HMER-MTL's second output layer; a CoMER checkpoint has none
SKELETON_KEY = "decoder.proj_imp."


def inner_comer(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inner model's state dict (a Lightning one without its prefix, or one saved without it)."""
    return strip_prefix(official_state, PREFIX, ("encoder.", "decoder."))


def is_comer_family(state: dict[str, torch.Tensor]) -> bool:
    """CoMER or HMER-MTL keys: the prefix, or the inner model's projection (a Linear; BTTR's is a Sequential)."""
    return has_prefix(state, PREFIX) or "encoder.feature_proj.weight" in state


def has_skeleton_head(state: dict[str, torch.Tensor]) -> bool:
    return has_prefix(state, PREFIX + SKELETON_KEY) or has_prefix(state, SKELETON_KEY)


def convert_state_dict_comer(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official CoMER state dict (with or without the ``comer_model.`` prefix) -> hmerzoo state dict."""
    return rename_keys(inner_comer(official_state), COMER_PREFIXES, "CoMER")


def comer_model_section(official_state: dict[str, torch.Tensor], hparams: dict | None = None,
                        model: str = "CoMER") -> dict:
    """hmerzoo ``model:`` section of a CoMER-family checkpoint, read off the tensor shapes; dropout (and the
    coverage switches, when the shapes cannot tell them apart) from the hyper-parameters, else the official
    config's values."""
    hparams = hparams or {}
    state = inner_comer(official_state)
    encoder = densenet_section(state, "encoder.model.", model)
    d_model = int(require(state, "encoder.feature_proj.weight", model).shape[0])
    decoder_layers = count_indexed(state, "decoder.model.layers.")
    if not decoder_layers:
        raise CheckpointError(f"the checkpoint has no decoder layers; it is not a {model} checkpoint")
    decoder: dict = {"type": "comer", "d_model": d_model, "nhead": int(hparams.get("nhead", 8)),
                     "num_layers": decoder_layers,
                     "dim_feedforward": int(require(state, "decoder.model.layers.0.linear1.weight", model).shape[0]),
                     "dropout": float(hparams.get("dropout", 0.3))}
    if "decoder.model.arm.conv.weight" in state:
        decoder.update(_refinement_options(state, hparams, model))
    else:
        decoder["cross_coverage"], decoder["self_coverage"] = False, False
    decoder["max_positions"] = int(require(state, "decoder.pos_enc.pe", model).shape[0])
    return {"encoder": encoder, "neck": {"type": "comer_projection", "d_model": d_model}, "decoder": decoder}


def _refinement_options(state: dict[str, torch.Tensor], hparams: dict, model: str) -> dict:
    """The decoder options of the attention refinement module (ARM) and its CBAM, read off their tensors."""
    arm_conv = state["decoder.model.arm.conv.weight"]
    nhead = int(require(state, "decoder.model.arm.proj.weight", model).shape[0])  # one output map per head
    options: dict = {"nhead": nhead, "dc": int(arm_conv.shape[0])}
    if int(arm_conv.shape[1]) == 2 * nhead:
        cross, own = True, True
    elif "cross_coverage" in hparams and "self_coverage" in hparams:
        cross, own = bool(hparams["cross_coverage"]), bool(hparams["self_coverage"])
        if cross == own:
            raise CheckpointError(f"the checkpoint's ARM takes {arm_conv.shape[1]} channels (one coverage), but "
                                  f"its hyper-parameters say cross_coverage={cross}, self_coverage={own}")
    else:
        raise CheckpointError("the checkpoint's ARM uses one kind of coverage, and nothing says which (its "
                              "hyper-parameters have no cross_coverage/self_coverage); convert a Lightning "
                              "checkpoint that has them")
    options["cross_coverage"], options["self_coverage"] = cross, own
    spatial = "decoder.model.arm.cbam.spatial_attention.conv.weight"
    if spatial in state:
        reduce = require(state, "decoder.model.arm.cbam.channel_attention.excitation.0.weight", model)
        options["cbam"] = True
        options["cbam_ratio"] = int(reduce.shape[1]) // int(reduce.shape[0])
        options["cbam_kernel"] = int(state[spatial].shape[-1])
        options["cbam_mask_aware"] = False  # the official pooling (padding included); true is our option
    return options


def convert_comer(official_state: dict[str, torch.Tensor], dictionary: Path, hparams: dict | None = None) -> Converted:
    # CoMER's vocabulary: <pad>=0, <sos>=1, <eos>=2, then dictionary.txt in file order (comer/datamodule/vocab.py)
    vocab = Vocabulary.from_dictionary(str(dictionary), COMER_SPECIALS)
    state = convert_state_dict_comer(official_state)
    check_vocab_size(vocab, int(require(state, "decoder.proj.weight", "CoMER").shape[0]), dictionary, "CoMER")
    recipe = complete_recipe("comer", comer_model_section(official_state, hparams),
                             fallback={"name": "comer", "vocab": {"specials": list(COMER_SPECIALS)},
                                       "optim": dict(COMER_OPTIM)})
    return Converted(recipe=recipe, vocab=vocab, state=state)


@CONVERTERS.register("comer")
class CoMERConverter(Converter):
    """CoMER (Green-Wood/CoMER) Lightning checkpoints or state dicts: keys 'comer_model.encoder.*', '...decoder.*'."""

    family = "CoMER"
    keys = "keys 'comer_model.encoder.*', 'comer_model.decoder.*', no 'decoder.proj_imp'"

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        # ICAL's, TAMER's and PosFormer's inner state dicts are CoMER's plus their branch ('decoder.SCCM.*',
        # 'decoder.struct_sim.*', 'posdecoder.*')
        return (is_comer_family(state) and not has_skeleton_head(state)
                and not has_prefix(state, "decoder.SCCM.") and not has_prefix(state, "decoder.struct_sim.")
                and not has_prefix(state, "posdecoder."))

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        return convert_comer(state, dictionary, hparams)
