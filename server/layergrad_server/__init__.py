"""The layergrad server: holds a Chainer VGG16 and serves its gradients over gRPC."""

__version__ = "0.1.0"
