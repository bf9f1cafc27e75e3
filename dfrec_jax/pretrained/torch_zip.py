"""Reading PyTorch zip checkpoints (torch.save and TorchScript archives) without torch.

Pickles in these files are read with an unpickler that can only build plain containers,
numpy arrays from the archive's raw storages, and inert placeholders for TorchScript module
classes: no code from the file is ever executed. Tensors come back as numpy arrays.
"""

import collections
import io
import pickle
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
        name = storage_type[1] if isinstance(storage_type, tuple) else str(storage_type)
        dtype = _STORAGE_DTYPES.get(name)
        if dtype is None:
            raise UnsafePickleError(f"unsupported storage type {name}")
        return np.frombuffer(self._storages(str(key)), dtype=np.dtype(dtype).newbyteorder("<"))


def load(path: str, pickle_name: str = "data.pkl"):
    """Loads the object pickled as `<root>/<pickle_name>` in a PyTorch zip file.

    Tensors become numpy arrays; TorchScript objects become ScriptObject with `.state`.
    """
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
