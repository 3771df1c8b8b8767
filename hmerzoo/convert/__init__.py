"""Official checkpoints -> hmerzoo model directories (``recipe.yaml``, ``vocab.json``, ``model.safetensors``).

    from hmerzoo.convert import convert
    convert("bttr", "epoch=...ckpt", "models/bttr")          # dictionary.txt beside the checkpoint
    model = hmerzoo.load_model("models/bttr")

``core.py`` holds what every model shares: reading the file safely (``weights_only`` / safetensors), recognising
which official model a state dict comes from, checking the result against a freshly built hmerzoo model, writing
the directory atomically. Each official model has one module here (``bttr.py``, ``comer.py``, ``hmer_mtl.py``,
``abm.py``, ``can.py``, ``ical.py``, ``tamer.py``, ``posformer.py``) with its key renames, its vocabulary and how
to read its architecture off the tensor shapes; it registers a :class:`Converter` in :data:`CONVERTERS` (``hmerzoo
list converters``). To add a model: write such a module and import it below.
"""
from __future__ import annotations

from ..registry import CONVERTERS
from . import abm, bttr, can, comer, hmer_mtl, ical, posformer, tamer  # noqa: F401  (each registers its converter)
from .abm import abm_model_section, convert_abm, convert_state_dict_abm
from .can import can_model_section, convert_can, convert_state_dict_can
from .bttr import bttr_model_section, convert_bttr, convert_state_dict_bttr
from .comer import comer_model_section, convert_comer, convert_state_dict_comer
from .core import Converted, Converter, check_family, convert, families_of, read_official_checkpoint
from .hmer_mtl import convert_hmer_mtl, convert_state_dict_hmer_mtl
from .ical import convert_ical, convert_state_dict_ical
from .posformer import convert_posformer, convert_state_dict_posformer
from .tamer import convert_state_dict_tamer, convert_tamer

__all__ = ["CONVERTERS", "Converted", "Converter", "check_family", "convert", "families_of",
           "read_official_checkpoint", "convert_bttr", "convert_state_dict_bttr", "bttr_model_section",
           "convert_comer", "convert_state_dict_comer", "comer_model_section", "convert_hmer_mtl",
           "convert_state_dict_hmer_mtl", "convert_abm", "convert_state_dict_abm", "abm_model_section", "convert_ical",
           "convert_state_dict_ical", "convert_tamer", "convert_state_dict_tamer", "convert_can",
           "convert_state_dict_can", "can_model_section", "convert_posformer", "convert_state_dict_posformer"]
