"""Data: class lists, ImageFolder listing for the converter, FFCV loaders.

The loader names are resolved on first use (PEP 562), so ``import fastssl.data`` pulls in neither
torch nor ffcv: the converter starts fast and model code runs where ffcv is not installed.
"""
from .classes import classes_path, num_classes, read_classes

_LOADER_NAMES = ("IMAGENET_MEAN", "IMAGENET_STD", "FFCVLoader", "make_eval_loader", "make_pretrain_loader")

__all__ = ["classes_path", "num_classes", "read_classes", *_LOADER_NAMES]


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from . import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
