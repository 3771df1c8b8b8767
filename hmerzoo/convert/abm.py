"""ABM (XH-B/ABM): ``torch.save(model.state_dict())`` of its ``Encoder_Decoder``, keys 'encoder1.*' and, per decoder
branch, 'init_GRU_model', 'emb_model', 'gru_model', 'gru_prob_model' (L2R) and the same with '2' (R2L).

The renames mirror hmerzoo's parameter names in ``encoders/densenet.py`` and ``decoders/abm.py`` (whose GRUs pack
the three official gate layers into one linear each).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, HmerzooError
from ..registry import CONVERTERS
from ..vocab import Vocabulary
from .core import Converted, Converter, check_vocab_size, complete_recipe, densenet_section, require, strip_prefix

ENCODER_PREFIX = "encoder1."
ABM_BRANCHES = (("l2r", ""), ("r2l", "2"))
# official key (without the branch suffix) -> hmerzoo key under decoder.<direction>.
ABM_RENAMES = {
    "init_GRU_model.fc.": "init_proj.",
    "emb_model.embedding.": "embedding.",
    "gru_model.conv_Ua.": "attention.key_proj.",
    "gru_model.fc_Wa.": "attention.query_proj.",
    "gru_model.conv_Q.": "attention.coverage_convs.0.",
    "gru_model.fc_Uf.": "attention.coverage_projs.0.",
    "gru_model.conv_Q2.": "attention.coverage_convs.1.",
    "gru_model.fc_Uf2.": "attention.coverage_projs.1.",
    "gru_model.fc_va.": "attention.energy.",
    "gru_prob_model.fc_Wct.": "output.context_proj.",
    "gru_prob_model.fc_Wht.": "output.hidden_proj.",
    "gru_prob_model.fc_Wyt.": "output.embedding_proj.",
    "gru_prob_model.fc_W0.": "output.classifier.",
}
# hmerzoo packs each GRU's three gate layers (update z, reset r, candidate h) into one linear
ABM_PACKED = {
    "gru1_input": ("gru_model.fc_Wyz", "gru_model.fc_Wyr", "gru_model.fc_Wyh"),
    "gru1_hidden": ("gru_model.fc_Uhz", "gru_model.fc_Uhr", "gru_model.fc_Uhh"),
    "gru2_input": ("gru_model.fc_Wcz", "gru_model.fc_Wcr", "gru_model.fc_Wch"),
    "gru2_hidden": ("gru_model.fc_Uhz2", "gru_model.fc_Uhr2", "gru_model.fc_Uhh2"),
}
DECODER_MODULES = {f"{module}{suffix}" for module in ("init_GRU_model", "emb_model", "gru_model", "gru_prob_model")
                   for _, suffix in ABM_BRANCHES}
ABM_ROLES = {"sos": "sos", "eos": "eos"}  # ABM's dictionary.txt lists 'sos 0' and 'eos 1' itself; no padding token
ABM_OPTIM = {"type": "adadelta", "lr": 1.0, "eps": 1.0e-6, "weight_decay": 1.0e-4}
# train.py's mutual distillation between the branches: T = 4, beta = 0.5 (constants; no checkpoint records them)
ABM_DISTILLATION = {"type": "mutual_distillation", "weight": 0.5, "temperature": 4.0, "pairing": "official"}


def _branch_key(official: str, suffix: str) -> str:
    """'gru_model.fc_Wa.weight' -> the branch's key ('gru_model2.fc_Wa.weight' for suffix '2')."""
    module, rest = official.split(".", 1)
    return f"{module}{suffix}.{rest}"


def _directions(state: dict[str, torch.Tensor]) -> list[str]:
    directions = [d for d, suffix in ABM_BRANCHES if _branch_key("init_GRU_model.fc.weight", suffix) in state]
    if not directions:
        raise CheckpointError("the checkpoint has no decoder branch ('init_GRU_model.fc.weight' or "
                              "'init_GRU_model2.fc.weight'); it is not an official ABM checkpoint")
    return directions


