"""Faster CPU (numpy) kernels for the Chainer functions VGG16 runs, with results identical to stock Chainer.

``install()`` replaces these CPU methods of Chainer 7.8.1 (``uninstall()`` puts the originals back;
``installed()`` does both around a block):

* ``Convolution2DFunction.forward_cpu`` (convolution): im2col written in row bands from a small
  zero-padded copy of the input rows each band reads (no ``numpy.pad`` of the whole image, no nine
  full-size slice copies, any input memory order), into a reused buffer, then the ``numpy.dot``
  that ``numpy.tensordot`` makes; for a batch, im2col writes each patch straight into the
  row-ordered matrix that ``tensordot`` would copy the whole im2col matrix into (the copy, a
  transpose of 115 MB per image for conv1_2, took more time than the product at batch > 1);
* ``Convolution2DGradW.forward_cpu`` (weight gradient): the same im2col, then the same ``dot``;
* ``Deconvolution2DFunction.forward_cpu`` (transposed convolution, the input-gradient path of a
  convolution): the same ``dot``, written into a reused buffer, then col2im summed a block of
  channels at a time while the block stays in cache, with stride 1 as whole-plane adds;
* ``ReLUGrad2.forward_cpu`` (ReLU backward): ``gy * (y > 0)`` in bands of rows, so that reading
  ``y`` (whose memory order is NHWC after a convolution) and writing the NCHW result stay in cache;
* ``MaxPoolingND.forward_cpu`` and ``MaxPoolingNDGrad.forward_cpu`` (max pooling and its
  backward), for non-overlapping windows: the maximum and its index from strided views of the
  input instead of im2col and ``argmax``; the backward selects, for each window position, the bits
  of ``gy`` or of ``+0.0`` instead of a scatter and col2im. ``MaxPoolingNDWithIndexes`` (double
  backward) stays stock: the indexes the forward stores are stock's, same values, dtype and layout.

For a batch whose product per image has at least ``_PER_IMAGE_MIN_PRODUCT`` multiply-adds, the
convolution forward and the transposed convolution run one image at a time through the batch-1
path (im2col of one image into a buffer of one image's size, its rows or columns of the product
written in place, its col2im), and the weight gradient builds the batch's im2col matrix in the
column-major layout a batch of one has. Stock's batch im2col matrix, many times the caches, cost
more in copies and page faults than the product itself (batch 2 took 3-5x the time of batch 1).

``LinearFunction`` is left alone: its time is one matrix product, already a single BLAS call.

Why the results are identical (bit for bit with the same BLAS library and thread count):

* every matrix product is the ``numpy.dot`` call ``numpy.tensordot`` makes in stock Chainer, with
  operands of the same shapes, values and memory layouts (the im2col matrix is built in stock's
  layout and passed through ``tensordot``'s own transpose and reshape); only where the output of
  a temporary product is written differs (``out=``, a reused buffer);
* the per-image split computes the same products as the batch's: OpenBLAS's sgemm partitions a
  product's rows and columns (between threads and into cache blocks) but never its inner
  dimension, so each output element is the same sum over the same blocks, in the same order,
  whether its row or column is computed with the rest of the batch or alone; and an operand's
  row-major or column-major layout only changes how it is packed into the same panels. Below a
  few million multiply-adds OpenBLAS may instead run small-matrix kernels whose order depends on
  the shape, which the floor keeps well clear of (all of VGG16's convolutions are above it);
* im2col, pooling and their outputs are copies and comparisons, which do not round; outputs have
  the memory layout (strides) stock Chainer gives them, so later layout-dependent operations
  (sums over axes, ``tensordot``'s reshapes) see the same arrays;
* col2im adds each output element's terms in stock Chainer's order, kernel row then kernel column,
  starting from zero; its stride-1 form adds whole shifted planes, where the terms stock Chainer
  drops at the border are zeroed first and so add ``+0.0``: a sum that starts at ``+0.0`` is never
  ``-0.0``, and adding ``+0.0`` to anything else leaves it unchanged;
* ReLU backward multiplies ``gy`` by ``1.0`` or ``0.0`` as float32, which is what ``gy * (y > 0)``
  does after casting the booleans (signed zeros and NaN included);
* the pooling maximum folds ``numpy.maximum`` over the window positions in stock Chainer's order;
  the index is the first position holding the maximum, ``argmax``'s tie rule (a window holding NaN
  runs stock's code); the backward gives ``gy + 0.0`` at that position and ``+0.0`` elsewhere, as
  stock's zero-filled col2im does.

Fallback rule: a replaced method takes its fast path only for numpy float32 arrays in a
configuration where the above holds: convolution and its gradients with groups 1 and dilation 1
(any kernel size, stride, padding, ``cover_all``), default memory layouts, no iDeep; pooling over
2-D images with window equal to stride, no padding and sizes divisible by the window (there
``cover_all`` changes nothing), no NaN in the input; ReLU backward for 4-D ``gy`` in C order.
Anything else (float64, float16, groups, dilation, overlapping, padded or partial pooling windows,
CuPy or ChainerX arrays, iDeep) runs the original method unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy
from chainer.backends import intel64
from chainer.functions.activation import relu as _relu
from chainer.functions.connection import convolution_2d as _convolution_2d
from chainer.functions.connection import deconvolution_2d as _deconvolution_2d
from chainer.functions.pooling import max_pooling_nd as _max_pooling_nd
from chainer.utils import conv as _conv
from numpy.lib.stride_tricks import as_strided

__all__ = ["install", "installed", "is_installed", "uninstall"]

_FLOAT32 = numpy.dtype(numpy.float32)

# Bytes of the working set a blocked loop keeps per step: small enough for the L2 cache.
_BLOCK_BYTES = 256 * 1024

# Buffers reused across calls for im2col matrices and col2im inputs (fresh multi-megabyte arrays
# cost page faults on every call). At most _POOL_KEEP of them, each at most _POOL_MAX_BYTES, stay
# allocated between calls: enough for VGG16's largest im2col matrix of one image (115 MB), while
# larger batches allocate per call, as stock Chainer does.
_POOL_KEEP = 2
_POOL_MAX_BYTES = 160 * 1024 * 1024


class _BufferPool:
    """Byte buffers lent for the length of one kernel call and kept for the next one."""

    def __init__(self, keep: int, max_bytes: int) -> None:
        self._keep = keep
        self._max_bytes = max_bytes
        self._free: list[numpy.ndarray] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def array(self, shape: tuple[int, ...], dtype: numpy.dtype) -> Iterator[numpy.ndarray]:
        """A C-contiguous uninitialised array of ``shape`` and ``dtype``, valid inside the block."""
        nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
        buffer = self._take(nbytes)
        try:
            yield buffer[:nbytes].view(dtype).reshape(shape)
        finally:
            self._give(buffer)

    def clear(self) -> None:
        """Frees the kept buffers."""
        with self._lock:
            self._free.clear()

    def _take(self, nbytes: int) -> numpy.ndarray:
        with self._lock:
            if self._free:
                sizes = [b.nbytes for b in self._free]
                fitting = [k for k, size in enumerate(sizes) if size >= nbytes]
                if fitting:
                    return self._free.pop(min(fitting, key=sizes.__getitem__))
                if nbytes <= self._max_bytes:
                    # The smallest buffer is replaced by a larger one rather than kept beside it.
                    self._free.pop(sizes.index(min(sizes)))
        return numpy.empty(max(nbytes, 1), dtype=numpy.uint8)

    def _give(self, buffer: numpy.ndarray) -> None:
        with self._lock:
            if buffer.nbytes <= self._max_bytes and len(self._free) < self._keep:
                self._free.append(buffer)


_pool = _BufferPool(_POOL_KEEP, _POOL_MAX_BYTES)

# Multiply-adds per image from which a batch's product is computed one image at a time.
_PER_IMAGE_MIN_PRODUCT = 1 << 26


# ---- shared pieces -------------------------------------------------------------------


def _is_f32(*arrays: Any) -> bool:
    """Whether every array is a numpy float32 array."""
    return all(type(a) is numpy.ndarray and a.dtype == _FLOAT32 for a in arrays)


def _ideep_wanted(inputs: tuple[Any, ...]) -> bool:
    """Whether stock Chainer would hand these inputs to iDeep."""
    return bool(intel64.should_use_ideep(">=auto") and intel64.inputs_all_ready(inputs))


def _c_ordered(array: numpy.ndarray) -> bool:
    """Whether the axes of length > 1 have strictly nested positive strides, outermost first."""
    axes = [(n, s) for n, s in zip(array.shape, array.strides, strict=True) if n > 1]
    if not axes:
        return True
    if axes[-1][1] <= 0:
        return False
    return all(
        outer_stride >= inner_len * inner_stride
        for (_, outer_stride), (inner_len, inner_stride) in itertools.pairwise(axes)
    )


def _per_image_products(m: int, n: int, k: int) -> bool:
    """Whether a batch's (m x k) by (k x n) product per image is large enough to be split by image.

    Below about a million multiply-adds OpenBLAS may run small-matrix kernels that depend on the
    operands' layout and shape; splitting stays above that with a wide margin.
    """
    return min(m, n, k) >= 2 and m * n * k >= _PER_IMAGE_MIN_PRODUCT


def _rows_per_band(row_bytes: int, rows: int) -> int:
    """How many rows of ``row_bytes`` fit a cache-sized block (at least one, at most ``rows``)."""
    return max(1, min(rows, _BLOCK_BYTES // max(row_bytes, 1)))


def _im2col(
    x: numpy.ndarray,
    kh: int,
    kw: int,
    sy: int,
    sx: int,
    ph: int,
    pw: int,
    col: numpy.ndarray,
) -> None:
    """Writes ``chainer.utils.conv.im2col_cpu(x, ...)`` (dilation 1) into ``col`` (n, c, kh, kw, oh, ow).

    Works one band of output rows at a time: the input rows the band reads are copied, zero-padded,
    into a small buffer (``x`` may be in any memory order, NHWC included), and the band of ``col``
    is one strided copy out of it.
    """
    n, c, h, w = x.shape
    oh, ow = col.shape[4:]
    wp = w + 2 * pw + sx - 1
    band = _rows_per_band(c * wp * x.itemsize * sy, oh)
    buffer = numpy.zeros((c, (band - 1) * sy + kh, wp), dtype=x.dtype)
    s_c, s_h, s_w = buffer.strides
    for i in range(n):
        for oy0 in range(0, oh, band):
            rows = min(band, oh - oy0)
            top = oy0 * sy - ph  # image row of the buffer's first row
            rows_in = (rows - 1) * sy + kh
            first, last = max(top, 0), min(top + rows_in, h)
            if first >= last:
                buffer[:, :rows_in, pw : pw + w] = 0
            else:
                if first > top:
                    buffer[:, : first - top, pw : pw + w] = 0
                buffer[:, first - top : last - top, pw : pw + w] = x[i, :, first:last]
                if last < top + rows_in:
                    buffer[:, last - top : rows_in, pw : pw + w] = 0
            patches = as_strided(buffer, (c, kh, kw, rows, ow), (s_c, s_h, s_w, s_h * sy, s_w * sx))
            numpy.copyto(col[i, :, :, :, oy0 : oy0 + rows], patches)


def _col2im(
    gcol: numpy.ndarray,
    sy: int,
    sx: int,
    ph: int,
    pw: int,
    h: int,
    w: int,
) -> numpy.ndarray:
    """``chainer.utils.conv.col2im_cpu`` (dilation 1) of ``gcol`` laid out (c, kh, kw, n, ih, iw).

    Returns the same strided view of a padded buffer stock Chainer returns. ``gcol`` is
    overwritten (the stride-1 form zeroes the terms that fall outside the image).
    """
    c, n = gcol.shape[0], gcol.shape[3]
    img = numpy.zeros((n, c, h + 2 * ph + sy - 1, w + 2 * pw + sx - 1), dtype=gcol.dtype)
    _col2im_into(gcol, img, sy, sx, ph, pw)
    return img[:, :, ph : ph + h, pw : pw + w]


def _col2im_into(gcol: numpy.ndarray, img: numpy.ndarray, sy: int, sx: int, ph: int, pw: int) -> None:
    """Adds col2im of ``gcol`` (c, kh, kw, n, ih, iw) into the zeroed padded images ``img``
    (n, c, h + 2 ph + sy - 1, w + 2 pw + sx - 1); ``gcol`` is overwritten."""
    h, w = img.shape[2] - 2 * ph - sy + 1, img.shape[3] - 2 * pw - sx + 1
    if sy == 1 and sx == 1 and gcol.shape[5] == w:
        _col2im_planes(gcol, img[:, :, ph : ph + h, pw : pw + w], ph, pw)
    else:
        _col2im_strided(gcol, img, sy, sx)


def _col2im_planes(gcol: numpy.ndarray, out: numpy.ndarray, ph: int, pw: int) -> None:
    """Stride-1 col2im where input and output rows have the same width: whole-plane adds.

    Each channel's image is accumulated as one flat row with margins, so the term of kernel
    position (j, i) is one contiguous add of the plane shifted by ``(j - ph) * w + (i - pw)``.
    Terms whose column falls outside the image would wrap into the neighbouring row: they are
    set to zero first (adding ``+0.0`` leaves a sum that started at ``+0.0`` unchanged). Terms
    whose row falls outside land in the margins, which are discarded.
    """
    c, kh, kw, n, ih, iw = gcol.shape
    h, w = out.shape[2:]
    plane = ih * iw
    front = ph * w + pw
    length = front + (max(h, ih) + kh) * w + kw
    block = max(1, min(c, _BLOCK_BYTES // (n * length * gcol.itemsize)))
    acc_buffer = numpy.empty((block, n, length), dtype=gcol.dtype)
    flat = gcol.reshape(c, kh, kw, n, plane)
    for c0 in range(0, c, block):
        k = min(block, c - c0)
        acc = acc_buffer[:k]
        acc.fill(0)
        for j in range(kh):
            for i in range(kw):
                terms = gcol[c0 : c0 + k, j, i]
                lo, hi = pw - i, w + pw - i
                if lo > 0:
                    terms[..., :lo] = 0
                if hi < iw:
                    terms[..., hi:] = 0
                start = front + (j - ph) * w + (i - pw)
                target = acc[:, :, start : start + plane]
                numpy.add(target, flat[c0 : c0 + k, j, i], out=target)
        image = acc[:, :, front : front + h * w].reshape(k, n, h, w)
        numpy.copyto(out[:, c0 : c0 + k], image.transpose(1, 0, 2, 3))


def _col2im_strided(gcol: numpy.ndarray, img: numpy.ndarray, sy: int, sx: int) -> None:
    """General col2im (dilation 1) into the zeroed padded ``img``, a block of channels at a time."""
    c, kh, kw, n, ih, iw = gcol.shape
    hp, wp = img.shape[2:]
    block = max(1, min(c, _BLOCK_BYTES // (n * hp * wp * img.itemsize)))
    for c0 in range(0, c, block):
        target_block = img[:, c0 : c0 + block]
        for j in range(kh):
            for i in range(kw):
                target = target_block[:, :, j : j + sy * ih : sy, i : i + sx * iw : sx]
                target += gcol[c0 : c0 + block, j, i].transpose(1, 0, 2, 3)


# ---- convolution -------------------------------------------------------------------------


def _out_size(func: Any, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
    """The output size stock im2col computes for a convolution node's settings (dilation 1)."""
    return (
        _conv.get_conv_outsize(h, kh, func.sy, func.ph, cover_all=func.cover_all),
        _conv.get_conv_outsize(w, kw, func.sx, func.pw, cover_all=func.cover_all),
    )


