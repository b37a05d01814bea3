"""A run's identity (issue 20): a config holds the shared sections and only its own method's
options, its hash covers exactly those, and registering, removing or changing another method
changes no run's hash. Runs recorded before (every config then held every method's section) stay
valid: their checkpoint resumes and their finished results count as complete.

The recorded runs in tests/fixtures/legacy_runs/ were written by pfedmoap at commit 27ac6c8 (the
last before the change), without a config file (so on the quick-start's base):
    pfedmoap run --out DIR --set model.name=tiny-clip --set model.pretrained= --set data.dataset=synthetic
      --set data.n_clients=4 --set data.n_train=120 --set data.n_test=40 --set data.min_size=5
      --set data.cache_dir= --set rounds=3 --set train.local_epochs=1 --set run.threads=1
      --set algorithm=fedprox --set fedprox.mu=0.3 --set moe.lam=0.2 --set prompt.n_ctx=4
      --set run.checkpoint_every=1
`complete/`: run to the end (results.h5); `stopped/`: stopped by SIGUSR1 after round 1 (results.h5
and checkpoint.h5).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest

from pfedmoap import algorithms, config, store, tables
from pfedmoap.algorithms import Manifest
from pfedmoap.errors import PFedMoAPError

LEGACY = Path(__file__).parent / "fixtures" / "legacy_runs"
LEGACY_SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=4",
               "data.n_train=120", "data.n_test=40", "data.min_size=5", "data.cache_dir=", "rounds=3",
               "train.local_epochs=1", "run.threads=1", "algorithm=fedprox", "fedprox.mu=0.3",
               "prompt.n_ctx=4", "run.checkpoint_every=1"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _legacy_cfg(*extra):
    """Today's config of the recorded runs (`pfedmoap run` without a config file: the quick-start's base)."""
    return config.load(None, LEGACY_SETS + list(extra), base=config.QUICKSTART)


# ---------------------------------------------------------------------------- a config's sections

def test_a_config_holds_only_its_own_methods_options():
    cfg = config.load(None, ["algorithm=fedamp", "fedamp.lam=2"])
    assert type(cfg.options).__name__ == "FedAMPOptions" and cfg.options.lam == 2.0
    d = cfg.to_dict()
    owned = {m.section for m in algorithms.manifests() if m.section}
    assert owned & set(d) == {"fedamp"}
    assert not hasattr(cfg, "moe") and not hasattr(cfg, "fedamp")        # no attribute magic
    plain = config.load(None, ["algorithm=promptfl"])
    assert plain.options is None and owned.isdisjoint(plain.to_dict())
    assert config.from_toml(cfg.to_toml()) == cfg


def test_another_methods_section_in_a_file_is_left_out_in_a_set_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('algorithm = "promptfl"\n[moe]\nlam = 0.1\n[fedamp]\nsigma = 3.0\n')
    cfg = config.load(str(f))
    assert cfg.options is None and cfg.hash() == config.load(None, ["algorithm=promptfl"]).hash()
    # checked all the same: a wrong key or value of another method's section is an error
    f.write_text('algorithm = "promptfl"\n[moe]\nlamm = 0.1\n')
    with pytest.raises(PFedMoAPError, match=r"moe\.lamm: unknown key"):
        config.load(str(f))
    f.write_text('algorithm = "promptfl"\n[moe]\nlam = "high"\n')
    with pytest.raises(PFedMoAPError, match=r"moe\.lam = 'high': expected a number"):
        config.load(str(f))
    # a single run's --set of another method's key would change nothing: one line naming both
    with pytest.raises(PFedMoAPError, match=r"^moe\.lam: \[moe\] holds the options of algorithm 'pfedmoap', "
                                            r"and this run's algorithm is 'promptfl'"):
        config.load(None, ["algorithm=promptfl", "moe.lam=1"])
    # ... shared by several methods' runs (quick-start, a table), it goes to the method it belongs to
    assert config.load(None, ["algorithm=promptfl", "moe.lam=1"], other_methods="skip").options is None
    # the last layer's algorithm decides, whatever the order of the keys
    assert config.load(None, ["moe.lam=0.3", "algorithm=pfedmoap"]).options.lam == 0.3
    f.write_text('algorithm = "promptfl"\n[moe]\nlam = 0.1\n')
    assert config.load(str(f), ["algorithm=pfedmoap"]).options.lam == 0.1


def test_cli_refuses_another_methods_set_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pfedmoap.cli", "run", "--set", "algorithm=promptfl",
                        "--set", "moe.lam=1", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: moe.lam: [moe] holds the options of algorithm 'pfedmoap', and this run's algorithm is "
        "'promptfl'; set algorithm = 'pfedmoap' or leave the key out"]
    assert not (tmp_path / "x").exists()


@dataclass
class _TwoOptions:
    rank: int = 2
    lr_scale: float = 1.0


def test_registering_removing_or_changing_another_method_changes_no_hash():
    keys = ["algorithm=promptfl", "algorithm=pfedmoap", "algorithm=fedamp", "algorithm=zeroshot"]
    before = {k: config.run_hash(config.load(None, [k])) for k in keys}
    algorithms.register(Manifest("throwaway", "tests.nowhere:Method", section="throwaway", options=_TwoOptions))
    try:
        assert {k: config.run_hash(config.load(None, [k])) for k in keys} == before
        own = config.load(None, ["algorithm=throwaway"])
        assert own.to_dict()["throwaway"] == {"rank": 2, "lr_scale": 1.0}
        # its section in a shared file leaves the other methods' runs as they were
        assert config.run_hash(config.from_dict({"algorithm": "promptfl", "throwaway": {"rank": 9}})) == \
            before["algorithm=promptfl"]
        # another default of its options changes its own runs' hash only
        changed = dataclasses.make_dataclass("_Changed", [("rank", int, 3), ("lr_scale", float, 1.0)])
        algorithms.register(Manifest("throwaway", "tests.nowhere:Method", section="throwaway", options=changed))
        assert config.run_hash(config.load(None, ["algorithm=throwaway"])) != config.run_hash(own)
        assert {k: config.run_hash(config.load(None, [k])) for k in keys} == before
    finally:
        algorithms.unregister("throwaway")
    assert {k: config.run_hash(config.load(None, [k])) for k in keys} == before
    with pytest.raises(PFedMoAPError, match="algorithm = 'throwaway': expected one of"):
        config.load(None, ["algorithm=throwaway"])


def test_hash_covers_the_shared_sections_and_the_own_options():
    base = config.load(None, ["algorithm=fedprox"])
    assert config.load(None, ["algorithm=fedprox", "fedprox.mu=0.1"]).hash() != base.hash()
    assert config.load(None, ["algorithm=fedprox", "train.lr=0.1"]).hash() != base.hash()
    assert config.load(None, ["algorithm=fedprox", "run.threads=3", "out=x"]).hash() == base.hash()
    assert config.load(None, ["algorithm=promptfl"]).hash() != base.hash()


# ---------------------------------------------------------------------------- runs recorded before

def _attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def test_legacy_hash_is_recognised_and_stands_for_todays_hash():
    cfg = _legacy_cfg()
    for path in (LEGACY / "stopped" / "checkpoint.h5", LEGACY / "stopped" / "results.h5",
                 LEGACY / "complete" / "results.h5"):
        attrs = _attrs(path)
        assert "[moe]" in attrs["config"]                         # then: every method's section
        assert attrs["config_hash"] != config.run_hash(cfg)      # so the hash itself changed ...
        assert config.recorded_run_hash(attrs) == config.run_hash(cfg)     # ... and is recognised
    # a recorded hash that is neither scheme's stays what it is: refused
    attrs = _attrs(LEGACY / "complete" / "results.h5")
    assert config.recorded_run_hash(dict(attrs, config_hash="0123456789abcdef")) == "0123456789abcdef"
    # a legacy record of another config is not taken for this one
    other = _legacy_cfg("fedprox.mu=0.4")
    assert config.recorded_run_hash(attrs) != config.run_hash(other)


def test_finished_legacy_table_run_counts_as_complete(tmp_path):
    run = tmp_path / "complete"
    shutil.copytree(LEGACY / "complete", run)
    cfg = _legacy_cfg(f"out={run}")
    assert tables.is_complete(cfg)
    assert not tables.is_complete(_legacy_cfg(f"out={run}", "fedprox.mu=0.4"))


def test_legacy_checkpoint_resumes(tmp_path):
    run = tmp_path / "stopped"
    shutil.copytree(LEGACY / "stopped", run)
    assert _attrs(run / "results.h5")["status"] == "stopped"
    p = subprocess.run([sys.executable, "-m", "pfedmoap.cli", "resume", str(run)], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    attrs = store.read_results(run, rounds=False)["attrs"]
    assert attrs["status"] == "complete" and attrs["rounds_done"] == 3
    assert "round 2/3" in p.stdout and "round 1/3" not in p.stdout       # resumed, not rerun
    assert tables.is_complete(_legacy_cfg(f"out={run}"))
    # what the new checkpoint records is today's hash of the same run
    assert _attrs(run / "checkpoint.h5")["config_hash"] == config.run_hash(_legacy_cfg())


def test_keys_added_later_keep_recorded_hashes_at_their_default():
    """train.drop_rate, train.client_block and [eval] came after runs were recorded: at their defaults
    the hash is the one of a config text without them (a recorded run's); any other value changes it."""
    import tomllib
    from pfedmoap import config
    cfg = config.load(None, [])
    d = tomllib.loads(cfg.to_toml())
    for key in ("drop_rate", "client_block"):
        del d["train"][key]
    del d["eval"]
    assert config._digest({k: v for k, v in d.items() if k not in ("out", "run")}) == cfg.hash()
    for change in ("train.drop_rate=0.25", "train.client_block=4", "eval.protocol=dual"):
        assert config.load(None, [change]).hash() != cfg.hash(), change
