"""The per-thread VM runner behind :meth:`sparks_tvm.compiler.CompiledModel.run` (CPU).

Kept apart from the compiler: it is the call-time half (input buffers bound once per
thread, zero-copy inputs, outputs as views), the compiler the build-time half.
"""

from __future__ import annotations

import numpy as np
import tvm


class Runner:
    """One thread's VM, its ``main`` and the input buffers its calls reuse (CPU only).

    Looking ``main`` up costs about 1 us per call and a new input tensor (``tvm.runtime.tensor``)
    about 25 us, as much as a tiny model's kernels: both are done once per thread.
    """

    __slots__ = ("vm", "device", "main", "buffers", "views", "spans", "_probe")

    def __init__(self, vm, device, specs):
        self.vm = vm
        self.device = device
        self.main = vm["main"]
        self._probe = None
        if device.dlpack_device_type() != tvm.cpu().dlpack_device_type():
            self.buffers = self.views = self.spans = None
            return
        self.buffers = [tvm.runtime.empty(shape, str(dtype), device) for _, shape, dtype in specs]
        self.views = [np.from_dlpack(b) for b in self.buffers]
        self.spans = [span(v) for v in self.views]

    def bind(self, arrays) -> tuple:
        """The VM arguments for ``arrays`` and the memory they occupy (``[(lo, hi)]``).

        An aligned, contiguous, writeable array is passed as it is (DLPack); any other is
        copied into this thread's buffer for that input.
        """
        tensors, spans = [], []
        for i, arr in enumerate(arrays):
            flags = arr.flags
            # Reading the address (arr.ctypes) costs more than copying a small input.
            if arr.nbytes >= ZERO_COPY_MIN_BYTES and flags.c_contiguous and flags.writeable \
                    and arr.ctypes.data % ALIGNMENT == 0:
                ptr = arr.ctypes.data
                tensors.append(tvm.runtime.from_dlpack(arr))
                spans.append((ptr, ptr + arr.nbytes))
            else:
                np.copyto(self.views[i], arr)
                tensors.append(self.buffers[i])
                spans.append(self.spans[i])
        return tensors, spans

    def learn_persistent(self, outputs: list):
        """Per output ``(is the VM's own storage, bytes)``; None until a thread's second call.

        The first call's outputs are kept alive over the second, so an output at the same
        address in both is not a reused pool block but storage the VM keeps (a constant).
        Outputs have static shapes, so their sizes are learnt once too.
        """
        if self._probe is None:
            self._probe = [t.data_ptr() for t in outputs], list(outputs)
            return None
        first, _ = self._probe
        self._probe = None
        return [(t.data_ptr() == p, t.numel() * t.dtype.itemsize) for t, p in zip(outputs, first)]


#: The data alignment TVM's generated code assumes for its tensor arguments (bytes).
ALIGNMENT = 64

#: Inputs smaller than this are always copied into the thread's buffer (a copy of up to
#: 32 KiB takes about as long as checking that an array may be read in place).
ZERO_COPY_MIN_BYTES = 32 * 1024


def span(arr: np.ndarray) -> tuple:
    ptr = arr.ctypes.data
    return ptr, ptr + arr.nbytes


def aligned_empty(shape, dtype) -> np.ndarray:
    """A zero-filled numpy array of ``shape`` whose data is :data:`ALIGNMENT`-byte aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def to_numpy(tensor, copy: bool) -> np.ndarray:
    """The CPU ``tensor`` as numpy: a view when ``copy`` is False (it keeps the tensor alive)."""
    if not copy:
        try:
            return np.from_dlpack(tensor)
        except (BufferError, TypeError, ValueError):  # a dtype DLPack/numpy cannot share
            pass
    return tensor.numpy()


def flatten_tensors(value) -> list:
    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    out = []
    for item in value:
        out.extend(flatten_tensors(item))
    return out


def flatten(value) -> list:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(flatten(item))
    return out
