"""CAN (LBH1024/CAN): ``utils.save_checkpoint``'s ``torch.save({'model': model.state_dict()}, '...pth')`` of its
``models.can.CAN``, keys 'encoder.*' (DenseNet), 'counting_decoder1.*' / 'counting_decoder2.*' (the counting
branches, kernels 3 and 5) and 'decoder.*' (``AttDecoder``).

Its vocabulary file is ``words_dict.txt``: one token per line, the line number is the id, ``eos`` 0 and ``sos`` 1
listed in it (no padding token). It is read as it is, so ids (and counting classes) stay the official ones.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, HmerzooError
from ..registry import CONVERTERS
from ..vocab import Vocabulary
from .core import Converted, Converter, check_vocab_size, complete_recipe, densenet_section, rename_keys, require

CAN_PREFIXES = [
    ("encoder.", "encoder."),
    ("counting_decoder1.", "decoder.counting.branches.0."),
    ("counting_decoder2.", "decoder.counting.branches.1."),
    ("decoder.init_weight.", "decoder.init_proj."),
    ("decoder.embedding.", "decoder.embedding."),
    ("decoder.word_input_gru.", "decoder.gru."),
    ("decoder.word_attention.hidden_weight.", "decoder.attention.query_proj."),
    ("decoder.word_attention.attention_conv.", "decoder.attention.coverage_conv."),
    ("decoder.word_attention.attention_weight.", "decoder.attention.coverage_proj."),
    ("decoder.word_attention.alpha_convert.", "decoder.attention.energy."),
    ("decoder.encoder_feature_conv.", "decoder.key_proj."),
    ("decoder.word_state_weight.", "decoder.state_proj."),
    ("decoder.word_embedding_weight.", "decoder.embedding_proj."),
    ("decoder.word_context_weight.", "decoder.context_proj."),
    ("decoder.counting_context_weight.", "decoder.counting_proj."),
    ("decoder.word_convert.", "decoder.classifier."),
]
CAN_ROLES = {"sos": "sos", "eos": "eos"}  # words_dict.txt lists 'eos' (id 0) and 'sos' (id 1) itself
CAN_OPTIM = {"type": "adadelta", "lr": 1.0, "eps": 1.0e-6, "weight_decay": 1.0e-4}
CAN_DROPOUT = 0.5  # config.yaml dropout_ratio; no checkpoint records it


def _inner(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # nn.DataParallel's 'module.' (the official train.py does not use it; other training scripts may)
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def convert_state_dict_can(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official CAN state dict -> hmerzoo state dict (same tensors, renamed)."""
    return rename_keys(_inner(official_state), CAN_PREFIXES, "CAN")


def can_model_section(official_state: dict[str, torch.Tensor]) -> dict:
    """hmerzoo ``model:`` section of a CAN checkpoint, sizes read off the tensors."""
    state = _inner(official_state)

    def get(key: str) -> torch.Tensor:
        return require(state, key, "CAN")

    coverage = get("decoder.word_attention.attention_conv.weight")
    return {
        "encoder": densenet_section(state, "encoder.", "CAN"),
        "decoder": {"type": "can", "hidden_size": int(get("decoder.init_weight.weight").shape[0]),
                    "embed_dim": int(get("decoder.embedding.weight").shape[1]),
                    "attention_dim": int(get("decoder.encoder_feature_conv.weight").shape[0]),
                    "coverage_channels": int(coverage.shape[0]), "coverage_kernel": int(coverage.shape[-1]),
                    "dropout": CAN_DROPOUT,
                    "counting_kernels": [int(get(f"counting_decoder{i}.trans_layer.0.weight").shape[-1])
                                         for i in (1, 2)],
                    "counting_channels": int(get("counting_decoder1.trans_layer.0.weight").shape[0])},
        "heads": {"counting": {"type": "counting", "weight": 1.0}},
    }


def convert_can(official_state: dict[str, torch.Tensor], dictionary: Path, hparams: dict | None = None) -> Converted:
    try:
        vocab = Vocabulary.from_dictionary(str(dictionary), [], roles=dict(CAN_ROLES))
    except HmerzooError as e:
        raise CheckpointError(f"dictionary {dictionary}: not a CAN dictionary ({e}); pass the words_dict.txt the "
                              "model was trained with (one token per line, 'eos' first and 'sos' second)") from None
    state = convert_state_dict_can(official_state)
    check_vocab_size(vocab, int(require(state, "decoder.classifier.weight", "CAN").shape[0]), dictionary, "CAN")
    counted = int(require(state, "decoder.counting_proj.weight", "CAN").shape[1])
    if counted != len(vocab):
        raise CheckpointError(f"the CAN checkpoint counts {counted} symbol classes but has {len(vocab)} words; "
                              "hmerzoo's CAN counts one class per vocabulary id, as the official configuration")
    vocab_section = {"specials": [], "roles": dict(CAN_ROLES)}
    recipe = complete_recipe("can", can_model_section(official_state),
                             fallback={"name": "can", "vocab": vocab_section,
                                       "loss": {"type": "cross_entropy"}, "optim": dict(CAN_OPTIM)})
    recipe["vocab"] = {**(recipe.get("vocab") or {}), **vocab_section}
    return Converted(recipe=recipe, vocab=vocab, state=state)


@CONVERTERS.register("can")
class CANConverter(Converter):
    """CAN (LBH1024/CAN) checkpoints: keys 'encoder.*', 'counting_decoder1.*', 'counting_decoder2.*', 'decoder.*'."""

    family = "CAN"
    keys = "keys 'encoder.*', 'counting_decoder1.*', 'counting_decoder2.*', 'decoder.word_attention.*'"

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        return any(k.split(".", 1)[0] in ("counting_decoder1", "counting_decoder2") for k in _inner(state))

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        return convert_can(state, dictionary, hparams)