def _conv_forward_cpu(self: Any, inputs: tuple[numpy.ndarray, ...]) -> tuple[numpy.ndarray]:
    """``Convolution2DFunction.forward_cpu``: y = conv(x, W) + b."""
    x, w = inputs[:2]
    b = inputs[2] if len(inputs) == 3 else None
    if (
        self.cudnn_fast
        or self.groups != 1
        or self.dy != 1
        or self.dx != 1
        or any(layout is not None for layout in self.input_layouts)
        or not _is_f32(*inputs)
        or _ideep_wanted(inputs)
    ):
        return _ORIGINALS[_convolution_2d.Convolution2DFunction, "forward_cpu"](self, inputs)
    n, c, h, wd = x.shape
    out_c, _, kh, kw = w.shape
    oh, ow = _out_size(self, h, wd, kh, kw)
    if oh <= 0 or ow <= 0:
        return _ORIGINALS[_convolution_2d.Convolution2DFunction, "forward_cpu"](self, inputs)
    self.retain_inputs((0, 1))
    w_mat = w.transpose(1, 2, 3, 0).reshape(c * kh * kw, out_c)
    if n > 1 and _per_image_products(oh * ow, out_c, c * kh * kw):
        # One image at a time, each through the batch-1 path, its rows of the product written in
        # place: the same sums as the whole batch's product (see the module's docstring).
        y = numpy.empty((n * oh * ow, out_c), dtype=x.dtype)
        with _patches(1, c, kh, kw, oh, ow) as (col, patches):
            for i in range(n):
                _im2col(x[i : i + 1], kh, kw, self.sy, self.sx, self.ph, self.pw, col)
                numpy.dot(patches, w_mat, out=y[i * oh * ow : (i + 1) * oh * ow])
    else:
        with _patches(n, c, kh, kw, oh, ow) as (col, patches):
            _im2col(x, kh, kw, self.sy, self.sx, self.ph, self.pw, col)
            y = numpy.dot(patches, w_mat)
    y = y.reshape(n, oh, ow, out_c)
    if b is not None:
        y += b
    return (numpy.rollaxis(y, 3, 1),)


