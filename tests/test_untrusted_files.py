"""Data files from a shared directory are read without running code: CIFAR batches and FedBN-style
split files go through a restricted unpickler; every torch.load asks for weights only."""
from __future__ import annotations

import ast
import io
import os
import pickle
import shlex
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pfedmoap import cli
from pfedmoap.data import disk
from pfedmoap.data.datasets import load_dataset
from pfedmoap.errors import PFedMoAPError

REPO = Path(__file__).resolve().parents[1]


def _cfg(dataset, root, **kw):
    base = dict(dataset=dataset, root=str(root), partition="iid", n_clients=2, beta=0.5, min_size=1,
                shots=0, classes_per_client=0, domains=[], clients_per_domain=1)
    base.update(kw)
    return SimpleNamespace(**base)


class RunsCommand:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class RunsSubprocess(RunsCommand):
    def __reduce__(self):
        return subprocess.call, (["touch", self.marker],)


def _cifar_batch(labels, extra: dict | None = None) -> dict:
    x = np.zeros((len(labels), 3 * 32 * 32), np.uint8)
    x[:, 0] = np.asarray(labels) * 10 + 1
    d = {b"data": x, b"labels": list(labels), b"batch_label": b"training batch", b"filenames": [b"a.png"] * len(labels)}
    d.update(extra or {})
    return d


def _make_cifar10(base: Path, batch_1: dict | None = None, protocol: int = pickle.DEFAULT_PROTOCOL):
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        d = batch_1 if (i == 1 and batch_1 is not None) else _cifar_batch([i % 3, (i + 1) % 3])
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(d, protocol=protocol))
    (base / "test_batch").write_bytes(pickle.dumps(_cifar_batch([2, 0, 1]), protocol=protocol))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane", b"automobile", b"bird"],
                                                      b"num_vis": 3072}, protocol=protocol))


