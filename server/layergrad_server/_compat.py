"""Makes Chainer 7.8.1 importable on numpy 2.

Chainer reads ``numpy.sctypes`` (removed in numpy 2.0) at import time and
imports ``numpy.distutils.system_info`` (gone on Python 3.12+; where it still
exists, importing it sets the root logger's level to WARNING as a side effect).
``apply()`` restores ``sctypes`` and installs a small stand-in for
``numpy.distutils.system_info``, whose only use in Chainer is a BLAS check on
macOS. ``import layergrad_server`` applies it.
"""

from __future__ import annotations

import sys
import types
import warnings

import numpy

_SCTYPES = {
    "int": [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
    "uint": [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
    "float": [numpy.float16, numpy.float32, numpy.float64],
    "complex": [numpy.complex64, numpy.complex128],
    "others": [bool, object, bytes, str, numpy.void],
}


def apply() -> None:
    """Restores what Chainer needs from numpy; idempotent."""
    if not hasattr(numpy, "sctypes"):
        numpy.sctypes = {key: list(value) for key, value in _SCTYPES.items()}
    if "numpy.distutils.system_info" not in sys.modules:
        distutils = types.ModuleType("numpy.distutils")
        system_info = types.ModuleType("numpy.distutils.system_info")
        # Chainer asks only for BLAS info on macOS; an empty dict means "unknown".
        system_info.get_info = lambda name, notfound_action=0: {}
        distutils.system_info = system_info
        sys.modules["numpy.distutils"] = distutils
        sys.modules["numpy.distutils.system_info"] = system_info
        numpy.distutils = distutils
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