@contextlib.contextmanager
def _patches(
    n: int, c: int, kh: int, kw: int, oh: int, ow: int
) -> Iterator[tuple[numpy.ndarray, numpy.ndarray]]:
    """A pooled im2col matrix ``col`` (n, c, kh, kw, oh, ow) for ``_im2col`` to fill, and the
    (n*oh*ow, c*kh*kw) matrix of patches that ``numpy.tensordot`` makes of it, in the memory
    layout stock's ``tensordot`` hands to ``numpy.dot``.

    For one image that is a view of ``col`` in stock's im2col layout. For a batch, stock's
    reshape copies the patches into row order; here ``col`` is a view of that row-ordered
    matrix, so that ``_im2col`` writes the patches there directly: the operands of the product
    are the same values in the same layout, without the copy (a transpose of the whole
    matrix) or a second matrix of that size.
    """
    rows, depth = n * oh * ow, c * kh * kw
    if n == 1:
        with _pool.array((n, c, kh, kw, oh, ow), _FLOAT32) as col:
            yield col, col.transpose(0, 4, 5, 1, 2, 3).reshape(rows, depth)
        return
    with _pool.array((n, oh, ow, c, kh, kw), _FLOAT32) as patches:
        yield patches.transpose(0, 3, 4, 5, 1, 2), patches.reshape(rows, depth)


