"""`pfedmoap data check` decodes every image a data set will use and reports every problem."""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pfedmoap import cli
from pfedmoap.data import disk
from pfedmoap.data.datasets import load_dataset
from pfedmoap.errors import PFedMoAPError


def _cfg(dataset, root, **kw):
    base = dict(dataset=dataset, root=str(root), partition="iid", n_clients=2, beta=0.5, min_size=1,
                shots=0, classes_per_client=0, domains=[], clients_per_domain=1)
    base.update(kw)
    return SimpleNamespace(**base)


def _noise_jpeg(path: Path, seed: int, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(px).save(path, format="JPEG", quality=95)


def _make_dtd(root: Path, per_class=3, extra_missing=()):
    """A CoOp-layout dtd root: 2 classes x per_class train and test images; `extra_missing`
    are split entries (relative names) without a file."""
    base = root / "dtd"
    js = {"train": [], "val": [], "test": []}
    for c in range(2):
        for part in ("train", "test"):
            for k in range(per_class):
                rel = f"class_{c}/{part}_{k}.jpg"
                _noise_jpeg(base / "images" / rel, 100 * c + 10 * k + (part == "test"))
                js[part].append([rel, c, f"class_{c}"])
    for rel in extra_missing:
        js["train"].append([rel, 1, "class_1"])
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps(js))
    return base


def _truncate(path: Path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])       # the header is intact: PIL opens it, decoding fails


def test_corrupt_and_missing_images_are_all_reported(tmp_path, capsys):
    base = _make_dtd(tmp_path, extra_missing=["class_1/gone.jpg"])
    corrupt = base / "images" / "class_1" / "test_2.jpg"          # a later image, not the first
    _truncate(corrupt)
    with Image.open(corrupt) as im:                               # opening alone does not notice
        assert im.size == (32, 32)
    load_dataset(_cfg("dtd", tmp_path))                           # nor does loading the data set

    assert cli.main(["data", "check", "--dataset", "dtd", "--root", str(tmp_path)]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert "train 7 images, test 6 images, 2 classes" in cap.out
    assert err[0] == "dtd: 2 problems:"
    assert any(str(base / "images" / "class_1" / "gone.jpg") in ln and "missing" in ln and "train" in ln
               for ln in err)
    assert any(str(corrupt) in ln and "cannot decode" in ln and "test" in ln for ln in err)
    assert err[-1] == f"error: data check dtd at {tmp_path}: 2 image problems (1 missing, 1 undecodable); listed above"


def test_clean_root_passes(tmp_path, capsys):
    _make_dtd(tmp_path)
    assert cli.main(["data", "check", "--dataset", "dtd", "--root", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert "train 6 images, test 6 images" in cap.out and "first test image" in cap.out
    assert cap.err == ""


def test_many_problems_are_listed_up_to_a_limit_and_counted(tmp_path):
    gone = [f"class_1/gone_{k:02d}.jpg" for k in range(disk.SHOWN_PROBLEMS + 5)]
    base = _make_dtd(tmp_path, extra_missing=gone)
    (base / "images" / "class_0" / "train_0.jpg").unlink()      # the very first image too
    (base / "images" / "class_0" / "test_1.jpg").write_bytes(b"not an image")
    with pytest.raises(disk.DataProblems) as e:
        disk.check_root(_cfg("dtd", tmp_path))
    out, err = e.value.report, e.value.listing
    n = len(gone) + 2
    assert str(e.value) == (f"data check dtd at {tmp_path}: {n} image problems ({n - 1} missing, 1 undecodable); "
                            f"listed above")
    lines = err.strip().splitlines()
    assert lines[0] == f"dtd: {n} problems:"
    assert len(lines) == 1 + disk.SHOWN_PROBLEMS + 1 and lines[-1] == f"  ... and {n - disk.SHOWN_PROBLEMS} more"
    assert "train_0.jpg: missing" in lines[1]
    assert "first train image" not in out and "first test image" in out
    # a plain load still stops at the first missing image, in one line
    with pytest.raises(PFedMoAPError, match="train_0.jpg .*missing"):
        load_dataset(_cfg("dtd", tmp_path))


def test_domain_split_file_naming_missing_images(tmp_path):
    for c in disk.DOMAINNET_CLASSES:
        for k in range(2):
            _noise_jpeg(tmp_path / "domainnet" / "sketch" / c / f"{k}.jpg", k, (8, 8))
    base = tmp_path / "domainnet"
    (base / "sketch_train.txt").write_text("sketch/bird/0.jpg 0\nsketch/bird/7.jpg 0\nsketch/other/9.jpg 3\n")
    (base / "sketch_test.txt").write_text("sketch/zebra/1.jpg 9\n")
    cfg = _cfg("domainnet", tmp_path, domains=["sketch"])
    assert load_dataset(cfg).train.keys == ["domainnet/sketch/bird/0.jpg"]      # skipped when loading
    with pytest.raises(disk.DataProblems, match=r"1 image problem \(1 missing\)") as e:
        disk.check_root(cfg)
    assert f"{base / 'sketch' / 'bird' / '7.jpg'}: missing (named by sketch_train split file)" in e.value.listing


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    _make_dtd(tmp_path)
    for stream, shows in ((Tty(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        disk.check_root(_cfg("dtd", tmp_path))
        assert ("data check dtd" in stream.getvalue()) == shows
