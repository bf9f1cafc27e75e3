"""Reading PyTorch checkpoints (torch.save zip and legacy files, TorchScript archives) without
torch.

Pickles in these files are read with an unpickler that can only build plain containers,
numpy arrays from the file's raw storages, and inert placeholders for TorchScript module
classes: no code from the file is ever executed. Tensors come back as numpy arrays.

Legacy files (torch.save before PyTorch 1.6, or `_use_new_zipfile_serialization=False`) are
five consecutive pickles: the magic number, the protocol version (1001), a sys-info dict, the
object (tensors refer to storages by persistent id ("storage", type, key, location, numel,
view)), and the list of storage keys; then, per key in that order, an int64 element count
and the raw little-endian bytes. The object pickle is read twice: first only to learn each
storage's dtype (so the byte offsets can be computed), then to build the arrays.

Every file is treated as hostile: each tensor's geometry (offset, size, stride) is checked
against its storage before any array is made (no view can reach memory outside the file's
bytes), declared sizes are bounded, and whatever a damaged or crafted file makes the
unpickler or the zip reader raise comes back as one `CheckpointFormatError` line naming the
file and, where known, the storage.
"""

import collections
import functools
import io
import math
import pickle
import pickletools
import struct
import zipfile
import zlib

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


# Everything one load may materialise (tensor copies, lists, sets, dicts the pickle builds):
# 4x the file's size plus this allowance. A stride-0 (expanded) tensor or a memoised value
# rebuilt many times must not turn a few bytes of file into gigabytes.
MAX_EXPANDED_BYTES = 64 << 20
_MAX_DIMS = 64
_MAX_INDEX = 1 << 62  # offsets, sizes and strides: bounded before any arithmetic


class CheckpointFormatError(ValueError):
    """A damaged or inconsistent checkpoint: one line naming the file (and the storage)."""


class UnsafePickleError(CheckpointFormatError):
    """The checkpoint's pickle asks for something other than tensors and containers."""


class ScriptObject:
    """Inert stand-in for a TorchScript module/class: keeps its pickled state, runs nothing.

    Each TorchScript class name gets its own subclass (see `_script_class`), so `qualname`
    says which module the state belongs to.
    """

    qualname = "?"
    state = None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"ScriptObject({self.qualname})"


def _script_class(qualname: str) -> type:
    return type("ScriptObject", (ScriptObject,), {"qualname": qualname})


def _storage_type(name):
    return ("storage", name)


def _short(value) -> str:
    """A value from the file, for an error line: short strings and bounded ints as they are,
    anything else by its type (formatting an attacker-built nested object can take forever)."""
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 64:
        return str(value)
    return type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index(value, what: str, where: str) -> int:
    if not _is_int(value) or abs(value) >= _MAX_INDEX:
        raise CheckpointFormatError(f"{where}: {what} {_short(value)} is not a valid integer")
    return value


def _index_tuple(value, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
        raise CheckpointFormatError(f"{where}: {what} is not a tuple of at most {_MAX_DIMS} ints")
    if not all(_is_int(v) and abs(v) < _MAX_INDEX for v in value):
        raise CheckpointFormatError(f"{where}: {what} is not a tuple of integers")
    return tuple(value)


class _Budget:
    """Bytes one load may still materialise (see MAX_EXPANDED_BYTES)."""

    def __init__(self, limit: int):
        self.left = limit

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise CheckpointFormatError(
                f"{what}: the file asks for more memory than a checkpoint of its size can hold"
            )


def _charged(build, budget: _Budget, what: str):
    """A container builder the pickle may call, each call charged 16 bytes per element."""

    def call(*args):
        for arg in args[:1]:
            if hasattr(arg, "__len__"):
                budget.charge(16 * len(arg), what)
        return build(*args)

    return call


def _rebuild_tensor(storage, offset, size, stride, *unused, names=None, budget=None):
    """A tensor as a numpy array copied out of `storage`, after checking that every element
    the view addresses lies inside the storage (Python ints: no overflow)."""
    del unused  # requires_grad, backward hooks, metadata
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointFormatError("a tensor is built on something that is not a storage")
    where = f"tensor on storage {(names or {}).get(id(storage), '?')}"
    offset = _index(offset, "offset", where)
    size = _index_tuple(size, "size", where)
    stride = _index_tuple(stride, "stride", where)
    if len(size) != len(stride):
        raise CheckpointFormatError(f"{where}: size {size} and stride {stride} differ in length")
    if any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise CheckpointFormatError(f"{where}: negative size {size} or stride {stride}")
    numel = math.prod(size)
    if numel == 0:
        if not 0 <= offset <= storage.size:
            raise CheckpointFormatError(f"{where}: offset {offset} outside {storage.size} elements")
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.size:
        raise CheckpointFormatError(
            f"{where}: view (offset {offset}, size {size}, stride {stride}) reaches element "
            f"{last if offset >= 0 else offset} of a storage of {storage.size}"
        )
    if numel > storage.size and numel * storage.itemsize > MAX_EXPANDED_BYTES:
        raise CheckpointFormatError(
            f"{where}: size {size} declares {numel} elements over a storage of {storage.size}"
        )
    if budget is not None:
        budget.charge(numel * storage.itemsize, where)
    if not size:
        return storage[offset].copy()
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, *unused):
    del unused
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("builtins", "set"): set,
    # TorchScript archives wrap lists of attributes in these helpers.
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "build_genericlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str: value,
}


