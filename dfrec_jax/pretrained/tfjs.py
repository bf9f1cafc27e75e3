"""Reading TensorFlow.js weights (a `*weights_manifest.json` plus its binary shards) into numpy.

A manifest is a JSON list of groups; each group names its shard files (`paths`, concatenated in
order) and its tensors (`weights`: name, shape, dtype, optional `quantization`). Tensors are
packed back to back in the concatenated shards, little-endian. Quantized tensors are stored as
uint8/uint16 codes dequantised as `code * scale + min` (rounded when the original dtype is
int32, as TF.js does), or as float16 halves. Nothing here runs code from the files.
"""

import json
import os
from typing import Mapping, Sequence

import numpy as np


class TfjsError(ValueError):
    """A manifest and its shards that do not fit together: one line naming the file."""


_DTYPES = {"float32": "<f4", "int32": "<i4", "bool": "u1", "complex64": "<c8"}
_QUANT_DTYPES = {"uint8": "u1", "uint16": "<u2", "float16": "<f2"}
_STRING_LENGTH_BYTES = 4  # each string is preceded by its byte length as uint32


def read_manifest(path: str) -> list[dict]:
    """The parsed manifest at `path` (a JSON list of weight groups)."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise TfjsError(f"{path}: no such TF.js weights manifest") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TfjsError(f"{path}: not a JSON weights manifest ({e})") from None
    if not isinstance(manifest, list) or not all(
        isinstance(g, dict) and "paths" in g and "weights" in g for g in manifest
    ):
        raise TfjsError(f"{path}: expected a list of {{paths, weights}} groups")
    return manifest


def _dequantize(codes: np.ndarray, quant: Mapping, dtype: str, name: str) -> np.ndarray:
    if quant["dtype"] == "float16":
        if dtype != "float32":
            raise TfjsError(f"{name}: float16 quantization of a {dtype} tensor")
        return codes.astype(np.float32)
    if "scale" not in quant or "min" not in quant:
        raise TfjsError(f"{name}: {quant['dtype']} quantization without scale and min")
    # In float64 like the JavaScript reader, then stored at the tensor's dtype.
    values = codes.astype(np.float64) * float(quant["scale"]) + float(quant["min"])
    if dtype == "int32":
        return np.round(values).astype(np.int32)
    if dtype != "float32":
        raise TfjsError(f"{name}: {quant['dtype']} quantization of a {dtype} tensor")
    return values.astype(np.float32)


def decode_weights(
    manifest: Sequence[Mapping], buffers: Sequence[bytes], source: str = "<manifest>"
) -> dict[str, np.ndarray]:
    """{name: array} from a manifest and one concatenated byte buffer per group.

    Every buffer must be consumed exactly: a size mismatch means the wrong shards or manifest.
    """
    if len(buffers) != len(manifest):
        raise TfjsError(f"{source}: {len(manifest)} weight groups but {len(buffers)} buffers")
    out: dict[str, np.ndarray] = {}
    for gi, (group, buf) in enumerate(zip(manifest, buffers)):
        offset = 0
        for spec in group["weights"]:
            name, dtype, shape = spec["name"], spec["dtype"], tuple(int(d) for d in spec["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            quant = spec.get("quantization")
            if dtype == "string":
                values = []
                for _ in range(count):
                    (length,) = np.frombuffer(buf, "<u4", 1, offset)
                    offset += _STRING_LENGTH_BYTES
                    values.append(bytes(buf[offset : offset + int(length)]))
                    offset += int(length)
                out[name] = np.array(values, dtype=object).reshape(shape)
                continue
            if quant:
                if quant.get("dtype") not in _QUANT_DTYPES:
                    raise TfjsError(f"{source}: {name} has unknown quantization {quant}")
                stored = np.dtype(_QUANT_DTYPES[quant["dtype"]])
            elif dtype in _DTYPES:
                stored = np.dtype(_DTYPES[dtype])
            else:
                raise TfjsError(f"{source}: {name} has unsupported dtype {dtype}")
            nbytes = stored.itemsize * count
            if offset + nbytes > len(buf):
                raise TfjsError(
                    f"{source}: group {gi} shards end at byte {len(buf)} inside {name} "
                    f"(needs bytes {offset}..{offset + nbytes})"
                )
            values = np.frombuffer(buf, stored, count, offset).reshape(shape)
            offset += nbytes
            if quant:
                values = _dequantize(values, quant, dtype, name)
            elif dtype == "bool":
                values = values.astype(bool)
            else:
                values = values.astype(values.dtype.newbyteorder("="))  # native, writable copy
            if name in out:
                raise TfjsError(f"{source}: tensor {name} appears twice")
            out[name] = values
        if offset != len(buf):
            raise TfjsError(
                f"{source}: group {gi} uses {offset} bytes but its shards hold {len(buf)}"
            )
    return out


def load(manifest_path: str, shard_dir: str | None = None) -> dict[str, np.ndarray]:
    """{name: array} for the manifest at `manifest_path`; shards are looked up next to it.

    Callers that pin files by sha256 check the manifest and shards before calling this.
    """
    manifest = read_manifest(manifest_path)
    shard_dir = os.path.dirname(manifest_path) if shard_dir is None else shard_dir
    buffers = []
    for group in manifest:
        parts = []
        for rel in group["paths"]:
            path = os.path.join(shard_dir, rel)
            try:
                with open(path, "rb") as f:
                    parts.append(f.read())
            except FileNotFoundError:
                raise TfjsError(f"{manifest_path}: weight shard {path} not found") from None
        buffers.append(b"".join(parts))
    return decode_weights(manifest, buffers, source=manifest_path)


def shard_paths(manifest_path: str) -> list[str]:
    """The shard files a manifest names, as paths next to the manifest."""
    folder = os.path.dirname(manifest_path)
    return [os.path.join(folder, p) for g in read_manifest(manifest_path) for p in g["paths"]]
