"""What the README and docs/ say about files, phases and messages holds for the code and the wheel."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfedmoap import store

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "pfedmoap"


def test_the_readme_names_the_phases_the_loop_times():
    from pfedmoap.federation import PHASES
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| `/rounds/phase_time`"))
    named = re.findall(r"`(\w+)`", line.split("phase (", 1)[1])
    assert tuple(named) == PHASES, line


def test_docs_analysis_names_the_schema_versions_report_reads():
    text = " ".join((ROOT / "docs" / "analysis.md").read_text().split())
    versions = [str(v) for v in store.READABLE_RESULTS]
    assert f"reads schema versions {', '.join(versions[:-1])} and {versions[-1]}" in text


def test_partition_data_sets_carry_units_and_a_description(tmp_path):
    """Every /partition data set has `units` and `description`, as every /rounds one has; the
    names are the ones docs/hdf5-layout.md lists."""
    n = 3
    part = {"train_client": np.zeros(7, np.int32), "test_client": np.zeros(5, np.int32),
            "class_counts": np.ones((n, 2), np.int32), "test_class_counts": np.ones((n, 2), np.int32),
            "n_train": np.arange(n, dtype=np.int32), "test_domain_counts": np.ones((n, 1), np.int32),
            "classnames": ["a", "b"], "domain_names": ["all"]}
    attrs = dict(config="seed = 1\n", algorithm="x", dataset="synthetic", partition="iid", seed=1,
                 world_size=1, n_clients=n, n_classes=2, n_rounds=2, config_hash="0" * 16)
    res = store.Results(tmp_path, attrs, part, ["comm"], {})
    res.create()
    res.close()
    with h5py.File(tmp_path / store.RESULTS) as f:
        names = sorted(f["partition"])
        assert names == sorted(k for k in part if k not in ("classnames", "domain_names"))
        for name in names:
            ds = f["partition"][name]
            assert ds.attrs["units"] and ds.attrs["description"], name
    layout = (ROOT / "docs" / "hdf5-layout.md").read_text()
    assert all(f"`/partition/{name}`" in layout for name in names)


def test_a_food101_root_without_the_folder_names_the_folder(tmp_path):
    """An empty data.root: the error names ROOT/food-101 (what the layout expects), not
    ROOT/split_zhou_Food101.json."""
    from pfedmoap import config
    from pfedmoap.data.disk import check_root
    from pfedmoap.errors import PFedMoAPError
    cfg = config.load(None, ["data.dataset=food101", f"data.root={tmp_path}"])
    with pytest.raises(PFedMoAPError) as err:
        check_root(cfg.data)
    assert str(err.value).startswith(f"data.root for food101: {tmp_path / 'food-101'} not found; "
                                     "expected ROOT/food-101/images/ and ROOT/food-101/split_zhou_Food101.json")
    (tmp_path / "images").mkdir()         # ROOT is the folder itself, without its split file
    with pytest.raises(PFedMoAPError, match=re.escape(f"{tmp_path / 'split_zhou_Food101.json'} not found")):
        check_root(cfg.data)


def test_the_run_readers_the_docs_name_ship_in_the_package(tmp_path):
    """README and docs/analysis.md point to `python -m pfedmoap.examples.load_run_*`: the files lie
    in a package that packages.find ships (an installed wheel has them) and they run."""
    from test_analysis import write_run
    examples = PKG / "examples"
    assert (examples / "__init__.py").is_file()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    docs = (ROOT / "README.md").read_text() + (ROOT / "docs" / "analysis.md").read_text()
    named = set(re.findall(r"pfedmoap\.examples\.(\w+)", docs))
    assert named == {"load_run_h5py", "load_run_pandas"} and "tools/load_run" not in docs
    assert all((examples / f"{name}.py").is_file() for name in named)
    write_run(tmp_path, "run", schema_version=3)
    p = subprocess.run([sys.executable, "-m", "pfedmoap.examples.load_run_h5py", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "6 of 6 rounds" in p.stdout, p.stderr