_BUILDERS = {  # containers the pickle may build: charged to the load's budget
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("torch.jit._pickle", "build_intlist"),
    ("torch.jit._pickle", "build_doublelist"),
    ("torch.jit._pickle", "build_boollist"),
    ("torch.jit._pickle", "build_tensorlist"),
    ("torch.jit._pickle", "build_genericlist"),
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages, budget: _Budget | None = None):
        super().__init__(file)
        self._storages = storages
        self._budget = budget or _Budget(MAX_EXPANDED_BYTES)
        self._names: dict[int, str] = {}  # id(storage array) -> storage key, for error lines
        self._cache: dict[tuple[str, str], np.ndarray] = {}  # each storage read once; pins ids

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return functools.partial(_rebuild_tensor, names=self._names, budget=self._budget)
        if (module, name) in _BUILDERS:
            return _charged(_ALLOWED[(module, name)], self._budget, f"{module}.{name}")
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _storage_type(name)
        if module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        raise UnsafePickleError(f"checkpoint pickle references {module}.{name}, refused")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id ({_short(pid)})")
        key, dtype = _storage_key(pid[2]), _storage_dtype(pid[1])
        return self._storage_array(key, dtype, lambda: self._storages(key))

    def _storage_array(self, key: str, dtype: np.dtype, read) -> np.ndarray:
        cached = self._cache.get((key, dtype.str))
        if cached is not None:
            return cached
        data = read()
        if len(data) % dtype.itemsize:
            raise CheckpointFormatError(
                f"storage {key}: {len(data)} bytes is not a whole number of {dtype} elements"
            )
        array = np.frombuffer(data, dtype=dtype)
        self._cache[(key, dtype.str)] = array
        self._names[id(array)] = key
        return array


def _storage_key(key) -> str:
    if isinstance(key, str) and len(key) <= 256:
        return key
    if _is_int(key) and 0 <= key < _MAX_INDEX:
        return str(key)
    raise CheckpointFormatError(f"storage key {_short(key)} is not a short string or an integer")


def _storage_dtype(storage_type) -> np.dtype:
    # find_class turns torch.<X>Storage into ("storage", "<X>Storage"); old files may use names.
    if isinstance(storage_type, tuple) and len(storage_type) == 2:
        name = storage_type[1]
    else:
        name = storage_type
    dtype = _STORAGE_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointFormatError(f"unsupported storage type {_short(name)[:60]}")
    return np.dtype(dtype).newbyteorder("<")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _LegacyUnpickler(_Unpickler):
    """The object pickle of a legacy file. `storages=None`: a dry run that only records each
    storage's (dtype, numel) in `found` and builds no tensor."""

    def __init__(self, file, storages, budget: _Budget | None = None):
        super().__init__(file, storages, budget)
        self.found: dict[str, tuple[np.dtype, int]] = {}
        self._views: list[np.ndarray] = []  # keeps ids unique for the error lines

    def find_class(self, module, name):
        if self._storages is None and module == "torch._utils" and (module, name) in _ALLOWED:
            return lambda *args: None
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id ({_short(pid)})")
        _, storage_type, key, _location, numel, view = pid
        key, dtype = _storage_key(key), _storage_dtype(storage_type)
        self.found[key] = (dtype, _index(numel, "element count", f"storage {key}"))
        if self._storages is None:
            return None
        data = self._storage_array(key, dtype, lambda: self._storages(key))
        if view is not None:  # (view key, offset, size) in elements of the root storage
            if not (isinstance(view, tuple) and len(view) == 3):
                raise CheckpointFormatError(f"storage {key}: view {_short(view)} is not a triple")
            offset = _index(view[1], "view offset", f"storage {key}")
            size = _index(view[2], "view size", f"storage {key}")
            if offset < 0 or size < 0 or offset + size > data.size:
                raise CheckpointFormatError(
                    f"storage {key}: view ({offset}, {size}) outside its {data.size} elements"
                )
            data = data[offset : offset + size]
            self._views.append(data)
            self._names[id(data)] = key
        return data


