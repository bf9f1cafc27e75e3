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
"""

import collections
import io
import pickle
import pickletools
import zipfile

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


class UnsafePickleError(ValueError):
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


def _rebuild_tensor(storage, offset, size, stride, *unused):
    del unused  # requires_grad, backward hooks, metadata
    if not size:
        return storage[offset].copy()
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
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


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _storage_type(name)
        if module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        raise UnsafePickleError(f"checkpoint pickle references {module}.{name}, refused")

    def persistent_load(self, pid):
        kind, storage_type, key = pid[0], pid[1], pid[2]
        if kind != "storage":
            raise UnsafePickleError(f"unknown persistent id {pid[:1]}")
        dtype = _storage_dtype(storage_type)
        return np.frombuffer(self._storages(str(key)), dtype=dtype)


def _storage_dtype(storage_type) -> np.dtype:
    name = storage_type[1] if isinstance(storage_type, tuple) else str(storage_type)
    dtype = _STORAGE_DTYPES.get(name)
    if dtype is None:
        raise UnsafePickleError(f"unsupported storage type {name}")
    return np.dtype(dtype).newbyteorder("<")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _LegacyUnpickler(_Unpickler):
    """The object pickle of a legacy file. `storages=None`: a dry run that only records each
    storage's (dtype, numel) in `found` and builds no tensor."""

    def __init__(self, file, storages):
        super().__init__(file, storages)
        self.found: dict[str, tuple[np.dtype, int]] = {}

    def find_class(self, module, name):
        if self._storages is None and module == "torch._utils" and (module, name) in _ALLOWED:
            return lambda *args: None
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id {str(pid)[:40]}")
        _, storage_type, key, _location, numel, view = pid
        dtype = _storage_dtype(storage_type)
        self.found[str(key)] = (dtype, int(numel))
        if self._storages is None:
            return None
        data = np.frombuffer(self._storages(str(key)), dtype=dtype)
        if view is not None:  # (view key, offset, size) in elements of the root storage
            _, offset, size = view
            data = data[int(offset) : int(offset) + int(size)]
        return data


def _load_legacy(path: str):
    with open(path, "rb") as f:
        try:
            magic, protocol, _ = (_Unpickler(f, None).load() for _ in range(3))
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError):
            magic = protocol = None
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: neither a PyTorch zip checkpoint nor a legacy torch file")
        start = f.tell()
        for _ in pickletools.genops(f):  # finds the object pickle's end; executes nothing
            pass
        end = f.tell()
        keys = _Unpickler(f, None).load()
        position = f.tell()  # the first storage's element count
        f.seek(start)
        obj_pickle = f.read(end - start)
        dry = _LegacyUnpickler(io.BytesIO(obj_pickle), None)
        dry.load()
        offsets = {}
        for key in map(str, keys):
            if key not in dry.found:
                raise ValueError(f"{path}: storage {key} is listed but never used")
            dtype, numel = dry.found[key]
            f.seek(position)
            count = int.from_bytes(f.read(8), "little", signed=True)
            if count != numel:
                raise ValueError(f"{path}: storage {key} holds {count} elements, not {numel}")
            offsets[key] = (position + 8, numel * dtype.itemsize)
            position += 8 + numel * dtype.itemsize

        def storage(key):
            if key not in offsets:
                raise ValueError(f"{path}: no storage {key} in the file")
            offset, size = offsets[key]
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated (storage {key})")
            return data

        return _LegacyUnpickler(io.BytesIO(obj_pickle), storage).load()


def load(path: str, pickle_name: str = "data.pkl"):
    """Loads the object pickled as `<root>/<pickle_name>` in a PyTorch zip file, or the object
    of a legacy (pre-1.6, non-zip) torch.save file.

    Tensors become numpy arrays; TorchScript objects become ScriptObject with `.state`.
    """
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if not is_zip:
        return _load_legacy(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a PyTorch zip checkpoint ({e})") from None
    with archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/" + pickle_name) and n.count("/") == 1]
        if not pkl:
            raise ValueError(f"{path}: no {pickle_name} in the archive")
        root = pkl[0].split("/")[0]

        def storage(key):
            return archive.read(f"{root}/data/{key}")

        return _Unpickler(io.BytesIO(archive.read(pkl[0])), storage).load()
