"""Official checkpoints -> hmerzoo model directories (``recipe.yaml``, ``vocab.json``, ``model.safetensors``).

    from hmerzoo.convert import convert
    convert("bttr", "epoch=...ckpt", "models/bttr")          # dictionary.txt beside the checkpoint
    model = hmerzoo.load_model("models/bttr")

Each converter is a function ``(official_state, dictionary_path, hparams) -> Converted`` registered in
:data:`CONVERTERS`; it builds the vocabulary the official code builds, renames the official keys to hmerzoo's and
derives the architecture from the tensor shapes. :func:`convert` does the rest for every model: reading the file
safely, checking the result against a freshly built hmerzoo model, and writing the directory atomically.
To add a model: write ``convert_<name>`` next to :func:`convert_bttr` and add it to ``CONVERTERS``.
"""
from __future__ import annotations

import copy
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import CheckpointError, HmerzooError
from .vocab import Vocabulary

DICTIONARY_FILE = "dictionary.txt"


@dataclass
class Converted:
    """What a converter produces: a complete recipe, the vocabulary and the state dict in hmerzoo's key names."""

    recipe: dict
    vocab: Vocabulary
    state: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# reading official files
def read_official_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, hyper-parameters or {}) of an official checkpoint.

    ``.safetensors``: the tensors, keys as in the official checkpoint. Anything else (Lightning ``.ckpt``,
    ``.pt``, ``.pkl``) is read with ``torch.load(weights_only=True)``, which cannot run code from the file; a
    Lightning checkpoint's ``state_dict`` is taken, a plain state dict is used as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), {}
        except Exception as e:  # safetensors has its own error types for corrupt files
            raise CheckpointError(f"{path}: cannot read it as safetensors ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Never retry with weights_only=False: unpickling arbitrary objects runs code from the file.
        raise CheckpointError(
            f"{path}: refused to load it safely: torch.load(weights_only=True) stopped at an object that is not "
            f"plain tensors/containers ({_first_line(e)}). hmerzoo does not unpickle arbitrary objects, since that "
            "can run code from the file. To proceed, in an environment you trust (e.g. with the official code "
            "installed) re-save only the weights: torch.save(torch.load(path, weights_only=False)['state_dict'], "
            "'weights.pt'), or save that state dict with safetensors.torch.save_file, and convert that file"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it with torch.load ({_first_line(e)}); is it a PyTorch "
                              "checkpoint?") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    hparams = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), dict) else {}
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(state)[:8]))}); expected a "
                              "Lightning checkpoint with a 'state_dict' or a plain state dict")
    return tensors, dict(hparams)


def _first_line(e: BaseException) -> str:
    """The informative part of an exception message, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours parts of its message
    # torch's weights_only message is long; the unpickler's own line says which global was refused
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\.?$)", text, flags=re.MULTILINE)
    if match:
        return match.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__


def find_dictionary(official_path: Path, dictionary: str | os.PathLike | None) -> Path:
    if dictionary is not None:
        d = Path(dictionary)
        if not d.is_file():
            raise CheckpointError(f"dictionary {d}: no such file")
        return d
    d = official_path.parent / DICTIONARY_FILE
    if not d.is_file():
        raise CheckpointError(f"{official_path}: no {DICTIONARY_FILE} beside it; pass the vocabulary file the model "
                              "was trained with (--dictionary PATH, e.g. the official repo's "
                              "bttr/datamodule/dictionary.txt)")
    return d


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by converters
def rename_keys(state: dict[str, torch.Tensor], prefixes: list[tuple[str, str]], model: str) -> dict[str, torch.Tensor]:
    """Rename every key by the first (official prefix -> hmerzoo prefix) that matches; unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for old, new in prefixes:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of the checkpoint are not part of an official {model} model "
                              f"(e.g. {', '.join(unknown[:3])}); is this a {model} checkpoint?")
    return out


