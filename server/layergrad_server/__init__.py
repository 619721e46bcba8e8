"""The layergrad server: holds a Chainer VGG16 and serves its gradients over gRPC.

Importing the package applies the numpy 2 compatibility shim (``_compat``), so
every module of the package can import Chainer.
"""

from layergrad_server import _compat

_compat.apply()

__version__ = "0.1.0"