def _conv_grad_w_forward_cpu(self: Any, inputs: tuple[numpy.ndarray, ...]) -> tuple[numpy.ndarray]:
    """``Convolution2DGradW.forward_cpu``: gW from x and gy."""
    x, gy = inputs
    if (
        self.groups != 1
        or self.dy != 1
        or self.dx != 1
        or self._use_ideep
        or self.W_dtype != _FLOAT32
        or not _is_f32(x, gy)
    ):
        return _ORIGINALS[_convolution_2d.Convolution2DGradW, "forward_cpu"](self, inputs)
    n, c, h, wd = x.shape
    out_c, oh, ow = gy.shape[1:]
    kh, kw = self.kh, self.kw
    if (oh, ow) != _out_size(self, h, wd, kh, kw) or gy.shape[0] != n:
        return _ORIGINALS[_convolution_2d.Convolution2DGradW, "forward_cpu"](self, inputs)
    self.retain_inputs((0, 1))
    if not (gy.flags.c_contiguous or gy.flags.f_contiguous) and 1 in gy.shape:
        gy = numpy.ascontiguousarray(gy)
    rows, depth = n * oh * ow, c * kh * kw
    gy_t = gy.transpose(1, 0, 2, 3).reshape(out_c, rows)
    if n > 1 and _per_image_products(rows, out_c, depth):
        # The patches of the whole batch in the column-major layout a batch of one has (written
        # with whole output rows contiguous), instead of the row order stock's copy makes.
        with _pool.array((c, kh, kw, n, oh, ow), _FLOAT32) as col_t:
            _im2col(x, kh, kw, self.sy, self.sx, self.ph, self.pw, col_t.transpose(3, 0, 1, 2, 4, 5))
            gw = numpy.dot(gy_t, col_t.reshape(depth, rows).T)
    else:
        with _patches(n, c, kh, kw, oh, ow) as (col, patches):
            _im2col(x, kh, kw, self.sy, self.sx, self.ph, self.pw, col)
            gw = numpy.dot(gy_t, patches)
    return (gw.reshape(out_c, c, kh, kw),)


