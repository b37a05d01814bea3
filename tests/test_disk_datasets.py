"""Local-root loaders: tiny fake data sets in each layout, built in a tmp dir."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pfedmoap.data import disk
from pfedmoap.data.datasets import available, load_dataset
from pfedmoap.data.partition import make_partition
from pfedmoap.errors import PFedMoAPError


def _cfg(dataset, root, **kw):
    base = dict(dataset=dataset, root=str(root), partition="iid", n_clients=2, beta=0.5, min_size=1,
                shots=0, classes_per_client=0, domains=[], clients_per_domain=1)
    base.update(kw)
    return SimpleNamespace(**base)


def _img(path: Path, value: int, fmt: str | None = None):
    """A tiny solid image whose red channel encodes `value` (to check label alignment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (value, 7, 9)).save(path, format=fmt)


def _make_coop(root: Path, name: str, n_classes=3, per=(2, 1, 1)):
    folder, imgdir, split = disk.COOP[name]
    base = root / folder
    raw = [f"water_lily_{c}" if c == 0 else f"class_{c}" for c in range(n_classes)]
    js = {}
    for part, n in zip(("train", "val", "test"), per):
        items = []
        for c in range(n_classes):
            for k in range(n):
                rel = f"{raw[c]}/{part}_{k}.jpg" if name != "oxford_pets" else f"{raw[c]}_{part}_{k}.jpg"
                _img(base / imgdir / rel, 10 * c + 1, "JPEG" if k % 2 == 0 else "PNG")
                items.append([rel, c, raw[c]])
        js[part] = items
    (base / split).write_text(json.dumps(js))
    return base, raw


@pytest.mark.parametrize("name", sorted(disk.COOP))
def test_coop_layout(tmp_path, name):
    base, raw = _make_coop(tmp_path, name)
    ds = load_dataset(_cfg(name, tmp_path))
    assert ds.name == name
    assert ds.classnames == ["water lily 0", "class 1", "class 2"]
    assert len(ds.train) == 6 and len(ds.test) == 3
    for split in (ds.train, ds.test):
        for i in range(len(split)):
            im = split.load(i)
            assert im.mode == "RGB" and im.size == (6, 5)
            assert abs(im.getpixel((0, 0))[0] - (10 * split.labels[i] + 1)) <= 3    # label aligned
        assert len(set(split.keys)) == len(split) and all(k.startswith(name + "/") for k in split.keys)
    # root may point at the data set's own folder too
    ds2 = load_dataset(_cfg(name, base))
    assert ds2.train.keys == ds.train.keys


def test_coop_errors(tmp_path):
    with pytest.raises(PFedMoAPError, match=r"caltech101.*split_zhou_Caltech101\.json"):
        load_dataset(_cfg("caltech101", tmp_path))
    with pytest.raises(PFedMoAPError, match="data.root = ''"):
        load_dataset(_cfg("caltech101", ""))
    with pytest.raises(PFedMoAPError, match="not a directory"):
        load_dataset(_cfg("dtd", tmp_path / "nope"))
    base, _ = _make_coop(tmp_path, "dtd")
    (base / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(PFedMoAPError, match="not valid JSON"):
        load_dataset(_cfg("dtd", tmp_path))
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["a.jpg", "x", "c"]],
                                                                         "test": []}))
    with pytest.raises(PFedMoAPError, match="malformed"):
        load_dataset(_cfg("dtd", tmp_path))
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["gone.jpg", 0, "c"]],
                                                                         "test": [["gone.jpg", 0, "c"]]}))
    with pytest.raises(PFedMoAPError, match="missing"):
        load_dataset(_cfg("dtd", tmp_path))
    with pytest.raises(PFedMoAPError, match="no domains"):
        _make_coop(tmp_path, "food101")
        load_dataset(_cfg("food101", tmp_path, domains=["real"]))


def test_error_messages_are_one_line(tmp_path):
    for name in ("caltech101", "cifar10", "cifar100", "domainnet", "office_caltech10"):
        with pytest.raises(PFedMoAPError) as e:
            load_dataset(_cfg(name, tmp_path))
        msg = str(e.value)
        assert "\n" not in msg and name in msg and "expected" in msg and str(tmp_path) in msg


# ------------------------------------------------------------------ CIFAR

def _cifar_data(labels):
    x = np.zeros((len(labels), 3, 32, 32), np.uint8)
    x[:, 0] = (np.asarray(labels) * 10 + 1)[:, None, None]
    return x.reshape(len(labels), -1)


