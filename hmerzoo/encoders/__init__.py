"""Image encoders. Each component is one class in one file here, registered with ``@ENCODERS.register``.

Every module of this package is imported here, so a new file registers its components without editing this file.
"""
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