def _deconv_forward_cpu(self: Any, inputs: tuple[numpy.ndarray, ...]) -> tuple[numpy.ndarray]:
    """``Deconvolution2DFunction.forward_cpu``: the transposed convolution of x by W, + b."""
    x, w = inputs[:2]
    b = inputs[2] if len(inputs) == 3 else None
    original = _ORIGINALS[_deconvolution_2d.Deconvolution2DFunction, "forward_cpu"]
    if (
        self.groups != 1
        or self.dy != 1
        or self.dx != 1
        or any(layout is not None for layout in self.input_layouts)
        or not _is_f32(*inputs)
        or _ideep_wanted(inputs)
    ):
        return original(self, inputs)
    n, in_c, ih, iw = x.shape
    _, out_c, kh, kw = w.shape
    self._calc_out_size(x.shape, w.shape)
    h, wd = self.outh, self.outw
    if (ih - 1) * self.sy + kh > h + 2 * self.ph + self.sy - 1 or (iw - 1) * self.sx + kw > (
        wd + 2 * self.pw + self.sx - 1
    ):
        return original(self, inputs)
    self.retain_inputs((0, 1))
    w_t = w.transpose(1, 2, 3, 0).reshape(out_c * kh * kw, in_c)
    sy, sx, ph, pw = self.sy, self.sx, self.ph, self.pw
    if n > 1 and _per_image_products(out_c * kh * kw, ih * iw, in_c):
        # One image at a time: its columns of the product, then its col2im, in a buffer of one
        # image's size (the same sums as the whole batch's product; see the module's docstring).
        img = numpy.zeros((n, out_c, h + 2 * ph + sy - 1, wd + 2 * pw + sx - 1), dtype=x.dtype)
        with _pool.array((out_c * kh * kw, ih * iw), _FLOAT32) as gcol:
            for i in range(n):
                numpy.dot(w_t, x[i].reshape(in_c, ih * iw), out=gcol)
                _col2im_into(gcol.reshape(out_c, kh, kw, 1, ih, iw), img[i : i + 1], sy, sx, ph, pw)
        y = img[:, :, ph : ph + h, pw : pw + wd]
    else:
        x_t = x.transpose(1, 0, 2, 3).reshape(in_c, n * ih * iw)
        with _pool.array((out_c * kh * kw, n * ih * iw), _FLOAT32) as gcol:
            numpy.dot(w_t, x_t, out=gcol)
            y = _col2im(gcol.reshape(out_c, kh, kw, n, ih, iw), sy, sx, ph, pw, h, wd)
    if b is not None:
        y += b.reshape((1, b.size, 1, 1))
    return (y,)


