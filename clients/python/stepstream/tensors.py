"""Wire tensors (``stepstream.v1.Tensor``: dtype, shape, little-endian C-order bytes) to and from
torch tensors or numpy arrays.

Two formats reach a callback:

* ``"torch"``: :class:`torch.Tensor` (CPU), in the wire dtype (f32, f16 or bf16).
* ``"numpy"``: :class:`TensorArray`, a :class:`numpy.ndarray` subclass that also has the few
  torch methods diffusers callbacks use (``chunk``, ``clone``, ``detach``, ``cpu``, ``dim``,
  ``numpy``), so that a callback written for torch runs unchanged. bf16 arrives as f32 (numpy has
  no bf16).

``"auto"`` is torch when it can be imported, numpy otherwise.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from .v1 import stepstream_pb2 as pb

__all__ = ["TensorArray", "resolve_format", "decode", "encode", "is_tensor"]

DTYPE_NAMES = {pb.DTYPE_F32: "f32", pb.DTYPE_F16: "f16", pb.DTYPE_BF16: "bf16"}
_WIRE_BY_NAME = {"f32": pb.DTYPE_F32, "f16": pb.DTYPE_F16, "bf16": pb.DTYPE_BF16}
_LITTLE = sys.byteorder == "little"


class TensorArray(np.ndarray):
    """A numpy array with the torch methods that diffusers callbacks commonly call."""

    def chunk(self, chunks: int, dim: int = 0) -> tuple:
        """``torch.chunk``: pieces of ``ceil(n / chunks)`` along ``dim`` (the last may be
        smaller), as views."""
        if chunks <= 0:
            raise ValueError("chunk expects `chunks` to be greater than 0")
        n = self.shape[dim]
        size = -(-n // chunks) if n else 0
        if size == 0:
            return (self,)
        index = [slice(None)] * self.ndim
        out = []
        for start in range(0, n, size):
            index[dim] = slice(start, start + size)
            out.append(self[tuple(index)])
        return tuple(out)

    def clone(self) -> "TensorArray":
        """A copy (``torch.Tensor.clone``)."""
        return self.copy()

    def detach(self) -> "TensorArray":
        """Itself (``torch.Tensor.detach``)."""
        return self

    def cpu(self) -> "TensorArray":
        """Itself (``torch.Tensor.cpu``)."""
        return self

    def numpy(self) -> np.ndarray:
        """A plain :class:`numpy.ndarray` view."""
        return self.view(np.ndarray)

    def dim(self) -> int:
        """The number of dimensions (``torch.Tensor.dim``)."""
        return self.ndim


def _torch():
    try:
        import torch  # noqa: F401

        return torch
    except ImportError:
        return None


def resolve_format(fmt: str) -> str:
    """``"auto"`` → ``"torch"`` when torch imports, else ``"numpy"``; checks the name."""
    if fmt == "auto":
        return "torch" if _torch() is not None else "numpy"
    if fmt == "torch":
        if _torch() is None:
            raise ImportError("tensor_format='torch' needs torch installed (or use 'numpy')")
        return fmt
    if fmt == "numpy":
        return fmt
    raise ValueError(f"tensor_format must be 'auto', 'torch' or 'numpy', not {fmt!r}")


def wire_dtype(name) -> int:
    """A wire dtype from ``"f32"``/``"f16"``/``"bf16"`` (or the enum value itself)."""
    if name is None:
        return pb.DTYPE_F32
    if isinstance(name, int):
        return name
    try:
        return _WIRE_BY_NAME[str(name).replace("float", "f").replace("bfloat", "bf")]
    except KeyError:
        raise ValueError(f"wire dtype must be f32, f16 or bf16, not {name!r}") from None


def _numpy_of_wire(t: pb.Tensor) -> np.ndarray:
    shape = tuple(int(d) for d in t.shape)
    buf = bytearray(t.data)  # a writable copy: callbacks may modify tensors in place
    if t.dtype == pb.DTYPE_F32:
        a = np.frombuffer(buf, dtype="<f4")
    elif t.dtype == pb.DTYPE_F16:
        a = np.frombuffer(buf, dtype="<f2")
    elif t.dtype == pb.DTYPE_BF16:
        a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError(f"unknown wire dtype {t.dtype}")
    if not _LITTLE:  # pragma: no cover
        a = a.astype(a.dtype.newbyteorder("="))
    return a.reshape(shape)


def decode(t: pb.Tensor, fmt: str) -> Any:
    """A wire tensor as a torch tensor or a :class:`TensorArray` (``fmt`` already resolved)."""
    if fmt == "torch":
        torch = _torch()
        if t.dtype == pb.DTYPE_BF16:
            return torch.frombuffer(bytearray(t.data), dtype=torch.bfloat16).reshape(
                tuple(int(d) for d in t.shape)
            )
        return torch.from_numpy(_numpy_of_wire(t))
    return _numpy_of_wire(t).view(TensorArray)


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor or a numpy array."""
    if isinstance(x, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def encode(x: Any, dtype: int = pb.DTYPE_F32) -> pb.Tensor:
    """A torch tensor, numpy array or nested sequence as a wire tensor in ``dtype``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
        target = {
            pb.DTYPE_F32: torch.float32,
            pb.DTYPE_F16: torch.float16,
            pb.DTYPE_BF16: torch.bfloat16,
        }[dtype]
        t = t.to(target).contiguous()
        shape = list(t.shape)
        if dtype == pb.DTYPE_BF16:
            data = t.view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            data = t.numpy().astype("<f4" if dtype == pb.DTYPE_F32 else "<f2").tobytes()
        return pb.Tensor(dtype=dtype, shape=shape, data=data)
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"cannot send a tensor of dtype {a.dtype}")
    shape = list(a.shape)
    if dtype == pb.DTYPE_F32:
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    elif dtype == pb.DTYPE_F16:
        data = np.ascontiguousarray(a, dtype="<f2").tobytes()
    elif dtype == pb.DTYPE_BF16:
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        # Round to nearest even, as torch does.
        data = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
    else:
        raise ValueError(f"unknown wire dtype {dtype}")
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def same(a: pb.Tensor, b: pb.Tensor) -> bool:
    """Whether two wire tensors hold the same dtype, shape and bytes."""
    return a.dtype == b.dtype and list(a.shape) == list(b.shape) and a.data == b.data


def to_numpy(t: pb.Tensor) -> np.ndarray:
    """A wire tensor as a plain numpy array (bf16 as f32)."""
    return _numpy_of_wire(t)


def shape_of(x: Any) -> Sequence[int]:
    """The shape of a tensor or array, as a tuple."""
    return tuple(x.shape)
