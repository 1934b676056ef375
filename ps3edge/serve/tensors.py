"""How a served model declares its tensors: one declaration that both the PyTriton binding and the
stand-alone model repository's config.pbtxt are written from, and the per-request error output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ERROR = "error"                         # BYTES (1,): empty when the request was answered


@dataclass(frozen=True)
class TensorDecl:
    """One input or output, without the batch dimension (-1: any size)."""
    name: str
    dtype: Any                           # bytes, np.float32, np.uint8
    shape: tuple[int, ...]
    optional: bool = False

    @property
    def triton_type(self) -> str:
        """The data type as config.pbtxt spells it."""
        return {bytes: "TYPE_STRING", np.float32: "TYPE_FP32", np.uint8: "TYPE_UINT8"}[self.dtype]


def error_output() -> TensorDecl:
    return TensorDecl(ERROR, bytes, (1,))


def text_array(text: str) -> np.ndarray:
    """A one-string response tensor with its batch dimension: (1, 1) of bytes."""
    return np.array([[text.encode("utf-8")]], dtype=object)


def failed(message: str) -> dict:
    """The response of a request that could not be answered: only its `error`, naming the problem."""
    return {ERROR: text_array(message)}


def one_string(request, name: str, what: str) -> bytes:
    """The single BYTES value of input `name` in one request (its batch dimension included)."""
    from ..errors import Ps3EdgeError

    value = request.data.get(name)
    if value is None:
        raise Ps3EdgeError(f"the request has no '{name}' input ({what})")
    value = np.asarray(value, dtype=object).reshape(-1)
    if value.size != 1:
        raise Ps3EdgeError(f"send one {what} per request; this request's '{name}' holds {value.size}")
    raw = value[0]
    return raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