def _load_legacy(path: str, f):
    file_size = f.seek(0, io.SEEK_END)
    f.seek(0)
    try:
        magic, protocol, _ = (_Unpickler(f, None).load() for _ in range(3))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError):
        magic = protocol = None
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(
            f"{path}: neither a PyTorch zip checkpoint nor a legacy torch file"
        )
    start = f.tell()
    for _ in pickletools.genops(f):  # finds the object pickle's end; executes nothing
        pass
    end = f.tell()
    keys = _Unpickler(f, None).load()
    if not isinstance(keys, list):
        raise CheckpointFormatError(f"{path}: the storage key list is a {type(keys).__name__}")
    keys = [_storage_key(key) for key in keys]
    position = f.tell()  # the first storage's element count
    f.seek(start)
    obj_pickle = f.read(end - start)
    dry = _LegacyUnpickler(io.BytesIO(obj_pickle), None, _budget_for(file_size))
    dry.load()
    offsets = {}
    for key in keys:
        if key not in dry.found:
            raise CheckpointFormatError(f"{path}: storage {key} is listed but never used")
        dtype, numel = dry.found[key]
        f.seek(position)
        count = int.from_bytes(f.read(8), "little", signed=True)
        if count != numel:
            raise CheckpointFormatError(f"{path}: storage {key} holds {count} elements, not {numel}")
        nbytes = numel * dtype.itemsize
        if numel < 0 or position + 8 + nbytes > file_size:
            raise CheckpointFormatError(
                f"{path}: truncated (storage {key} declares {numel} elements past the file's end)"
            )
        offsets[key] = (position + 8, nbytes)
        position += 8 + nbytes

    def storage(key):
        if key not in offsets:
            raise CheckpointFormatError(f"{path}: no storage {key} in the file")
        offset, size = offsets[key]
        f.seek(offset)
        return f.read(size)  # in the file: checked above

    return _LegacyUnpickler(io.BytesIO(obj_pickle), storage, _budget_for(file_size)).load()


def _budget_for(file_size: int) -> _Budget:
    return _Budget(4 * file_size + MAX_EXPANDED_BYTES)


# Torch writes its archives uncompressed; a deflated entry may expand, but not without bound.
_MAX_EXPANSION = 100
_READ_CHUNK = 1 << 20


def _load_zip(path: str, archive: zipfile.ZipFile, pickle_name: str, file_size: int):
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/" + pickle_name) and n.count("/") == 1]
    if not pkl:
        raise CheckpointFormatError(f"{path}: no {pickle_name} in the archive")
    root = pkl[0].split("/")[0]

    def read(name: str) -> bytes:
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise CheckpointFormatError(f"{path}: no {name[:300]} in the archive") from None
        if info.flag_bits & 0x1:
            raise CheckpointFormatError(f"{path}: {name} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointFormatError(
                f"{path}: {name} uses compression method {info.compress_type} (torch writes "
                "entries stored; deflate is also read)"
            )
        if info.file_size > _MAX_EXPANSION * info.compress_size + _READ_CHUNK:
            raise CheckpointFormatError(
                f"{path}: {name} declares {info.file_size} bytes from {info.compress_size}"
            )
        chunks, total = [], 0
        with archive.open(info) as entry:  # in chunks: no single huge decompression buffer
            while chunk := entry.read(_READ_CHUNK):
                total += len(chunk)
                if total > info.file_size:
                    raise CheckpointFormatError(f"{path}: {name} is longer than it declares")
                chunks.append(chunk)
        return b"".join(chunks)

    unpickler = _Unpickler(io.BytesIO(read(pkl[0])), lambda key: read(f"{root}/data/{key}"),
                           _budget_for(file_size))  # fmt: skip
    return unpickler.load()


# What a damaged or crafted file can make the zip reader or the unpickler raise.
_DAMAGE = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    MemoryError,
    RecursionError,
    RuntimeError,
    NotImplementedError,
    UnicodeDecodeError,
    struct.error,
)


def load(path: str, pickle_name: str = "data.pkl"):
    """Loads the object pickled as `<root>/<pickle_name>` in a PyTorch zip file, or the object
    of a legacy (pre-1.6, non-zip) torch.save file.

    Tensors become numpy arrays; TorchScript objects become ScriptObject with `.state`.
    Raises CheckpointFormatError (a ValueError; UnsafePickleError for refused code) with one
    line naming the file for anything unreadable, damaged, inconsistent or hostile.
    """
    try:
        with open(path, "rb") as f:
            file_size = f.seek(0, io.SEEK_END)
            f.seek(0)
            # torch's own test: a zip checkpoint starts with a local file header (an end-of-
            # archive record found anywhere, as zipfile.is_zipfile looks, could be tensor bytes).
            if f.read(4) != b"PK\x03\x04":
                return _load_legacy(path, f)
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                return _load_zip(path, archive, pickle_name, file_size)
    except CheckpointFormatError as e:
        message = str(e) if str(e).startswith(f"{path}:") else f"{path}: {e}"
        raise type(e)(message) from None
    except _DAMAGE as e:
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointFormatError(
            f"{path}: damaged or unreadable checkpoint ({type(e).__name__}: {detail})"
        ) from None
