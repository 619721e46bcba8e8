"""Chainer's own Caffe conversion of a synthetic model, as the reference the converter is checked against.

Run as a script in a process of its own (Chainer's Caffe schema and the server's
register the same proto file name, so they cannot share a process; and Chainer's
generated schema needs protobuf's pure-Python implementation)::

    python chainer_caffe_reference.py MODEL LAYERS.json BLOBS.npz OUT.caffemodel OUT.npz

``LAYERS.json`` lists the Caffe layers in order: ``{"name", "type", "blobs"}``
(the number of blobs, stored in ``BLOBS.npz`` as ``"<name>|<index>"``). The script
writes them as a Caffe model with Chainer's schema (the layer parameters
``CaffeFunction`` reads: kernel size, output count, bias term), then converts that
file with ``GoogLeNet`` / ``ResNetLayers.convert_caffemodel_to_npz``. With MODEL
``caffe-function`` it saves the links ``CaffeFunction`` itself builds instead.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"

import layergrad_server._compat as compat

compat.apply()

import numpy as np  # noqa: E402
from chainer.links.caffe.protobuf3 import caffe_pb2  # noqa: E402


def write_caffemodel(layers: list[dict], blobs: np.lib.npyio.NpzFile, path: str) -> None:
    net = caffe_pb2.NetParameter(name="synthetic")
    previous = "data"
    for spec in layers:
        layer = net.layer.add(name=spec["name"], type=spec["type"])
        layer.bottom.append(previous)
        layer.top.append(spec["name"])
        previous = spec["name"]
        arrays = [blobs[f"{spec['name']}|{index}"] for index in range(spec["blobs"])]
        for array in arrays:
            blob = layer.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(array.ravel().tolist())
        if spec["type"] == "Convolution":
            param = layer.convolution_param
            param.num_output = arrays[0].shape[0]
            param.kernel_size.append(arrays[0].shape[2])
            param.bias_term = len(arrays) > 1
        elif spec["type"] == "InnerProduct":
            layer.inner_product_param.num_output = arrays[0].shape[0]
            layer.inner_product_param.bias_term = len(arrays) > 1
        elif spec["type"] == "BatchNorm":
            layer.batch_norm_param.use_global_stats = True
        elif spec["type"] == "Scale":
            layer.scale_param.bias_term = True
    with open(path, "wb") as out:
        out.write(net.SerializeToString())


def main(model: str, layers_json: str, blobs_npz: str, caffemodel: str, npz: str) -> None:
    with open(layers_json) as handle:
        layers = json.load(handle)
    with np.load(blobs_npz) as blobs:
        write_caffemodel(layers, blobs, caffemodel)
    if model == "caffe-function":
        from chainer.links.caffe.caffe_function import CaffeFunction
        from chainer.serializers import save_npz

        save_npz(npz, CaffeFunction(caffemodel), compression=False)
    elif model == "googlenet":
        from chainer.links.model.vision.googlenet import GoogLeNet

        GoogLeNet.convert_caffemodel_to_npz(caffemodel, npz)
    else:
        from chainer.links.model.vision.resnet import ResNetLayers

        ResNetLayers.convert_caffemodel_to_npz(caffemodel, npz, n_layers=int(model.removeprefix("resnet")))


if __name__ == "__main__":
    main(*sys.argv[1:])