def _dump(path: Path, d: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({k.encode(): v for k, v in d.items()}, f)   # byte keys, as the real files


def test_cifar10(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird"]
    for i in range(1, 6):
        lab = [i % 3, (i + 1) % 3]
        _dump(base / f"data_batch_{i}", {"data": _cifar_data(lab), "labels": lab})
    _dump(base / "test_batch", {"data": _cifar_data([2, 0, 1]), "labels": [2, 0, 1]})
    _dump(base / "batches.meta", {"label_names": names})
    ds = load_dataset(_cfg("cifar10", tmp_path))
    assert ds.classnames == names and len(ds.train) == 10 and len(ds.test) == 3
    for s in (ds.train, ds.test):
        for i in range(len(s)):
            im = s.load(i)
            assert im.size == (32, 32) and im.getpixel((3, 3))[0] == 10 * s.labels[i] + 1
    assert load_dataset(_cfg("cifar10", base)).n_classes == 3
    (base / "test_batch").write_bytes(b"garbage")
    with pytest.raises(PFedMoAPError, match=r"test_batch is not a CIFAR pickle"):
        load_dataset(_cfg("cifar10", tmp_path))


def test_cifar100_superclass(tmp_path):
    base = tmp_path / "cifar-100-python"
    fine = ["apple", "aquarium_fish", "maple_tree", "oak_tree"]
    coarse_of = [0, 1, 2, 2]
    tr, te = [0, 1, 2, 3, 3, 0], [3, 2, 1, 0]
    for part, lab in (("train", tr), ("test", te)):
        _dump(base / part, {"data": _cifar_data(lab), "fine_labels": lab,
                            "coarse_labels": [coarse_of[c] for c in lab]})
    _dump(base / "meta", {"fine_label_names": fine, "coarse_label_names": ["a", "b", "c"]})
    ds = load_dataset(_cfg("cifar100", tmp_path))
    assert ds.classnames == ["apple", "aquarium fish", "maple tree", "oak tree"]
    assert ds.superclass.tolist() == coarse_of
    assert ds.train.load(4).getpixel((0, 0))[0] == 31
    p = make_partition(ds, _cfg("cifar100", tmp_path, partition="dirichlet-superclass", n_clients=2, min_size=1), 0)
    assert sorted(np.concatenate(p.train).tolist()) == list(range(6))


def test_cifar_missing(tmp_path):
    with pytest.raises(PFedMoAPError, match="cifar-100-python"):
        load_dataset(_cfg("cifar100", tmp_path))


# ------------------------------------------------------------------ multi-domain folders

def _make_domains(root: Path, folder: str, domains, classes, n=4):
    for di, d in enumerate(domains):
        for ci, c in enumerate(classes):
            for k in range(n):
                _img(root / folder / d / c / f"{k}.jpg", 20 * ci + di + 1, "JPEG")


def _check_domains(ds, domains, classes):
    assert ds.domain_names == list(domains)
    assert ds.classnames == [disk.readable(c) for c in classes]
    for s in (ds.train, ds.test):
        for i in range(0, len(s), 7):
            v = s.load(i).getpixel((0, 0))[0]
            assert abs(v - (20 * s.labels[i] + s.domains[i] + 1)) <= 3
        assert set(np.unique(s.domains).tolist()) == set(range(len(domains)))
    # deterministic 70/30 split per (domain, class): 4 images -> 3 train, 1 test; disjoint keys
    assert len(ds.train) == 3 * len(domains) * len(classes) and len(ds.test) == len(domains) * len(classes)
    assert not set(ds.train.keys) & set(ds.test.keys)


def test_office_caltech10(tmp_path):
    _make_domains(tmp_path, "office_caltech_10", disk.OFFICE_DOMAINS, disk.OFFICE_CLASSES)
    ds = load_dataset(_cfg("office_caltech10", tmp_path))
    _check_domains(ds, disk.OFFICE_DOMAINS, disk.OFFICE_CLASSES)
    assert "laptop computer" in ds.classnames
    again = load_dataset(_cfg("office_caltech10", tmp_path))
    assert again.train.keys == ds.train.keys                      # deterministic split
    sub = load_dataset(_cfg("office_caltech10", tmp_path, domains=["webcam", "amazon"]))
    assert sub.domain_names == ["amazon", "webcam"]
    p = make_partition(sub, _cfg("office_caltech10", tmp_path, partition="domain", n_clients=2), 0)
    assert np.all(sub.train.domains[p.train[1]] == 1)
    with pytest.raises(PFedMoAPError, match="not a domain"):
        load_dataset(_cfg("office_caltech10", tmp_path, domains=["mars"]))


def test_domainnet_and_split_files(tmp_path):
    _make_domains(tmp_path, "domainnet", disk.DOMAINNET_DOMAINS, disk.DOMAINNET_CLASSES)
    (tmp_path / "domainnet" / "real" / "extra_class").mkdir()     # extra folders are ignored
    ds = load_dataset(_cfg("domainnet", tmp_path))
    _check_domains(ds, disk.DOMAINNET_DOMAINS, disk.DOMAINNET_CLASSES)
    assert "wine glass" in ds.classnames and "ice cream" in ds.classnames
    # shipped split files win over the 70/30 split
    base = tmp_path / "domainnet"
    (base / "clipart_train.txt").write_text("clipart/bird/0.jpg 0\nclipart/bird/1.jpg 0\n")
    (base / "clipart_test.txt").write_text("clipart/bird/2.jpg 0\nclipart/zebra/3.jpg 9\n")
    ds = load_dataset(_cfg("domainnet", tmp_path, domains=["clipart"]))
    assert ds.train.keys == ["domainnet/clipart/bird/0.jpg", "domainnet/clipart/bird/1.jpg"]
    assert ds.test.keys == ["domainnet/clipart/bird/2.jpg", "domainnet/clipart/zebra/3.jpg"]
    assert ds.test.labels.tolist() == [0, 9]


def test_domainnet_missing_class(tmp_path):
    _make_domains(tmp_path, "domainnet", ["clipart"], disk.DOMAINNET_CLASSES[:-1])
    with pytest.raises(PFedMoAPError, match=r"zebra.*expected ROOT/domainnet/<domain>/<class>"):
        load_dataset(_cfg("domainnet", tmp_path, domains=["clipart"]))
    with pytest.raises(PFedMoAPError, match=r"infograph not found"):
        load_dataset(_cfg("domainnet", tmp_path))


# ------------------------------------------------------------------ registry, check_root

def test_registered():
    names = available()
    for n in ("caltech101", "oxford_pets", "oxford_flowers", "food101", "dtd", "cifar10", "cifar100",
              "domainnet", "office_caltech10"):
        assert n in names


def test_check_root(tmp_path):
    _make_coop(tmp_path, "oxford_flowers")
    s = disk.check_root(_cfg("oxford_flowers", tmp_path))
    assert "train 6 images, test 3 images, 3 classes" in s and "water lily 0" in s
    _make_domains(tmp_path, "office_caltech_10", disk.OFFICE_DOMAINS, disk.OFFICE_CLASSES)
    s = disk.check_root(_cfg("office_caltech10", tmp_path))
    assert "amazon 30/10" in s
    with pytest.raises(PFedMoAPError):
        disk.check_root(_cfg("food101", tmp_path))


def test_readable():
    assert disk.readable("water_lily") == "water lily"
    assert disk.readable(" a__b ") == "a b"


# ------------------------------------------------------------------ shipped configs

def test_paper_configs_name_registered_data_sets():
    # (their settings against the paper's Table 5: tests/test_paper_configs.py)
    from pfedmoap import config, configs
    for path in configs.packaged():
        cfg = config.load(str(path))
        assert cfg.data.dataset in available(), path
        d = cfg.data
        if d.partition == "domain":
            n_dom = len(disk.DOMAINNET_DOMAINS if d.dataset == "domainnet" else disk.OFFICE_DOMAINS)
            assert d.n_clients == n_dom * d.clients_per_domain


# ------------------------------------------------------------------ a corrupt image on one rank

@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_a_corrupt_image_ends_every_rank_with_one_line(tmp_path, cache):
    import os
    import subprocess
    import sys
    import time
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("no mpiexec")
    base, raw = _make_coop(tmp_path / "data", "dtd", n_classes=4, per=(3, 1, 2))
    folder, imgdir, _ = disk.COOP["dtd"]
    bad = base / imgdir / f"{raw[3]}/train_2.jpg"          # a client's training image, late in the list
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    sets = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=dtd", f"data.root={tmp_path / 'data'}",
            "data.partition=iid", "data.n_clients=2", "data.min_size=1", "rounds=1", "train.local_epochs=1",
            "algorithm=promptfl", "prompt.n_ctx=4", "run.threads=1",
            f"data.cache_dir={tmp_path / 'cache' if cache else ''}"]
    args = [mpiexec, "-n", "3", sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(tmp_path / "r")]
    for s in sets:
        args += ["--set", s]
    start = time.time()
    p = subprocess.run(args, capture_output=True, text=True, timeout=90,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [l for l in p.stderr.splitlines() if l.startswith("error")]
    # one line per rank that met the image (both client ranks may read it before the abort lands)
    assert 1 <= len(errors) <= 2 and all(str(bad) in e for e in errors), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert time.time() - start < 60
