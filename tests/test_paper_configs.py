"""The paper's configs ship inside the package, resolve by name, and hold the paper's Table 5."""
from __future__ import annotations

import os
import shutil

import pytest

from pfedmoap import config, configs
from pfedmoap.data import disk
from pfedmoap.data.datasets import available
from pfedmoap.errors import PFedMoAPError

FEW_SHOT = ("caltech101", "oxford_pets", "oxford_flowers", "food101", "dtd")
# pFedMoAP (ICLR 2025), appendix Table 5: backbone, clients, participation, rounds, partition, beta.
TABLE5 = {
    **{ds: dict(name="RN50-quickgelu", n_clients=10, frac=1.0, rounds=10, partition="pathological")
       for ds in FEW_SHOT},
    "cifar10": dict(name="RN50-quickgelu", n_clients=100, frac=0.1, rounds=120, partition="dirichlet", beta=0.5),
    "cifar100": dict(name="RN50-quickgelu", n_clients=100, frac=0.1, rounds=120, partition="dirichlet", beta=0.5),
    "cifar100_superclass": dict(name="RN50-quickgelu", n_clients=100, frac=0.1, rounds=120,
                                partition="dirichlet-superclass", beta=0.5),
    "domainnet": dict(name="ViT-B-16-quickgelu", n_clients=30, frac=0.25, rounds=25, partition="domain",
                      beta=0.3, clients_per_domain=5),
    "office_caltech10": dict(name="ViT-B-16-quickgelu", n_clients=20, frac=0.5, rounds=25, partition="domain",
                             beta=0.3, clients_per_domain=5),
}
NAMES = [f"paper/{k}" for k in sorted(TABLE5)]


def test_every_packaged_config_is_in_the_table_and_back():
    assert configs.packaged() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_paper_config_matches_table5(name):
    cfg = config.load(name)
    want = TABLE5[name.split("/")[1]]
    assert cfg.model.name == want["name"] and cfg.model.pretrained == "openai"
    d, t, m = cfg.data, cfg.train, cfg.options
    assert (d.n_clients, t.frac, cfg.rounds, d.partition) == (want["n_clients"], want["frac"], want["rounds"],
                                                                want["partition"])
    if "beta" in want:
        assert d.beta == want["beta"]
    # common to every row of Table 5
    assert cfg.algorithm == "pfedmoap"
    assert (t.lr, t.local_epochs, m.gating_lr, m.gating_heads, m.gating_dim, m.lam) == (0.002, 5, 0.01, 8, 128, 0.5)
    # where the paper is silent: the reference code (train.sh / federated_main.py defaults); on
    # DomainNet the paper's Table 8, whose K + 1 = 20 row is its Table 3
    assert (m.router, m.scaling, cfg.prompt.n_ctx) == ("knn", 10.0, 16)
    assert m.n_experts == (20 if d.dataset == "domainnet" else 10)
    assert d.dataset in available()
    if d.partition == "pathological":
        assert d.shots == 16 and t.batch_size == 16 and d.classes_per_client == 0   # disjoint, even blocks
    else:
        assert d.shots == 0 and t.batch_size == 32
    if d.partition == "domain":
        n_dom = len(disk.DOMAINNET_DOMAINS if d.dataset == "domainnet" else disk.OFFICE_DOMAINS)
        assert d.clients_per_domain == want["clients_per_domain"] and d.domains == []
        assert d.n_clients == n_dom * d.clients_per_domain and d.min_size == 2
    # about one client in ten per round on CIFAR, and every round at least one client
    assert int(t.frac * d.n_clients) >= 1


@pytest.mark.parametrize("given", ["food101", "paper/food101", "food101.toml", "paper/food101.toml"])
def test_names_resolve_to_the_packaged_file(given):
    path = configs.find(given)
    assert path == configs.ROOT / "paper" / "food101.toml" and path.is_file()
    assert config.load(given).data.dataset == "food101"


def test_an_existing_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "food101").write_text('rounds = 3\n[data]\ndataset = "digits"\n')
    assert configs.find("food101").resolve() == (tmp_path / "food101").resolve()
    cfg = config.load("food101")
    assert cfg.rounds == 3 and cfg.data.dataset == "digits"
    # and a copy of a packaged file given by path is read from that path
    shutil.copy(configs.find("paper/dtd"), tmp_path / "mine.toml")
    with open(tmp_path / "mine.toml", "a") as f:
        f.write("\n")
    assert configs.find(str(tmp_path / "mine.toml")) == tmp_path / "mine.toml"
    assert config.load(str(tmp_path / "mine.toml"), ["rounds=4"]).rounds == 4


@pytest.mark.parametrize("given", ["food", "paper/nope", "configs/food101.toml", "", "paper"])
def test_unknown_name_is_one_error_listing_the_packaged_names(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PFedMoAPError) as e:
        configs.find(given)
    msg = str(e.value)
    assert "\n" not in msg and repr(given) in msg
    assert all(n in msg for n in NAMES)


def test_load_of_a_missing_file_is_one_error(tmp_path):
    with pytest.raises(PFedMoAPError, match="does not exist.*paper/food101"):
        config.load(str(tmp_path / "missing.toml"))


def test_configs_ship_as_package_data():
    """pyproject's package-data glob covers the packaged configs (an installed wheel has them)."""
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pfedmoap"]
    pkg = root / "src" / "pfedmoap"
    shipped = {p for g in globs for p in pkg.glob(g)}
    assert {configs.ROOT / f"{n}.toml" for n in NAMES} <= shipped
    # the tables and the method overlays too (pfedmoap run paper/food101 --with paper/methods/coop)
    assert set((configs.ROOT / "paper").rglob("*.toml")) <= shipped
    assert (configs.ROOT / "__init__.py").is_file()          # a package: found by packages.find
    assert not (root / "configs").exists() or not any((root / "configs").glob("*.toml"))
    assert os.path.commonpath([configs.ROOT, pkg]) == str(pkg)
