"""A reader for dlib's serialization format (the .dat files of dlib's DNN models), without dlib.

Primitives (dlib/serialize.h):
- integer: one control byte (low nibble = number of bytes that follow, 0x80 = negative) and
  then the magnitude in little-endian bytes; zero is written as 0x01 0x00.
- float: two integers, mantissa (int64) and exponent (int16); value = mantissa * 2**exponent,
  with exponents 32000/32001/32002 meaning +inf/-inf/nan.
- string: integer length, then the bytes. bool: the ASCII byte '1' or '0'.
- tensor (dlib/cuda/tensor.h): version 2, num_samples, k, nr, nc, then raw little-endian float32.
  An alias_tensor (a view into a layer's params) stores version 1 and its four dimensions.

A network is serialized from the loss layer inwards: the loss details, then one version
integer per wrapper (add_layer, add_tag_layer, add_skip_layer) down to the innermost add_layer
that holds the input layer; then, unwinding outwards, each add_layer's own details. So the
layer details come in forward (input-to-output) order. Tag and skip wrappers store no ID, so
the topology is not in the file: the caller names the wrapper kinds (`read_network`).
"""

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

_INF, _NINF, _NAN = 32000, 32001, 32002


class DlibFormatError(ValueError):
    """A file that is not the expected dlib network: one line naming the file and byte offset."""


class Decoder:
    """Reads dlib primitives from a byte string, keeping the offset for error messages."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self.data = memoryview(data)
        self.name = name
        self.offset = 0

    def error(self, what: str, at: int | None = None) -> DlibFormatError:
        at = self.offset if at is None else at
        return DlibFormatError(
            f"{self.name}: {what} at byte {at} of {len(self.data)} (truncated or corrupt file?)"
        )

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.offset + n > len(self.data):
            raise self.error(f"need {n} bytes for {what}, only {len(self.data) - self.offset} left")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def integer(self, signed: bool = True, what: str = "an integer") -> int:
        start = self.offset
        control = self._take(1, what)[0]
        size, negative = control & 0x0F, bool(control & 0x80)
        if control & 0x70 or size == 0 or size > 8 or (negative and not signed):
            raise self.error(f"bad control byte 0x{control:02x} for {what}", start)
        value = int.from_bytes(self._take(size, what), "little")
        return -value if negative else value

    def float(self, what: str = "a float") -> float:
        start = self.offset
        if self.offset < len(self.data) and self.data[self.offset] & 0x70:
            raise self.error(f"old ASCII float format (unsupported) for {what}", start)
        mantissa = self.integer(what=what)
        exponent = self.integer(what=what)
        if not -(2**63) <= mantissa < 2**63 or not -(2**15) <= exponent < 2**15:
            raise self.error(f"{what} out of range", start)
        if exponent == _INF:
            return math.inf
        if exponent == _NINF:
            return -math.inf
        if exponent == _NAN:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def string(self, what: str = "a string", max_len: int = 1 << 16) -> str:
        start = self.offset
        n = self.integer(signed=False, what=what)
        if n > max_len:
            raise self.error(f"implausible length {n} for {what}", start)
        raw = bytes(self._take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"non-ASCII bytes in {what}", start) from None

    def boolean(self, what: str = "a bool") -> bool:
        start = self.offset
        byte = self._take(1, what)[0]
        if byte not in (0x30, 0x31):
            raise self.error(f"bad byte 0x{byte:02x} for {what} (expected '0' or '1')", start)
        return byte == 0x31

    def _dims(self, version: int, what: str) -> tuple[int, int, int, int]:
        start = self.offset
        got = self.integer(what=what)
        if got != version:
            raise self.error(f"{what} has version {got}, expected {version}", start)
        dims = tuple(self.integer(what=what) for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.error(f"negative dimension {dims} in {what}", start)
        return dims

    def tensor(self, what: str = "a tensor") -> np.ndarray:
        """A float32 array of shape (num_samples, k, nr, nc)."""
        dims = self._dims(2, what)
        raw = self._take(4 * math.prod(dims), what)
        return np.frombuffer(raw, "<f4").astype(np.float32).reshape(dims)

    def alias_tensor(self, what: str = "an alias tensor") -> tuple[int, int, int, int]:
        return self._dims(1, what)

    def expect(self, value: int, what: str) -> int:
        start = self.offset
        got = self.integer(what=what)
        if got != value:
            raise self.error(f"{what}: found {got}, expected {value}", start)
        return got

    def end(self) -> None:
        if self.offset != len(self.data):
            raise self.error(f"{len(self.data) - self.offset} unexpected bytes after the network")


def encode_integer(value: int, signed: bool = True) -> bytes:
    """dlib's integer encoding (the inverse of Decoder.integer); used by tests."""
    if value < 0 and not signed:
        raise ValueError("negative value for an unsigned integer")
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def encode_float(value: float) -> bytes:
    """dlib's float encoding for a float32 value: 24-bit mantissa and a power of two."""
    if math.isnan(value):
        return encode_integer(0) + encode_integer(_NAN)
    if math.isinf(value):
        return encode_integer(0) + encode_integer(_INF if value > 0 else _NINF)
    fraction, exponent = math.frexp(value)
    return encode_integer(int(fraction * (1 << 24))) + encode_integer(exponent - 24)