# ---- ReLU ----------------------------------------------------------------------------------


def _relu_grad2_forward_cpu(self: Any, inputs: tuple[numpy.ndarray, ...]) -> tuple[numpy.ndarray]:
    """``ReLUGrad2.forward_cpu``: gx = gy * (y > 0)."""
    (gy,) = inputs
    y = self.b
    if (
        gy.ndim != 4
        or not _is_f32(gy, y)
        or y.shape != gy.shape
        or not _c_ordered(gy)
        or _ideep_wanted(inputs)
    ):
        return _ORIGINALS[_relu.ReLUGrad2, "forward_cpu"](self, inputs)
    n, c, h, w = gy.shape
    gx = numpy.empty(gy.shape, dtype=gy.dtype)
    band = _rows_per_band(c * w * gy.itemsize * 3, h)
    mask_buffer = numpy.empty((c, band, w), dtype=gy.dtype)
    for i in range(n):
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            mask = mask_buffer[:, : r1 - r0]
            numpy.greater(y[i, :, r0:r1], 0, out=mask, casting="unsafe")
            numpy.multiply(gy[i, :, r0:r1], mask, out=gx[i, :, r0:r1])
    return (gx,)


# ---- max pooling ------------------------------------------------------------------------------


def _pool_fast_config(func: Any, shape: tuple[int, ...]) -> bool:
    """Whether a max-pooling node over inputs of ``shape`` has non-overlapping, unpadded windows
    tiling the image exactly."""
    if func.ndim != 2 or len(shape) != 4:
        return False
    (kh, kw), (sy, sx), (ph, pw) = func.ksize, func.stride, func.pad
    return (
        (kh, kw) == (sy, sx)
        and kh * kw <= 127
        and ph == 0
        and pw == 0
        and shape[2] % kh == 0
        and shape[3] % kw == 0
    )