def _inner(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # nn.DataParallel's 'module.' when a multi-GPU model was saved without '.module' (train.py saves model.module)
    return strip_prefix(official_state, "module.", (ENCODER_PREFIX,))


def convert_state_dict_abm(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ABM state dict -> hmerzoo state dict (same tensors; each GRU's gate layers concatenated)."""
    state = _inner(official_state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in state.items():
        if key.startswith(ENCODER_PREFIX):
            out["encoder." + key[len(ENCODER_PREFIX):]] = value
            used.add(key)
    directions = _directions(state)
    for direction, suffix in ABM_BRANCHES:
        if direction not in directions:
            continue
        for old, new in ABM_RENAMES.items():
            prefix = _branch_key(old, suffix)
            for key, value in state.items():
                if key.startswith(prefix):
                    out[f"decoder.{direction}.{new}{key[len(prefix):]}"] = value
                    used.add(key)
        for new, gates in ABM_PACKED.items():
            for kind in ("weight", "bias"):
                keys = [_branch_key(f"{g}.{kind}", suffix) for g in gates]
                present = [k in state for k in keys]
                if not any(present):
                    continue
                if not all(present):
                    missing = keys[present.index(False)]
                    raise CheckpointError(f"the checkpoint has no '{missing}'; it is not an official ABM checkpoint")
                out[f"decoder.{direction}.{new}.{kind}"] = torch.cat([state[k] for k in keys], dim=0)
                used.update(keys)
    unknown = [k for k in state if k not in used]
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of the checkpoint are not part of an official ABM model "
                              f"(e.g. {', '.join(unknown[:3])}); is this an ABM checkpoint?")
    return out


def abm_model_section(official_state: dict[str, torch.Tensor]) -> dict:
    """hmerzoo ``model:`` section of an ABM checkpoint, sizes read off the tensors (dropout: the official 0.2)."""
    state = _inner(official_state)
    encoder = densenet_section(state, ENCODER_PREFIX, "ABM")
    directions = _directions(state)
    suffix = dict(ABM_BRANCHES)[directions[0]]

    def branch(key: str) -> torch.Tensor:
        return require(state, _branch_key(key, suffix), "ABM")

    kernels = [int(branch(f"gru_model.{conv}.weight").shape[-1]) for conv in ("conv_Q", "conv_Q2")]
    heads = {"distill": dict(ABM_DISTILLATION)} if len(directions) == 2 else {}
    return {
        "encoder": encoder,
        "decoder": {"type": "abm", "hidden_size": int(branch("init_GRU_model.fc.weight").shape[0]),
                    "embed_dim": int(branch("emb_model.embedding.weight").shape[1]),
                    "attention_dim": int(branch("gru_model.conv_Ua.weight").shape[0]),
                    "coverage_channels": int(branch("gru_model.conv_Q.weight").shape[0]),
                    "coverage_kernels": kernels, "dropout": 0.2, "directions": directions},
        "heads": heads,
    }


def convert_abm(official_state: dict[str, torch.Tensor], dictionary: Path, hparams: dict | None = None) -> Converted:
    # ABM's vocabulary is its dictionary.txt as it is: 'token<TAB>id' lines, sos=0, eos=1, no padding token
    try:
        vocab = Vocabulary.from_dictionary(str(dictionary), [], roles=dict(ABM_ROLES))
    except HmerzooError as e:
        raise CheckpointError(f"dictionary {dictionary}: not an ABM dictionary ({e}); pass the dictionary.txt of the "
                              "official ABM repository ('token id' per line, with 'sos 0' and 'eos 1')") from None
    state = convert_state_dict_abm(official_state)
    direction = _directions(_inner(official_state))[0]
    check_vocab_size(vocab, int(require(state, f"decoder.{direction}.output.classifier.weight", "ABM").shape[0]),
                     dictionary, "ABM")
    vocab_section = {"specials": [], "roles": dict(ABM_ROLES)}  # how this model's vocabulary is read
    recipe = complete_recipe("abm", abm_model_section(official_state),
                             fallback={"name": "abm", "vocab": vocab_section,
                                       "loss": {"type": "sequence_cross_entropy"}, "optim": dict(ABM_OPTIM)})
    recipe["vocab"] = {**(recipe.get("vocab") or {}), **vocab_section}
    return Converted(recipe=recipe, vocab=vocab, state=state)


@CONVERTERS.register("abm")
class ABMConverter(Converter):
    """ABM (XH-B/ABM) state dicts (train.py's .pkl): keys 'encoder1.*', 'gru_model.*', 'gru_model2.*', ..."""

    family = "ABM"
    keys = "keys 'encoder1.*', 'init_GRU_model.*', 'gru_model.*', 'gru_prob_model.*' (and '...2.*' for R2L)"

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        for key in state:
            module = key[len("module."):] if key.startswith("module.") else key
            if module.startswith(ENCODER_PREFIX) or module.split(".", 1)[0] in DECODER_MODULES:
                return True
        return False

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        return convert_abm(state, dictionary, hparams)
