"""The PyTorch checkpoint reader (pretrained/torch_zip.py) against damaged and crafted files:
every view is checked against its storage, and every bad file ends in one
CheckpointFormatError line naming it, never a crash, a traceback from deep inside, or bytes
from outside the file. Files are assembled by hand (tests/torch_pickles.py): no torch."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from dfrec_jax.pretrained import torch_zip
from tests import torch_pickles as tp

VALUES = np.arange(1, 13, dtype="<f4")  # storage "0": 12 distinct floats


def _zip(tmp_path, entries, storages=None, name="c.pth", **kw):
    storages = {"0": VALUES.tobytes()} if storages is None else storages
    return tp.write_zip(tmp_path / name, tp.state_pickle(entries), storages, **kw)


def _legacy(tmp_path, entries, storages, name="l.pth"):
    path = tmp_path / name
    path.write_bytes(tp.legacy_bytes(tp.state_pickle(entries), storages))
    return str(path)


def test_good_views_read_exactly(tmp_path):
    path = _zip(
        tmp_path,
        {
            "t": tp.tensor(0, 2, (2, 3), (1, 2), numel=12),  # transposed, offset
            "b": tp.tensor(0, 0, (3, 2), (0, 1), numel=12),  # stride 0: an expanded tensor
            "e": tp.tensor(0, 12, (0, 5), (5, 1), numel=12),  # empty, offset at the end
            "s": tp.tensor(0, 11, (), (), numel=12),  # 0-d
        },
    )
    got = torch_zip.load(path)
    np.testing.assert_array_equal(got["t"], [[3, 5, 7], [4, 6, 8]])
    np.testing.assert_array_equal(got["b"], [[1, 2]] * 3)
    assert got["e"].shape == (0, 5) and got["s"] == 12
    legacy = _legacy(
        tmp_path,
        {"v": tp.tensor(0, 1, (3,), (2,), numel=12, legacy=True, view=("0v", 4, 8))},
        [("0", 12, VALUES.tobytes())],
    )
    np.testing.assert_array_equal(torch_zip.load(legacy)["v"], [6, 8, 10])  # view 5..12


# (name, zip entries, storages, expected message): each must be refused with one line.
_ZIP_CASES = [
    ("past the end", {"w": tp.tensor(0, 0, (4096,), (1,), numel=1)}, {"0": VALUES[:1].tobytes()},
     r"storage 0: view .* reaches element 4095 of a storage of 1"),
    ("negative offset", {"w": tp.tensor(0, -8, (4,), (1,))}, None, r"reaches element -8"),
    ("huge stride", {"w": tp.tensor(0, 0, (2,), (1 << 61,))}, None, r"reaches element"),
    ("giant integers", {"w": tp.tensor(0, 1 << 4000, (2,), (1,))}, None,
     r"offset int is not a valid integer"),
    ("too many dimensions", {"w": tp.tensor(0, 0, (1,) * 65, (1,) * 65)}, None,
     r"size is not a tuple of at most 64"),
    ("offset past the end", {"w": tp.tensor(0, 12, (1,), (1,))}, None, r"reaches element 12"),
    ("giant broadcast", {"w": tp.tensor(0, 0, (1 << 20, 1 << 20), (0, 0))}, None,
     r"declares 1099511627776 elements over a storage of 12"),
    ("negative size", {"w": tp.tensor(0, 0, (-1, 4), (4, 1))}, None, r"negative size"),
    ("negative stride", {"w": tp.tensor(0, 8, (4,), (-1,))}, None, r"negative size .* or stride"),
    ("rank mismatch", {"w": tp.tensor(0, 0, (2, 2), (1,))}, None, r"differ in length"),
    ("size not ints", {"w": tp.tensor(0, 0, ("a",), (1,))}, None, r"size is not a tuple"),
    ("offset not an int", {"w": tp.tensor(0, "x", (1,), (1,))}, None, r"offset 'x'"),
    ("ragged storage", {"w": tp.tensor(0, 0, (1,), (1,))}, {"0": b"12345"},
     r"storage 0: 5 bytes is not a whole number"),
    ("unsupported dtype", {"w": tp.tensor(0, 0, (1,), (1,), "BFloat16Storage")}, None,
     r"unsupported storage type 'BFloat16Storage'"),
    ("made-up dtype", {"w": tp.tensor(0, 0, (1,), (1,), "EvilStorage")}, None,
     r"unsupported storage type 'EvilStorage'"),
    ("missing storage", {"w": tp.tensor(7, 0, (1,), (1,))}, None, r"no archive/data/7 in"),
]


@pytest.mark.parametrize("entries, storages, message",
                         [c[1:] for c in _ZIP_CASES], ids=[c[0] for c in _ZIP_CASES])  # fmt: skip
def test_hostile_zip_checkpoints_are_one_line(tmp_path, entries, storages, message):
    path = _zip(tmp_path, entries, storages)
    with pytest.raises(torch_zip.CheckpointFormatError, match=message) as info:
        torch_zip.load(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_refused_code_stays_unsafe_pickle_error(tmp_path):
    evil = tp._global("os", "system") + b"(" + tp._str("echo ran") + b"tR"
    path = _zip(tmp_path, {"x": evil})
    with pytest.raises(torch_zip.UnsafePickleError, match=r"os\.system, refused"):
        torch_zip.load(path)
    # A tensor rebuilt on an integer instead of a storage.
    fake = tp._global("torch._utils", "_rebuild_tensor_v2")
    fake += b"(" + b"".join(tp._obj(v) for v in (3, 0, (1,), (1,), False)) + b")tR"
    with pytest.raises(torch_zip.CheckpointFormatError, match="not a storage"):
        torch_zip.load(_zip(tmp_path, {"x": fake}, name="fake.pth"))


def _memo_bomb(repeats: int) -> bytes:
    """One tensor rebuild memoised once, then called `repeats` times (5 bytes each)."""
    rebuild = tp._global("torch._utils", "_rebuild_tensor_v2")
    args = tp.tensor(0, 0, (1 << 20,), (0,), numel=1)[len(rebuild) : -1]  # 4 MiB, stride 0
    # callable -> memo 0, args -> memo 1, the first tensor is the value; then rebuild, pop.
    return rebuild + b"q\x00" + args + b"q\x01" + b"R" + b"h\x00h\x01R0" * repeats


def _nested_key(depth: int) -> bytes:
    """A storage key that is a list of lists 2**depth leaves wide, ~9 bytes per level."""
    out = b"]q\x00"
    for i in range(depth):
        out += b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1])
    return out


def test_resource_exhaustion_is_refused(tmp_path):
    """Memoised rebuilds and containers cannot claim unbounded memory, giant integers and
    nested keys cannot take unbounded time, compressed entries cannot expand unboundedly."""
    import time

    bomb = b"\x80\x02}(" + tp._str("x") + _memo_bomb(400) + b"u."
    path = tp.write_zip(tmp_path / "memo.pth", bomb, {"0": VALUES[:1].tobytes()})
    with pytest.raises(torch_zip.CheckpointFormatError, match="more memory than a checkpoint"):
        torch_zip.load(path)

    pid = b"(" + tp._str("storage") + tp._global("torch", "FloatStorage") + _nested_key(40)
    pid += tp._str("cpu") + tp._int(1) + b"tQ"
    path = tp.write_zip(tmp_path / "key.pth", b"\x80\x02" + pid + b".", {})
    start = time.perf_counter()
    with pytest.raises(torch_zip.CheckpointFormatError, match="storage key list is not a short"):
        torch_zip.load(path)
    assert time.perf_counter() - start < 5

    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        path = tp.write_zip(tmp_path / f"m{method}.pth", tp.state_pickle({}), {}, compress=method)
        with pytest.raises(torch_zip.CheckpointFormatError, match="compression method"):
            torch_zip.load(path)
    path = tp.write_zip(tmp_path / "enc.pth", tp.state_pickle({}), {})
    data = bytearray(open(path, "rb").read())
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 1  # general purpose flag bit 0: encrypted
    open(path, "wb").write(bytes(data))
    with pytest.raises(torch_zip.CheckpointFormatError, match="encrypted"):
        torch_zip.load(path)


def test_damaged_archives_are_one_line(tmp_path):
    good = _zip(tmp_path, {"w": tp.tensor(0, 0, (12,), (1,), numel=12)})
    data = open(good, "rb").read()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "crc.pth": data.replace(VALUES.tobytes()[:8], b"\x00" * 8),
        "empty.pth": b"",
        "junk.pth": b"not a checkpoint",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(torch_zip.CheckpointFormatError) as info:
            torch_zip.load(str(path))
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value), name
    bomb = tp.write_zip(tmp_path / "bomb.pth", tp.state_pickle({"w": tp.tensor(0, 0, (1,), (1,))}),
                        {"0": bytes(50 << 20)},
                        compress=zipfile.ZIP_DEFLATED)  # fmt: skip
    with pytest.raises(torch_zip.CheckpointFormatError, match=r"declares 52428800 bytes from"):
        torch_zip.load(bomb)
    with pytest.raises(torch_zip.CheckpointFormatError, match="FileNotFoundError"):
        torch_zip.load(str(tmp_path / "absent.pth"))


def test_hostile_legacy_files_are_one_line(tmp_path):
    one = {"w": tp.tensor(0, 0, (4,), (1,), numel=4, legacy=True)}
    cases = [
        ("giant count", one, [("0", 1 << 60, b"")], None, r"storage 0 holds"),
        ("giant numel", {"w": tp.tensor(0, 0, (4,), (1,), numel=1 << 60, legacy=True)},
         [("0", 1 << 60, VALUES.tobytes())], None, r"past the file's end"),
        ("short data", one, [("0", 4, VALUES[:2].tobytes())], None, r"past the file's end"),
        ("bad view", {"w": tp.tensor(0, 0, (1,), (1,), numel=4, legacy=True, view=("v", 3, 9))},
         [("0", 4, VALUES[:4].tobytes())], None, r"view \(3, 9\) outside its 4 elements"),
        ("unused key", one, [("0", 4, VALUES[:4].tobytes()), ("9", 1, VALUES[:1].tobytes())],
         None, r"storage 9 is listed but never used"),
    ]  # fmt: skip
    for name, entries, storages, _, message in cases:
        path = _legacy(tmp_path, entries, storages, name=name.replace(" ", "_") + ".pth")
        with pytest.raises(torch_zip.CheckpointFormatError, match=message) as info:
            torch_zip.load(path)
        assert "\n" not in str(info.value), name


def _fuzz(folder: str, trials: int, seed: int) -> dict:
    """Random damage to good zip and legacy files: byte flips inside the pickle (zipped with
    a valid CRC, so the unpickler sees them), byte flips and cuts of the whole file. Every
    load must return arrays made only of the file's values, or raise CheckpointFormatError
    with one line. Run in a child process: a crash shows as its exit signal."""
    rng = np.random.default_rng(seed)
    pkl, legacy_pkl = (
        tp.state_pickle({
            "a": tp.tensor(0, 2, (2, 3), (1, 2), numel=12, legacy=legacy),
            "b": tp.tensor(0, 0, (3,), (4,), numel=12, legacy=legacy),
        })
        for legacy in (False, True)
    )  # fmt: skip
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(trials):
        path = os.path.join(folder, f"f{trial}.pth")
        kind = trial % 4
        if kind == 0:  # damaged pickle, intact zip
            bad = bytearray(pkl)
            for i in rng.integers(2, len(bad) - 1, rng.integers(1, 4)):
                bad[i] = rng.integers(0, 256)
            tp.write_zip(path, bytes(bad), {"0": VALUES.tobytes()})
        else:
            if kind == 3:
                content = tp.legacy_bytes(legacy_pkl, [("0", 12, VALUES.tobytes())])
            else:
                tp.write_zip(path, pkl, {"0": VALUES.tobytes()})
                content = open(path, "rb").read()
            content = bytearray(content)
            if kind == 1:
                content = content[: rng.integers(0, len(content))]
            else:
                for i in rng.integers(0, len(content), rng.integers(1, 4)):
                    content[i] = rng.integers(0, 256)
            with open(path, "wb") as f:
                f.write(bytes(content))
        try:
            got = torch_zip.load(path)
        except torch_zip.CheckpointFormatError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
            outcomes["refused"] += 1
            continue
        arrays = [v for v in (got.values() if isinstance(got, dict) else []) if
                  isinstance(v, (np.ndarray, np.generic))]  # fmt: skip
        for a in arrays:
            a = np.asarray(a)
            assert a.nbytes <= torch_zip.MAX_EXPANDED_BYTES
            if kind < 2 and a.dtype == np.float32:  # storage bytes intact: its values only
                assert np.isin(a, VALUES).all(), (path, a)
        outcomes["loaded"] += 1
    return outcomes


def test_fuzzed_checkpoints_never_crash(tmp_path):
    code = (
        "import json, sys; from tests.test_hostile_checkpoints import _fuzz; "
        f"print(json.dumps(_fuzz({str(tmp_path)!r}, 600, 0)))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)  # fmt: skip
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    outcomes = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcomes["refused"] > 100 and outcomes["loaded"] + outcomes["refused"] == 600