def _window_views(x: numpy.ndarray, kh: int, kw: int) -> list[numpy.ndarray]:
    """``x[:, :, ky::kh, kx::kw]`` for the window positions in row-major order."""
    return [x[:, :, ky::kh, kx::kw] for ky in range(kh) for kx in range(kw)]


def _max_pool_forward_cpu(self: Any, inputs: tuple[numpy.ndarray, ...]) -> tuple[numpy.ndarray]:
    """``MaxPoolingND.forward_cpu``: the window maxima, and their positions in ``self.indexes``."""
    (x,) = inputs
    original = _ORIGINALS[_max_pooling_nd.MaxPoolingND, "forward_cpu"]
    if not _is_f32(x) or not _pool_fast_config(self, x.shape) or _ideep_wanted(inputs):
        return original(self, inputs)
    kh, kw = self.ksize
    views = _window_views(x, kh, kw)
    # Computed in x's own memory order (numpy allocates results like their inputs), copied to
    # C order at the end, as stock Chainer's outputs are.
    acc = numpy.maximum(views[0], views[1]) if len(views) > 1 else views[0].copy()
    for view in views[2:]:
        numpy.maximum(acc, view, out=acc)
    if numpy.isnan(acc.max()):
        return original(self, inputs)
    index = numpy.zeros(acc.shape, dtype=numpy.int8)
    if len(views) > 1:
        # index = how many leading window positions miss the maximum = argmax's first maximum.
        missed = numpy.not_equal(views[0], acc)
        index += missed
        scratch = numpy.empty_like(missed)
        for view in views[1:-1]:
            numpy.not_equal(view, acc, out=scratch)
            missed &= scratch
            index += missed
    y = numpy.empty(acc.shape, dtype=x.dtype)
    numpy.copyto(y, acc)
    index_c = numpy.empty(acc.shape, dtype=numpy.int8)
    numpy.copyto(index_c, index)
    self._in_shape = x.shape
    self._in_dtype = x.dtype
    self.indexes = index_c.astype(numpy.intp)
    # The same indexes as int8, for the backward; valid while ``indexes`` is this array.
    self._fast_index8 = (self.indexes, index_c)
    return (y,)