def encode_string(value: str) -> bytes:
    raw = value.encode("ascii")
    return encode_integer(len(raw), signed=False) + raw


@dataclasses.dataclass
class Layer:
    """One layer's details as stored: `type` is the layer kind, `version` the stored tag."""

    type: str
    version: str = ""
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)


def _params(d: Decoder, params: np.ndarray, shapes: Sequence[tuple], what: str) -> list:
    """Splits a layer's flat params tensor into arrays of the alias shapes, in order."""
    flat, out, start = params.reshape(-1), [], 0
    for shape in shapes:
        n = math.prod(shape)
        if start + n > flat.size:
            raise d.error(f"{what}: params tensor of {flat.size} values too small for {shape}")
        out.append(flat[start : start + n].reshape(shape))
        start += n
    if start != flat.size:
        raise d.error(f"{what}: params tensor has {flat.size} values, its views use {start}")
    return out


def _multipliers(d: Decoder) -> None:
    for _ in range(4):  # learning-rate and weight-decay multipliers: training-only
        d.float("a learning-rate multiplier")


def _con(d: Decoder, version: str) -> Layer:
    params = d.tensor("con_ params")
    f = {"num_filters": d.integer(what="con_ num_filters")}
    f["nr"], f["nc"] = d.integer(what="con_ nr"), d.integer(what="con_ nc")
    f["stride"] = (d.integer(what="con_ stride"), d.integer(what="con_ stride"))
    f["padding"] = (d.integer(what="con_ padding"), d.integer(what="con_ padding"))
    filters, biases = d.alias_tensor("con_ filters"), d.alias_tensor("con_ biases")
    _multipliers(d)
    f["use_bias"] = d.boolean("con_ use_bias") if version in ("con_5", "con_6") else True
    if version == "con_6":
        f["use_relu"] = d.boolean("con_ use_relu")
    f["filters"], *rest = _params(d, params, [filters] + [biases] * f["use_bias"], version)
    f["biases"] = rest[0].reshape(-1) if rest else None
    return Layer("con", version, f)


def _affine(d: Decoder, version: str) -> Layer:
    params = d.tensor("affine_ params")
    gamma, beta = d.alias_tensor("affine_ gamma"), d.alias_tensor("affine_ beta")
    mode = d.integer(what="affine_ mode")
    disabled = d.boolean("affine_ disabled") if version == "affine_2" else False
    g, b = _params(d, params, [gamma, beta], version) if not disabled else (None, None)
    return Layer("affine", version, {"gamma": g, "beta": b, "mode": mode, "disabled": disabled})


def _relu(d: Decoder, version: str) -> Layer:
    return Layer(
        "relu", version, {"disabled": d.boolean("relu_ disabled")} if version == "relu_2" else {}
    )


def _pool(kind: str) -> Callable[[Decoder, str], Layer]:
    def read(d: Decoder, version: str) -> Layer:
        f = {"nr": d.integer(what=f"{kind} nr"), "nc": d.integer(what=f"{kind} nc")}
        f["stride"] = (d.integer(what=f"{kind} stride"), d.integer(what=f"{kind} stride"))
        f["padding"] = (d.integer(what=f"{kind} padding"), d.integer(what=f"{kind} padding"))
        return Layer(kind, version, f)

    return read