def strip_prefix(state: dict[str, torch.Tensor], prefix: str, first_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove the LightningModule's attribute prefix (``bttr.``); accept state dicts of the inner module too."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if any(k.startswith(first_keys) for k in state):
        return dict(state)
    raise CheckpointError(f"no key starts with '{prefix}' (or {', '.join(first_keys)}); the first keys are "
                          f"{', '.join(list(state)[:3])}. Is this the right model?")


def _require(state: dict[str, torch.Tensor], key: str, model: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no '{key}'; it is not an official {model} checkpoint")
    return state[key]


def _count_indexed(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def complete_recipe(name: str, model_section: dict, fallback: dict) -> dict:
    """The shipped recipe ``name`` (training sections included) with the checkpoint's ``model`` section.

    Falls back to ``fallback`` + the model section, with a warning, when hmerzoo ships no such recipe or it does
    not validate (a converted model must load even if, say, a scheduler it names is unavailable).
    """
    from .recipe import load_recipe, recipes_dir, validate_recipe

    recipe = None
    if (recipes_dir() / f"{name}.yaml").is_file():
        try:
            recipe = load_recipe(name)
            recipe["model"] = model_section
            validate_recipe(recipe, f"{name} (shipped)")
        except HmerzooError as e:
            warnings.warn(f"convert: the shipped recipe '{name}' is not usable ({e}); writing a recipe with the "
                          "model and optimizer sections only", stacklevel=3)
            recipe = None
    if recipe is None:
        fallback = copy.deepcopy(fallback)
        recipe = {"name": fallback.pop("name", name), "model": model_section, **fallback}
    return recipe


def check_vocab_size(vocab: Vocabulary, classes: int, dictionary: Path, model: str) -> None:
    if len(vocab) != classes:
        raise CheckpointError(f"dictionary {dictionary}: gives {len(vocab)} tokens with the special tokens, but the "
                              f"{model} checkpoint has {classes} output classes; pass the dictionary the model was "
                              "trained with (--dictionary PATH)")


# ---------------------------------------------------------------------------------------------------------------
# BTTR (Green-Wood/BTTR, LitBTTR checkpoints: keys 'bttr.encoder.*', 'bttr.decoder.*')
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

BTTR_OPTIM = {"type": "adadelta", "lr": 1.0, "eps": 1.0e-6, "weight_decay": 1.0e-4}


def convert_state_dict_bttr(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official BTTR state dict (with or without the ``bttr.`` prefix) -> hmerzoo state dict (same tensors)."""
    state = strip_prefix(official_state, "bttr.", ("encoder.", "decoder."))
    return rename_keys(state, BTTR_PREFIXES, "BTTR")


def bttr_model_section(official_state: dict[str, torch.Tensor], hparams: dict | None = None) -> dict:
    """hmerzoo ``model:`` section of a BTTR checkpoint, sizes read off the tensors (nhead/dropout from the
    checkpoint's hyper-parameters when it has them, else the official config's 8 / 0.3)."""
    hparams = hparams or {}
    state = strip_prefix(official_state, "bttr.", ("encoder.", "decoder."))
    stem = _require(state, "encoder.model.conv1.weight", "BTTR")
    d_model = int(_require(state, "encoder.feature_proj.0.weight", "BTTR").shape[0])
    num_layers = _count_indexed(state, "encoder.model.dense1.")
    decoder_layers = _count_indexed(state, "decoder.model.layers.")
    if not num_layers or not decoder_layers:
        raise CheckpointError("the checkpoint has no dense-block or decoder layers; it is not a BTTR checkpoint")
    ffn = int(_require(state, "decoder.model.layers.0.linear1.weight", "BTTR").shape[0])
    trans1 = _require(state, "encoder.model.trans1.conv1.weight", "BTTR")
    reduction = float(trans1.shape[0]) / float(trans1.shape[1])
    return {
        "encoder": {"type": "densenet", "growth_rate": int(stem.shape[0]) // 2, "num_layers": num_layers,
                    "reduction": 0.5 if abs(reduction - 0.5) < 0.01 else round(reduction, 4), "dropout": 0.2,
                    "stem_norm": "encoder.model.norm1.weight" in state,
                    "post_norm": "encoder.model.post_norm.weight" in state},
        "neck": {"type": "bttr_projection", "d_model": d_model},
        "decoder": {"type": "bttr", "d_model": d_model, "nhead": int(hparams.get("nhead", 8)),
                    "num_layers": decoder_layers, "dim_feedforward": ffn,
                    "dropout": float(hparams.get("dropout", 0.3)),
                    "max_positions": int(_require(state, "decoder.pos_enc.pe", "BTTR").shape[0])},
    }


def convert_bttr(official_state: dict[str, torch.Tensor], dictionary: Path, hparams: dict | None = None) -> Converted:
    # BTTR's vocabulary: <pad>=0, <sos>=1, <eos>=2, then dictionary.txt in file order (bttr/datamodule/vocab.py)
    vocab = Vocabulary.from_dictionary(str(dictionary), ["<pad>", "<sos>", "<eos>"])
    state = convert_state_dict_bttr(official_state)
    check_vocab_size(vocab, int(_require(state, "decoder.proj.weight", "BTTR").shape[0]), dictionary, "BTTR")
    # the weights define the architecture, so the model section always comes from the checkpoint
    recipe = complete_recipe("bttr", bttr_model_section(official_state, hparams),
                             fallback={"name": "bttr", "optim": dict(BTTR_OPTIM)})
    return Converted(recipe=recipe, vocab=vocab, state=state)


# ---------------------------------------------------------------------------------------------------------------
# CoMER (Green-Wood/CoMER, LitCoMER checkpoints) and HMER-MTL (trungtndev/HMER-MTL, LitMTL checkpoints): both keep
# the inner model in the attribute 'comer_model', so keys are 'comer_model.encoder.*', 'comer_model.decoder.*'.
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
# HMER-MTL's second output layer (the implicit/skeleton head) becomes the structure_skeleton head 'skeleton'
HMER_MTL_PREFIXES = [("decoder.proj_imp.", "heads.skeleton.linear.")] + COMER_PREFIXES

COMER_OPTIM = {"type": "sgd", "lr": 0.08, "momentum": 0.9, "weight_decay": 1.0e-4}
COMER_SPECIALS = ["<pad>", "<sos>", "<eos>"]
HMER_MTL_SPECIALS = ["<pad>", "<sos>", "<eos>", "<space>"]  # mtl/datamodule/vocab.py: <space> = 3


def _strip_comer_prefix(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_prefix(official_state, "comer_model.", ("encoder.", "decoder."))


def convert_state_dict_comer(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official CoMER state dict (with or without the ``comer_model.`` prefix) -> hmerzoo state dict."""
    return rename_keys(_strip_comer_prefix(official_state), COMER_PREFIXES, "CoMER")


def convert_state_dict_hmer_mtl(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official HMER-MTL state dict -> hmerzoo state dict (``proj_imp`` -> ``heads.skeleton.linear``)."""
    state = _strip_comer_prefix(official_state)
    _require(state, "decoder.proj_imp.weight", "HMER-MTL")
    return rename_keys(state, HMER_MTL_PREFIXES, "HMER-MTL")


def comer_model_section(official_state: dict[str, torch.Tensor], hparams: dict | None = None,
                        model: str = "CoMER") -> dict:
    """hmerzoo ``model:`` section of a CoMER-family checkpoint, read off the tensor shapes; dropout (and the
    coverage switches, when the shapes cannot tell them apart) from the hyper-parameters, else the official
    config's values."""
    hparams = hparams or {}
    state = _strip_comer_prefix(official_state)
    stem = _require(state, "encoder.model.conv1.weight", model)
    d_model = int(_require(state, "encoder.feature_proj.weight", model).shape[0])
    num_layers = _count_indexed(state, "encoder.model.dense1.")
    decoder_layers = _count_indexed(state, "decoder.model.layers.")
    if not num_layers or not decoder_layers:
        raise CheckpointError(f"the checkpoint has no dense-block or decoder layers; it is not a {model} checkpoint")
    trans1 = _require(state, "encoder.model.trans1.conv1.weight", model)
    reduction = float(trans1.shape[0]) / float(trans1.shape[1])
    decoder: dict = {"type": "comer", "d_model": d_model, "nhead": int(hparams.get("nhead", 8)),
                     "num_layers": decoder_layers,
                     "dim_feedforward": int(_require(state, "decoder.model.layers.0.linear1.weight", model).shape[0]),
                     "dropout": float(hparams.get("dropout", 0.3))}
    if "decoder.model.arm.conv.weight" in state:
        arm_conv = state["decoder.model.arm.conv.weight"]
        nhead = int(_require(state, "decoder.model.arm.proj.weight", model).shape[0])  # one output map per head
        decoder["nhead"] = nhead
        decoder["dc"] = int(arm_conv.shape[0])
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
        decoder["cross_coverage"], decoder["self_coverage"] = cross, own
        if "decoder.model.arm.cbam.spatial_attention.conv.weight" in state:
            reduce = _require(state, "decoder.model.arm.cbam.channel_attention.excitation.0.weight", model)
            decoder["cbam"] = True
            decoder["cbam_ratio"] = int(reduce.shape[1]) // int(reduce.shape[0])
            decoder["cbam_kernel"] = int(state["decoder.model.arm.cbam.spatial_attention.conv.weight"].shape[-1])
            decoder["cbam_mask_aware"] = False  # the official pooling (padding included); true is our option
    else:
        decoder["cross_coverage"], decoder["self_coverage"] = False, False
    decoder["max_positions"] = int(_require(state, "decoder.pos_enc.pe", model).shape[0])
    return {
        "encoder": {"type": "densenet", "growth_rate": int(stem.shape[0]) // 2, "num_layers": num_layers,
                    "reduction": 0.5 if abs(reduction - 0.5) < 0.01 else round(reduction, 4), "dropout": 0.2,
                    "stem_norm": "encoder.model.norm1.weight" in state,
                    "post_norm": "encoder.model.post_norm.weight" in state},
        "neck": {"type": "comer_projection", "d_model": d_model},
        "decoder": decoder,
    }


def convert_comer(official_state: dict[str, torch.Tensor], dictionary: Path, hparams: dict | None = None) -> Converted:
    # CoMER's vocabulary: <pad>=0, <sos>=1, <eos>=2, then dictionary.txt in file order (comer/datamodule/vocab.py)
    vocab = Vocabulary.from_dictionary(str(dictionary), COMER_SPECIALS)
    state = convert_state_dict_comer(official_state)
    check_vocab_size(vocab, int(_require(state, "decoder.proj.weight", "CoMER").shape[0]), dictionary, "CoMER")
    recipe = complete_recipe("comer", comer_model_section(official_state, hparams),
                             fallback={"name": "comer", "vocab": {"specials": list(COMER_SPECIALS)},
                                       "optim": dict(COMER_OPTIM)})
    return Converted(recipe=recipe, vocab=vocab, state=state)


def convert_hmer_mtl(official_state: dict[str, torch.Tensor], dictionary: Path,
                     hparams: dict | None = None) -> Converted:
    # HMER-MTL's vocabulary adds <space>=3 (mtl/datamodule/vocab.py), so every dictionary id is CoMER's + 1
    hparams = hparams or {}
    vocab = Vocabulary.from_dictionary(str(dictionary), HMER_MTL_SPECIALS)
    state = convert_state_dict_hmer_mtl(official_state)
    check_vocab_size(vocab, int(_require(state, "decoder.proj.weight", "HMER-MTL").shape[0]), dictionary, "HMER-MTL")
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


# ABM (XH-B/ABM, ``torch.save(model.state_dict())`` of ``Encoder_Decoder``: keys 'encoder1.*' and, per decoder
# branch, 'init_GRU_model', 'emb_model', 'gru_model', 'gru_prob_model' (L2R) and the same with '2' (R2L))
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
ABM_ROLES = {"sos": "sos", "eos": "eos"}  # ABM's dictionary.txt lists 'sos 0' and 'eos 1' itself; no padding token
ABM_OPTIM = {"type": "adadelta", "lr": 1.0, "eps": 1.0e-6, "weight_decay": 1.0e-4}
# train.py's mutual distillation between the branches: T = 4, beta = 0.5 (constants; no checkpoint records them)
ABM_DISTILLATION = {"type": "mutual_distillation", "weight": 0.5, "temperature": 4.0, "pairing": "official"}


def _abm_branch_key(official: str, suffix: str) -> str:
    """'gru_model.fc_Wa.weight' -> the branch's key ('gru_model2.fc_Wa.weight' for suffix '2')."""
    module, rest = official.split(".", 1)
    return f"{module}{suffix}.{rest}"


def _abm_directions(state: dict[str, torch.Tensor]) -> list[str]:
    directions = [d for d, suffix in ABM_BRANCHES if _abm_branch_key("init_GRU_model.fc.weight", suffix) in state]
    if not directions:
        raise CheckpointError("the checkpoint has no decoder branch ('init_GRU_model.fc.weight' or "
                              "'init_GRU_model2.fc.weight'); it is not an official ABM checkpoint")
    return directions


def _strip_abm_prefix(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # nn.DataParallel's 'module.' when a multi-GPU model was saved without '.module' (train.py saves model.module)
    return strip_prefix(official_state, "module.", ("encoder1.",))


def convert_state_dict_abm(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ABM state dict -> hmerzoo state dict (same tensors; each GRU's gate layers concatenated)."""
    state = _strip_abm_prefix(official_state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in state.items():
        if key.startswith("encoder1."):
            out["encoder." + key[len("encoder1."):]] = value
            used.add(key)
    for direction, suffix in ABM_BRANCHES:
        if direction not in _abm_directions(state):
            continue
        for old, new in ABM_RENAMES.items():
            prefix = _abm_branch_key(old, suffix)
            for key, value in state.items():
                if key.startswith(prefix):
                    out[f"decoder.{direction}.{new}{key[len(prefix):]}"] = value
                    used.add(key)
        for new, gates in ABM_PACKED.items():
            for kind in ("weight", "bias"):
                keys = [_abm_branch_key(f"{g}.{kind}", suffix) for g in gates]
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
    state = _strip_abm_prefix(official_state)
    stem = _require(state, "encoder1.conv1.weight", "ABM")
    num_layers = _count_indexed(state, "encoder1.dense1.")
    if not num_layers:
        raise CheckpointError("the checkpoint has no dense-block layers; it is not an ABM checkpoint")
    trans1 = _require(state, "encoder1.trans1.conv1.weight", "ABM")
    reduction = float(trans1.shape[0]) / float(trans1.shape[1])
    directions = _abm_directions(state)
    suffix = dict(ABM_BRANCHES)[directions[0]]

    def branch(key: str) -> torch.Tensor:
        return _require(state, _abm_branch_key(key, suffix), "ABM")

    kernels = [int(branch(f"gru_model.{conv}.weight").shape[-1]) for conv in ("conv_Q", "conv_Q2")]
    heads = {"distill": dict(ABM_DISTILLATION)} if len(directions) == 2 else {}
    return {
        "encoder": {"type": "densenet", "growth_rate": int(stem.shape[0]) // 2, "num_layers": num_layers,
                    "reduction": 0.5 if abs(reduction - 0.5) < 0.01 else round(reduction, 4), "dropout": 0.2,
                    "stem_norm": "encoder1.norm1.weight" in state, "post_norm": "encoder1.post_norm.weight" in state},
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
    direction = _abm_directions(_strip_abm_prefix(official_state))[0]
    check_vocab_size(vocab, int(_require(state, f"decoder.{direction}.output.classifier.weight", "ABM").shape[0]),
                     dictionary, "ABM")
    vocab_section = {"specials": [], "roles": dict(ABM_ROLES)}  # how this model's vocabulary is read
    recipe = complete_recipe("abm", abm_model_section(official_state),
                             fallback={"name": "abm", "vocab": vocab_section,
                                       "loss": {"type": "sequence_cross_entropy"}, "optim": dict(ABM_OPTIM)})
    recipe["vocab"] = {**(recipe.get("vocab") or {}), **vocab_section}
    return Converted(recipe=recipe, vocab=vocab, state=state)


# name -> converter. Other models are added here the same way.
CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor], Path, dict], Converted]] = {
    "bttr": convert_bttr,
    "comer": convert_comer,
    "hmer_mtl": convert_hmer_mtl,
    "abm": convert_abm,
}


# ---------------------------------------------------------------------------------------------------------------
def convert(name: str, official_path: str | os.PathLike, out_dir: str | os.PathLike,
            dictionary: str | os.PathLike | None = None) -> Path:
    """Convert an official checkpoint of model ``name`` into the hmerzoo model directory ``out_dir``.

    ``dictionary``: the official vocabulary file; default: ``dictionary.txt`` beside the checkpoint.
    Returns ``out_dir``; ``hmerzoo.load_model(out_dir)`` loads the result.
    """
    from .builder import RECIPE_FILE, VOCAB_FILE, WEIGHTS_FILE, build_model, load_state_dict_checked
    from .checkpoint import atomic_write_text, save_weights
    from .recipe import dump_recipe

    if name not in CONVERTERS:
        raise CheckpointError(f"no converter for '{name}'; converters: {', '.join(sorted(CONVERTERS))}")
    official_path = Path(official_path)
    official_state, hparams = read_official_checkpoint(official_path)
    dictionary_path = find_dictionary(official_path, dictionary)
    converted = CONVERTERS[name](official_state, dictionary_path, hparams)
    converted.recipe.setdefault("description", f"converted from the official {name} checkpoint "
                                               f"{official_path.name} by hmerzoo.convert")

    # Build the hmerzoo model and load the converted tensors into it: this checks every key and shape before
    # anything is written.
    try:
        model = build_model(converted.recipe, vocab=converted.vocab)
    except HmerzooError as e:
        raise CheckpointError(f"{official_path}: the recipe derived from the checkpoint does not build: {e}") from None
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in converted.state.items()}
    own = model.state_dict()
    for k, v in state.items():
        if k in own and v.is_floating_point() and own[k].is_floating_point():
            state[k] = v.to(own[k].dtype)
    load_state_dict_checked(model, state, str(official_path))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RECIPE_FILE, dump_recipe(converted.recipe))
    converted.vocab.save(str(out / VOCAB_FILE))
    save_weights(out / WEIGHTS_FILE, state, {"converted_from": name, "source": official_path.name})
    return out


__all__ = ["CONVERTERS", "Converted", "convert", "convert_bttr", "convert_state_dict_bttr", "bttr_model_section",
           "convert_comer", "convert_hmer_mtl", "convert_state_dict_comer", "convert_state_dict_hmer_mtl",
           "comer_model_section", "read_official_checkpoint", "convert_abm", "convert_state_dict_abm",
           "abm_model_section"]