def _max_pool_grad_forward_cpu(self: Any, inputs: tuple[numpy.ndarray, ...]) -> tuple[numpy.ndarray]:
    """``MaxPoolingNDGrad.forward_cpu``: gy routed to each window's maximum, zero elsewhere."""
    (gy,) = inputs
    func = self.func
    indexes = func.indexes
    if (
        not _is_f32(gy)
        or func._in_dtype != _FLOAT32
        or not _pool_fast_config(func, func._in_shape)
        or type(indexes) is not numpy.ndarray
        or indexes.dtype != numpy.intp
        or indexes.shape != gy.shape
        or _ideep_wanted(inputs)
    ):
        return _ORIGINALS[_max_pooling_nd.MaxPoolingNDGrad, "forward_cpu"](self, inputs)
    n, c, h, w = func._in_shape
    kh, kw = func.ksize
    stash = getattr(func, "_fast_index8", None)
    index8 = stash[1] if stash is not None and stash[0] is indexes else indexes.astype(numpy.int8)
    gx = numpy.zeros((n, c, h + kh - 1, w + kw - 1), dtype=gy.dtype)
    inner = gx[:, :, :h, :w]
    # Stock Chainer's col2im adds gy to 0.0 (turning -0.0 into +0.0) at the window position of
    # the maximum and leaves 0.0 elsewhere: a bitwise select of those bits does the same.
    bits = (gy + numpy.float32(0.0)).view(numpy.uint32)
    mask = numpy.empty(bits.shape, dtype=numpy.uint32)
    for position, view in enumerate(_window_views(inner.view(numpy.uint32), kh, kw)):
        numpy.equal(index8, position, out=mask, casting="unsafe")
        numpy.negative(mask, out=mask)
        numpy.bitwise_and(bits, mask, out=view)
    return (inner,)


# ---- installation -----------------------------------------------------------------------------

_REPLACEMENTS: dict[tuple[type, str], Callable[..., Any]] = {
    (_convolution_2d.Convolution2DFunction, "forward_cpu"): _conv_forward_cpu,
    (_convolution_2d.Convolution2DGradW, "forward_cpu"): _conv_grad_w_forward_cpu,
    (_deconvolution_2d.Deconvolution2DFunction, "forward_cpu"): _deconv_forward_cpu,
    (_relu.ReLUGrad2, "forward_cpu"): _relu_grad2_forward_cpu,
    (_max_pooling_nd.MaxPoolingND, "forward_cpu"): _max_pool_forward_cpu,
    (_max_pooling_nd.MaxPoolingNDGrad, "forward_cpu"): _max_pool_grad_forward_cpu,
}
_ORIGINALS: dict[tuple[type, str], Callable[..., Any]] = {
    key: key[0].__dict__[key[1]] for key in _REPLACEMENTS
}
_install_lock = threading.Lock()


def is_installed() -> bool:
    """Whether the fast kernels are in place."""
    return all(cls.__dict__[name] is fast for (cls, name), fast in _REPLACEMENTS.items())


def install() -> None:
    """Puts the fast kernels in place of Chainer's CPU methods; idempotent."""
    with _install_lock:
        for (cls, name), fast in _REPLACEMENTS.items():
            setattr(cls, name, fast)


def uninstall() -> None:
    """Puts Chainer's own CPU methods back and frees the kept buffers; idempotent."""
    with _install_lock:
        for (cls, name), original in _ORIGINALS.items():
            setattr(cls, name, original)
    _pool.clear()


@contextlib.contextmanager
def installed(enabled: bool = True) -> Iterator[None]:
    """The fast kernels (``enabled``) or stock Chainer's inside the block; the previous state after."""
    before = is_installed()
    (install if enabled else uninstall)()
    try:
        yield
    finally:
        (install if before else uninstall)()