def _fc(d: Decoder, version: str) -> Layer:
    f = {"num_outputs": d.integer(False, "fc_ num_outputs")}
    f["num_inputs"] = d.integer(False, "fc_ num_inputs")
    params = d.tensor("fc_ params")
    weights, biases = d.alias_tensor("fc_ weights"), d.alias_tensor("fc_ biases")
    f["bias_mode"] = d.integer(what="fc_ bias mode")  # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
    _multipliers(d)
    use_bias = d.boolean("fc_ use_bias") if version == "fc_3" else True
    f["use_bias"] = f["bias_mode"] == 0 and use_bias
    f["weights"], *rest = _params(d, params, [weights] + [biases] * f["use_bias"], version)
    f["biases"] = rest[0].reshape(-1) if rest else None
    return Layer("fc", version, f)


def _loss_metric(d: Decoder, version: str) -> Layer:
    if version == "loss_metric_":  # the old format had these hard-coded
        return Layer("loss_metric", version, {"margin": 0.1, "distance_threshold": 0.75})
    f = {"margin": d.float("loss_metric_ margin")}
    f["distance_threshold"] = d.float("loss_metric_ distance threshold")
    return Layer("loss_metric", version, f)


def _input_rgb_image_sized(d: Decoder, version: str) -> Layer:
    mean = tuple(d.float("input mean") for _ in range(3))
    nr, nc = d.integer(False, "input nr"), d.integer(False, "input nc")
    return Layer("input_rgb_image_sized", version, {"mean": mean, "nr": nr, "nc": nc})


_LAYERS: dict[str, Callable[[Decoder, str], Layer]] = {
    **dict.fromkeys(("con_4", "con_5", "con_6"), _con),
    **dict.fromkeys(("affine_", "affine_2"), _affine),
    **dict.fromkeys(("relu_", "relu_2"), _relu),
    "max_pool_2": _pool("max_pool"),
    "avg_pool_2": _pool("avg_pool"),
    "add_prev_": lambda d, v: Layer("add_prev", v),
    **dict.fromkeys(("fc_2", "fc_3"), _fc),
}
_LOSSES = {"loss_metric_": _loss_metric, "loss_metric_2": _loss_metric}
_INPUTS = {"input_rgb_image_sized": _input_rgb_image_sized}


def _details(d: Decoder, table: dict, what: str) -> Layer:
    start = d.offset
    version = d.string(f"the {what} type name", max_len=256)
    if version not in table:
        raise d.error(f"unknown {what} type {version!r}", start)
    return table[version](d, version)


@dataclasses.dataclass
class Network:
    """A parsed network: `layers` in forward order, tag and skip wrappers included by kind."""

    loss: Layer
    input: Layer
    layers: list[Layer]


def read_network(path: str, wrappers: Sequence[str], data: bytes | None = None) -> Network:
    """Parses a dlib DNN file whose wrappers, outermost first, are `wrappers`.

    Each wrapper is "layer" (add_layer), "tag" or "skip"; the last must be "layer", the
    add_layer that holds the input layer. Consumes the file to its last byte; any
    mismatch raises DlibFormatError with the file name and byte offset.
    """
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    d = Decoder(data, os.path.basename(path))
    if not wrappers or wrappers[-1] != "layer" or set(wrappers) - {"layer", "tag", "skip"}:
        raise ValueError(f"bad wrapper list {wrappers!r}")
    d.expect(1, "add_loss_layer version")
    loss = _details(d, _LOSSES, "loss layer")
    versions = []
    for i, kind in enumerate(wrappers):
        start = d.offset
        version = d.integer(what=f"the version of wrapper {i} ({kind})")
        allowed = (2, 3) if i == len(wrappers) - 1 else {"layer": (1, 2)}.get(kind, (1,))
        if version not in allowed:
            raise d.error(f"wrapper {i} ({kind}) has version {version}, expected {allowed}", start)
        versions.append(version)
    input_layer = _details(d, _INPUTS, "input layer")
    layers = []
    for i in reversed(range(len(wrappers))):  # unwind: innermost wrapper's details first
        if wrappers[i] != "layer":
            layers.append(Layer(wrappers[i]))
            continue
        layers.append(_details(d, _LAYERS, "layer"))
        for name in ("setup_called", "gradient_input_is_stale", "output_disabled"):
            d.boolean(f"add_layer {name}")
        d.tensor("add_layer x_grad")
        d.tensor("add_layer cached_output")
        if i == len(wrappers) - 1:
            d.tensor("add_layer grad_final")
            if versions[i] == 3:
                d.integer(False, "add_layer sample_expansion_factor")
        elif versions[i] == 2:
            d.tensor("add_layer params_grad")
    d.end()
    return Network(loss, input_layer, layers)