@pytest.mark.parametrize("evil", [RunsCommand, RunsSubprocess])
def test_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, evil):
    marker = tmp_path / "marker"
    base = tmp_path / "cifar-10-batches-py"
    _make_cifar10(base, _cifar_batch([0, 1], {b"x": evil(marker)}))
    # pickling the crafted object must really reference a command runner (else the test proves nothing)
    raw = (base / "data_batch_1").read_bytes()
    assert b"system" in raw or b"subprocess" in raw
    with pytest.raises(PFedMoAPError) as e:
        load_dataset(_cfg("cifar10", tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{base / 'data_batch_1'}: refused to unpickle ")
    assert ("system" in msg) if evil is RunsCommand else ("subprocess.call" in msg)
    assert "only plain containers, numbers, strings and numpy arrays are allowed" in msg
    assert not marker.exists()


def test_crafted_file_through_the_cli_is_one_error_line(tmp_path, capsys):
    marker = tmp_path / "marker"
    base = tmp_path / "cifar-10-batches-py"
    _make_cifar10(base)
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [RunsCommand(marker)]}))
    assert cli.main(["data", "check", "--dataset", "cifar10", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {base / 'batches.meta'}: refused to unpickle ") and "system" in err[0]
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_genuine_cifar_pickles_still_load(tmp_path, protocol):
    _make_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = load_dataset(_cfg("cifar10", tmp_path))
    assert ds.classnames == ["airplane", "automobile", "bird"] and len(ds.train) == 10
    assert ds.train.load(1).getpixel((0, 0))[0] == 10 * ds.train.labels[1] + 1


class _Py2Pickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` (BINSTRING), as the original CIFAR files were written."""

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def _py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (and Python 2's numpy) named the helpers' module numpy.core.multiarray
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def test_python2_cifar_pickle_loads(tmp_path):
    d = _cifar_batch([0, 2, 1])
    raw = _py2_dumps(d)
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    p = tmp_path / "data_batch_1"
    p.write_bytes(raw)
    for encoding in ("latin1", "bytes"):
        got = disk.safe_unpickle(p, encoding=encoding)
        key = "data" if encoding == "latin1" else b"data"
        np.testing.assert_array_equal(got[key], d[b"data"])
        assert got[key].dtype == np.uint8
    assert disk.safe_unpickle(p)["labels"] == [0, 2, 1]


def test_allowed_values_round_trip(tmp_path):
    value = {"s": {1, 2}, "f": frozenset([3]), "b": b"", "bb": b"xy", "ba": bytearray(b"z"), "c": 1 + 2j,
             "i": np.int64(7), "x": np.float32(0.5), "u": np.array(["clipart/bird/0.jpg"]),
             "o": np.array([1, "a"], dtype=object), "big": np.arange(1000, dtype=np.float64).reshape(10, 100)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        p = tmp_path / f"v{protocol}"
        p.write_bytes(pickle.dumps(value, protocol=protocol))
        got = disk.safe_unpickle(p)
        assert got.keys() == value.keys()
        for k, v in value.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(got[k], v)
                assert got[k].dtype == v.dtype
            else:
                assert got[k] == v and type(got[k]) is type(v), k


def test_codecs_encode_is_latin1_only(tmp_path):
    p = tmp_path / "codec"
    # _codecs.encode(b"x", "zlib") would be a codec call on attacker-chosen arguments
    p.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(pickle.UnpicklingError):
        disk.safe_unpickle(p)


def _make_domainnet(root: Path, domain="clipart"):
    from PIL import Image
    for c in disk.DOMAINNET_CLASSES:
        for k in range(3):
            q = root / "domainnet" / domain / c / f"{k}.jpg"
            q.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (k, 0, 0)).save(q)


def test_fedbn_split_pickles(tmp_path):
    _make_domainnet(tmp_path)
    base = tmp_path / "domainnet"
    # FedBN's format: (array of paths, list of labels), read with np.load(allow_pickle=True)
    for part, ks in (("train", [0, 1]), ("test", [2])):
        paths = np.array([f"../data/DomainNet/clipart/bird/{k}.jpg" for k in ks])
        with open(base / f"clipart_{part}.pkl", "wb") as f:
            pickle.dump((paths, ["bird"] * len(ks)), f)
    ds = load_dataset(_cfg("domainnet", tmp_path, domains=["clipart"]))
    assert ds.train.keys == ["domainnet/clipart/bird/0.jpg", "domainnet/clipart/bird/1.jpg"]
    assert ds.test.keys == ["domainnet/clipart/bird/2.jpg"]

    marker = tmp_path / "marker"
    with open(base / "clipart_test.pkl", "wb") as f:
        pickle.dump((np.array(["clipart/bird/2.jpg"]), [RunsSubprocess(marker)]), f)
    with pytest.raises(PFedMoAPError, match=r"clipart_test\.pkl: refused to unpickle subprocess\.call"):
        load_dataset(_cfg("domainnet", tmp_path, domains=["clipart"]))
    assert not marker.exists()


def test_npy_split_files(tmp_path):
    _make_domainnet(tmp_path)
    base = tmp_path / "domainnet"
    # an .npy object array behind a .pkl name: np.load would unpickle it
    np.save(base / "clipart_train.npy", np.array([np.array(["clipart/bird/0.jpg"]), ["bird"]], dtype=object))
    os.replace(base / "clipart_train.npy", base / "clipart_train.pkl")
    np.save(base / "clipart_test.npy", np.array([["clipart/bird/1.jpg", "clipart/bird/2.jpg"], ["a", "b"]]))
    os.replace(base / "clipart_test.npy", base / "clipart_test.pkl")
    ds = load_dataset(_cfg("domainnet", tmp_path, domains=["clipart"]))
    assert ds.train.keys == ["domainnet/clipart/bird/0.jpg"]
    assert ds.test.keys == ["domainnet/clipart/bird/1.jpg", "domainnet/clipart/bird/2.jpg"]

    marker = tmp_path / "marker"
    np.save(base / "evil.npy", np.array([RunsCommand(marker), 1], dtype=object))
    os.replace(base / "evil.npy", base / "clipart_train.pkl")
    with pytest.raises(PFedMoAPError, match=r"clipart_train\.pkl: refused to unpickle .*system"):
        load_dataset(_cfg("domainnet", tmp_path, domains=["clipart"]))
    assert not marker.exists()


def _torch_loads(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            yield node


def test_every_torch_load_is_weights_only():
    files = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "tools").rglob("*.py"))
    seen = 0
    for f in files:
        for call in _torch_loads(f):
            seen += 1
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{f}:{call.lineno}: torch.load without weights_only=True"
    assert seen >= 1      # the walk finds the loads that exist (clip/micro.py)


def test_no_unrestricted_unpickling_in_src():
    bad = []
    for f in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)):
                continue
            mod, fn = node.func.value.id, node.func.attr
            kw = {k.arg: k.value for k in node.keywords}
            if mod == "pickle" and fn in ("load", "loads", "Unpickler"):
                bad.append(f"{f}:{node.lineno}: pickle.{fn}")
            if mod in ("np", "numpy") and fn == "load" and not (
                    isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                bad.append(f"{f}:{node.lineno}: np.load without allow_pickle=False")
    assert not bad, bad


def _relabelled_as_object(value, protocol: int) -> bytes:
    """`value` pickled with its int64 dtype relabelled as object dtype: the dtype's pickled flags (0 for
    int64) then let numpy take the raw int64 bytes as object pointers. Only allowed numpy globals."""
    raw = pickle.dumps(value, protocol=protocol)
    i8 = b"X\x02\x00\x00\x00i8" if protocol < 4 else b"\x8c\x02i8"
    assert raw.count(i8) == 1
    return raw.replace(i8, i8[:-2] + b"O8")


@pytest.mark.parametrize("protocol, what", [(2, "array"), (5, "array"), (2, "scalar")])
def test_raw_memory_relabelled_as_object_dtype_is_refused(tmp_path, protocol, what):
    value = np.array([0x4141414141, 7], np.int64) if what == "array" else np.int64(0x4141414141)
    p = tmp_path / "batch"
    p.write_bytes(_relabelled_as_object({b"data": value, b"labels": [0, 1]}, protocol))
    with pytest.raises(PFedMoAPError, match=r"batch: refused to unpickle a numpy object dtype with forged flags"):
        disk.safe_unpickle(p)


def test_relabelled_cifar_batch_is_one_line_not_a_crash(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    _make_cifar10(base)
    batch = _cifar_batch([0, 1])
    batch[b"data"] = batch[b"data"].astype(np.int64)
    (base / "data_batch_1").write_bytes(_relabelled_as_object(batch, 2))
    p = subprocess.run([sys.executable, "-m", "pfedmoap.cli", "data", "check", "--dataset", "cifar10",
                        "--root", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert p.stderr.strip().splitlines() == [
        f"error: {base / 'data_batch_1'}: refused to unpickle a numpy object dtype with forged flags (raw bytes "
        f"relabelled as object) (only plain containers, numbers, strings and numpy arrays are allowed)"]


def test_genuine_object_arrays_and_structured_dtypes(tmp_path):
    p = tmp_path / "o"
    nested = np.array([np.array(["a/b/c.jpg"]), ["x"]], dtype=object)
    p.write_bytes(pickle.dumps(nested, protocol=2))
    got = disk.safe_unpickle(p)
    assert got.dtype == object and list(got[0]) == ["a/b/c.jpg"] and got[1] == ["x"]
    p.write_bytes(pickle.dumps(np.zeros(2, [("a", "i8"), ("b", "O")])))
    with pytest.raises(PFedMoAPError, match="structured dtype"):
        disk.safe_unpickle(p)
