"""Hand-assembled PyTorch checkpoints (zip and legacy layouts) with full control over each
tensor's geometry, so tests can write the hostile files torch.save never would. Pickle
protocol 2 opcodes, written out: no torch needed."""

import io
import pickle
import struct
import zipfile

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    data = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "little", signed=True)
    if len(data) > 255:
        return b"\x8b" + struct.pack("<I", len(data)) + data  # LONG4
    return b"\x8a" + bytes([len(data)]) + data  # LONG1: any sign


def _obj(value) -> bytes:
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, str):
        return _str(value)
    if isinstance(value, (tuple, list)):
        return b"(" + b"".join(_obj(v) for v in value) + b"t"
    raise TypeError(type(value))


def tensor(key, offset, size, stride, storage_type="FloatStorage", numel=4, legacy=False,
           view=None) -> bytes:
    """The opcodes of one `_rebuild_tensor_v2(storage, offset, size, stride, ...)` call. Zip
    files' persistent ids have 5 fields, legacy files' 6 (numel and a (key, offset, size) view)."""
    pid = b"(" + _str("storage") + _global("torch", storage_type) + _str(str(key)) + _str("cpu")
    pid += _int(numel)
    if legacy:
        pid += _obj(view) if view is not None else b"N"
    pid += b"tQ"  # TUPLE, BINPERSID
    args = b"(" + pid + _obj(offset) + _obj(size) + _obj(stride) + b"\x89"
    args += _global("collections", "OrderedDict") + b")R" + b"t"
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def state_pickle(entries: dict[str, bytes]) -> bytes:
    """A dict {name: opcodes of the value} as a whole pickle."""
    body = b"".join(_str(name) + value for name, value in entries.items())
    return b"\x80\x02}" + (b"(" + body + b"u" if entries else b"") + b"."


def write_zip(path, pkl: bytes, storages: dict[str, bytes], compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr("archive/data.pkl", pkl)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return str(path)


def legacy_bytes(obj_pickle: bytes, storages: list[tuple[str, int, bytes]]) -> bytes:
    """Legacy torch.save layout: magic, protocol, sys info, the object pickle, the key list,
    then per storage an int64 element count and its bytes (count, data given separately so
    tests can make them disagree)."""
    out = io.BytesIO()
    for head in (LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(head, out, protocol=2)
    out.write(obj_pickle)
    pickle.dump([key for key, _, _ in storages], out, protocol=2)
    for _, count, data in storages:
        out.write(struct.pack("<q", count) + data)
    return out.getvalue()
