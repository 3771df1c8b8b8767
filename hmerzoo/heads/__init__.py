"""Auxiliary multi-task heads. Each head is one class in one file here, registered with ``@HEADS.register``.

A head is an ``nn.Module`` built with the decoder's ``d_model``, the vocabulary and its special ids injected;
``head(output: DecoderOutput, batch: Batch)`` builds its own targets from the batch and returns its (weighted)
loss, a scalar or a dict of named scalars.

Every module of this package is imported here, so a new file registers its components without editing this file.
"""
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
