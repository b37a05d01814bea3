"""Config: defaults, TOML + `--set` layering and coercion; every bad input through the real CLI.

Every bad input goes through `pfedmoap.cli.main` (the console script's entry point) in process, and
a few (a config key, a TOML file, a model, a weights file) also through a real subprocess (`python -m pfedmoap.cli`), two at a time in the background: each
costs an interpreter plus a torch import (~2-5 s; `pfedmoap run` imports the federation, hence
torch, before it validates the config).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pfedmoap import cli, config
from pfedmoap.comm import _LAUNCHER_VARS
from pfedmoap.errors import PFedMoAPError


# ------------------------------------------------------------------ config in process

def test_defaults_validate():
    cfg = config.Config()
    config.validate(cfg)
    loaded = config.load(None, [])
    assert loaded == cfg
    assert loaded.options.n_experts == 10 and loaded.options.router == "knn" and loaded.options.lam == 0.5
    assert loaded.prompt.n_ctx == 16 and loaded.train.lr == 0.002 and loaded.options.gating_dim == 128
    quick = config.load(None, [], base=config.QUICKSTART)
    assert quick.rounds == config.QUICKSTART["rounds"] and quick.train.local_epochs == 2


def test_toml_then_overrides_with_coercion(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('seed = 5\nrounds = 3\nalgorithm = "fedprox"\n'
                 '[train]\nfrac = 0.5\nlr = 1\n'          # an int in TOML for a float field
                 '[data]\ndomains = ["clipart", "real"]\nbeta = 0.1\n'
                 '[run]\nprogress = false\n')
    cfg = config.load(str(f), ["rounds=7", "train.batch_size=4", "fedprox.mu=0.25", "run.progress=yes",
                               "run.shared_prefix=0", "data.domains=sketch, painting ,", "model.pretrained=",
                               "prompt.init=a photo of a"],
                      base={"rounds": 100, "data": {"n_clients": 4}})
    # TOML over base and defaults, --set over TOML
    assert cfg.seed == 5 and cfg.algorithm == "fedprox" and cfg.data.n_clients == 4
    assert cfg.rounds == 7 and type(cfg.rounds) is int
    assert cfg.train.batch_size == 4 and type(cfg.train.batch_size) is int
    assert cfg.train.frac == 0.5 and cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.options.mu == 0.25 and type(cfg.options.mu) is float
    assert cfg.run.progress is True and cfg.run.shared_prefix is False
    assert cfg.data.domains == ["sketch", "painting"] and cfg.data.beta == 0.1
    assert cfg.model.pretrained == "" and cfg.prompt.init == "a photo of a"
    # untouched keys keep their defaults
    assert cfg.train.momentum == 0.9 and cfg.train.warmup_epochs == 1


def test_toml_round_trip_and_hash(tmp_path):
    cfg = config.load(None, ["rounds=4", "data.domains=a,b", "moe.router=fixed", "out=somewhere"])
    again = config.from_toml(cfg.to_toml())
    assert again == cfg
    other_out = config.load(None, ["rounds=4", "data.domains=a,b", "moe.router=fixed", "out=elsewhere"])
    assert other_out.hash() == cfg.hash()
    assert config.load(None, ["rounds=5", "data.domains=a,b", "moe.router=fixed"]).hash() != cfg.hash()


@pytest.mark.parametrize("sets, key", [
    (["run.progress=maybe"], "run.progress"),
    (["data.n_clients=1.5"], "data.n_clients"),
    (["train.lr=fast"], "train.lr"),
    (["model=3"], "model"),
    (["rounds.x=1"], "rounds"),
    (["rounds"], "rounds"),
    (["seed.=1"], "seed."),
    (["prompt.template=a photo"], "prompt.template"),
    (["moe.gating_heads=3"], "moe.gating_heads"),
    (["dp.noise_multiplier=1"], "dp.noise_multiplier"),
    (["rounds=0"], "rounds"),
    (["model.device=tpu"], "model.device"),
    # numbers out of range, non-finite, or floats for integers
    (["rounds=1e20"], "rounds"),
    (["rounds=100000000000000000000"], "rounds"),
    (["rounds=1000001"], "rounds"),
    (["data.n_clients=3.0"], "data.n_clients"),
    (["seed=-99999999999999999999"], "seed"),
    (["train.lr=inf"], "train.lr"),
    (["train.lr=1e400"], "train.lr"),
    (["train.lr=-inf"], "train.lr"),
    (["moe.lam=nan"], "moe.lam"),
    (["moe.lam=-0.5"], "moe.lam"),
    (["data.beta=NaN"], "data.beta"),
    (["fedprox.mu=inf"], "fedprox.mu"),
    (["dp.clip=1", "dp.noise_multiplier=nan"], "dp.noise_multiplier"),
    (["dp.clip=1e10", "dp.noise_multiplier=1e30"], "dp.noise_multiplier"),     # std overflows float32
    (["train.momentum=-0.1"], "train.momentum"),
    (["train.momentum=1"], "train.momentum"),
    (["train.weight_decay=-0.0005"], "train.weight_decay"),
    (["train.warmup_lr=-1"], "train.warmup_lr"),
    (["moe.gating_lr=0"], "moe.gating_lr"),
    (["moe.gating_lr=-0.01"], "moe.gating_lr"),
    # sizes that would only fail after minutes of start-up
    (["prompt.n_ctx=3000000"], "prompt.n_ctx"),
    (["prompt.n_ctx=74"], "prompt.n_ctx"),
    (["data.n_clients=1000000000"], "data.n_clients"),
])
def test_bad_overrides_raise_naming_the_key(sets, key):
    with pytest.raises(PFedMoAPError, match=key.replace(".", r"\.")) as e:
        config.load(None, sets)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("sets", [
    ["dp.clip=1", "dp.noise_multiplier=1e30"],      # huge but finite noise: legitimate
    ["prompt.n_ctx=73"], ["moe.lam=0"], ["train.momentum=0", "train.weight_decay=0"],
    ["rounds=1000000"], ["train.lr=1e-300"], ["seed=9223372036854775807"],
])
def test_extreme_but_valid_values_pass(sets):
    config.load(None, sets)


@pytest.mark.parametrize("field, value", [
    ("train.lr", float("nan")), ("moe.lam", float("inf")), ("rounds", 2.5), ("rounds", 10 ** 20),
    ("dp.noise_multiplier", float("-inf")), ("prompt.n_ctx", "16"),
])
def test_validate_checks_a_config_built_in_code(field, value):
    cfg = config.Config()
    section, _, name = field.rpartition(".")
    obj = cfg.options if section == cfg.section else getattr(cfg, section) if section else cfg
    setattr(obj, name, value)
    with pytest.raises(PFedMoAPError, match=field.replace(".", r"\.")):
        config.validate(cfg)


@pytest.mark.parametrize("text, key", [
    ("rounds = 2.5\n", "rounds"),
    ("[run]\nprogress = 1\n", "run.progress"),
    ("[data]\ndomains = [1, 2]\n", "data.domains"),
    ('algorithm = ["pfedmoap"]\n', "algorithm"),
    ("[train]\nnope = 1\n", "train.nope"),
    ('model = "ViT-B-16"\n', "model"),
    ("rounds = 1e20\n", "rounds"),
    ("rounds = 100000000000000000000\n", "rounds"),
    ("[moe]\nlam = nan\n", "moe.lam"),
    ("[train]\nlr = inf\n", "train.lr"),
    ("[train]\nlr = " + "9" * 400 + "\n", "train.lr"),      # an integer no float can hold
    ("[prompt]\nn_ctx = 3000000\n", "prompt.n_ctx"),
])
def test_bad_toml_values_raise_naming_the_key(tmp_path, text, key):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(PFedMoAPError, match=key.replace(".", r"\.")) as e:
        config.load(str(f))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("data", [bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200)])
def test_binary_config_file_is_one_error(tmp_path, data):
    f = tmp_path / "picture.toml"
    f.write_bytes(data)
    with pytest.raises(PFedMoAPError, match="picture.toml.*not a text") as e:
        config.load(str(f))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the real CLI

SMALL_DATA = ["--set", "data.dataset=synthetic", "--set", "data.n_train=40", "--set", "data.n_test=20",
              "--set", "data.n_clients=2", "--set", "data.n_classes=4", "--set", "data.cache_dir=",
              "--set", "algorithm=zeroshot"]
# id -> (argv after `pfedmoap`, text the message must contain); {tmp} is a per-module directory
CASES = {
    "unknown-key": (["run", "--set", "nope=1"], "nope: unknown key"),
    "unknown-nested-key": (["run", "--set", "train.nope=1"], "train.nope: unknown key"),
    "wrong-type": (["run", "--set", "rounds=abc"], "rounds = 'abc'"),
    "no-equals": (["run", "--set", "rounds"], "rounds"),
    "n-clients": (["run", "--set", "data.n_clients=0"], "data.n_clients = 0"),
    "n-experts": (["run", "--set", "moe.n_experts=0"], "moe.n_experts = 0"),
    "frac-zero": (["run", "--set", "train.frac=0"], "train.frac = 0"),
    "frac-above-one": (["run", "--set", "train.frac=1.5"], "train.frac = 1.5"),
    "missing-config": (["run", "{tmp}/missing.toml"], "missing.toml"),
    "invalid-toml": (["run", "{tmp}/bad.toml"], "bad.toml"),
    "toml-unknown-key": (["run", "{tmp}/unknown.toml"], "train.nope"),
    "missing-root": (["run", "--set", "data.root={tmp}/no-such-dir"], "data.root"),
    "unknown-algorithm": (["run", "--set", "algorithm=fedsgd"], "algorithm = 'fedsgd'"),
    "unknown-partition": (["run", "--set", "data.partition=random"], "data.partition = 'random'"),
    "unknown-router": (["run", "--set", "moe.router=nearest"], "moe.router = 'nearest'"),
    "unknown-dataset": (["run", "--set", "data.dataset=imagenet-x", "--set", "algorithm=zeroshot"],
                        "data.dataset = 'imagenet-x'"),
    "unknown-model": (["run", *SMALL_DATA, "--set", "model.name=ViT-Q-99"], "model.name = 'ViT-Q-99'"),
    "missing-model-json": (["run", *SMALL_DATA, "--set", "model.name={tmp}/nomodel.json"], "model.name"),
    "unknown-pretrained-tag": (["run", *SMALL_DATA, "--set", "model.name=tiny-clip",
                                "--set", "model.pretrained=laion9b"], "model.pretrained = 'laion9b'"),
    "missing-pretrained-file": (["run", *SMALL_DATA, "--set", "model.name=tiny-clip",
                                 "--set", "model.pretrained={tmp}/no-such.pt"], "model.pretrained"),
    "digits-tag-wrong-model": (["run", *SMALL_DATA, "--set", "model.name=tiny-clip",
                                "--set", "model.pretrained=digits"], "model.pretrained = 'digits'"),
    "garbage-pretrained-file": (["run", *SMALL_DATA, "--set", "model.name=tiny-clip",
                                 "--set", "model.pretrained={tmp}/garbage.pt"], "model.pretrained"),
    # argparse's own errors, as one line
    "if-exists-choice": (["run", "--if-exists", "maybe"],
                         "error: --if-exists 'maybe': expected one of refuse, resume, overwrite"),
    "unknown-command": (["rnu"], "command 'rnu': expected one of run, resume, report, info, data"),
    "unknown-option": (["run", "--bogus"], "unrecognized arguments: --bogus"),
    "report-format": (["report", "{tmp}", "--format", "xml"], "--format 'xml': expected one of table"),
    "no-command": ([], "required: command"),
    # a binary file given as the config
    "binary-config": (["run", "{tmp}/binary.toml"], "binary.toml"),
    "png-config": (["run", "{tmp}/image.toml"], "image.toml"),
    # numbers
    "rounds-1e20": (["run", "--set", "rounds=1e20"], "rounds = '1e20'"),
    "lr-inf": (["run", "--set", "train.lr=inf"], "train.lr = 'inf'"),
    "n-ctx-huge": (["run", "--set", "prompt.n_ctx=3000000"], "prompt.n_ctx = 3000000"),
    # the run directory (or the figure directory) cannot be made or written
    "out-is-file": (["run", *SMALL_DATA, "--out", "{tmp}/afile"], "--out '{tmp}/afile': is a file"),
    "out-below-file": (["run", *SMALL_DATA, "--out", "{tmp}/afile/sub/run"],
                       "--out '{tmp}/afile/sub/run': lies below '{tmp}/afile', which is a file"),
    "quickstart-out-is-file": (["run", "--out", "{tmp}/afile"], "--out '{tmp}/afile': is a file"),
    "config-out-below-file": (["run", *SMALL_DATA, "--set", "out={tmp}/afile/x"], "'{tmp}/afile/x'"),
    "plot-is-file": (["report", "{tmp}", "--plot", "{tmp}/afile"], "--plot '{tmp}/afile': is a file"),
    "plot-below-file": (["report", "{tmp}", "--plot", "{tmp}/afile/figs"], "--plot '{tmp}/afile/figs': lies below"),
}
# one of each kind, also as a real process
SUBPROCESS = ("unknown-nested-key", "invalid-toml", "unknown-model", "garbage-pretrained-file",
              "if-exists-choice", "binary-config", "out-below-file")


def _files(tmp: Path) -> None:
    (tmp / "bad.toml").write_text("rounds = [\n")
    (tmp / "unknown.toml").write_text("rounds = 2\n[train]\nnope = 1\n")
    (tmp / "garbage.pt").write_bytes(b"this is not a checkpoint\n")
    (tmp / "binary.toml").write_bytes(bytes(range(256)))
    (tmp / "image.toml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    (tmp / "afile").write_text("a file, not a directory\n")


def _argv(name: str, tmp: Path) -> list[str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in CASES[name][0]]
    if argv[:1] == ["run"] and "--out" not in argv and not any(a.startswith("out=") for a in argv):
        argv += ["--out", str(tmp / "out" / name)]
    return argv


def _check_error(name: str, tmp: Path, rc: int, stderr: str) -> None:
    expect = CASES[name][1].replace("{tmp}", str(tmp))
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert expect in lines[0], lines[0]
    assert rc == 2, (rc, stderr)
    assert not (tmp / "out" / name / "results.h5").exists()      # nothing ran, nothing was written


@pytest.fixture
def keep_signals():
    """cli.main installs SIGTERM/SIGUSR1 handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("name", list(CASES))
def test_cli_main_bad_input_one_error_line_exit_2(name, tmp_path, capsys, keep_signals, monkeypatch):
    for var in _LAUNCHER_VARS + ("PFEDMOAP_MPI",):
        monkeypatch.delenv(var, raising=False)
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(_argv(name, tmp_path))
    _check_error(name, tmp_path, rc, capsys.readouterr().err)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and k != "PFEDMOAP_MPI"}
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(argv, cwd):
    return subprocess.run([sys.executable, "-m", "pfedmoap.cli", *argv], capture_output=True, text=True,
                          timeout=120, env=_env(), cwd=cwd)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """Every subprocess case started with the module's first test, two at a time, so they overlap
    with the in-process tests; each test waits only for its own."""
    tmp = tmp_path_factory.mktemp("cli")
    _files(tmp)
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {"info": pool.submit(_cli, ["info"], tmp)}
    for name in SUBPROCESS:
        futures[name] = pool.submit(_cli, _argv(name, tmp), tmp)
    yield tmp, futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("name", SUBPROCESS)
def test_cli_process_bad_input_one_error_line_exit_2(cli_runs, name):
    tmp, futures = cli_runs
    p = futures[name].result()
    _check_error(name, tmp, p.returncode, p.stderr)


def test_cli_info(cli_runs):
    import open_clip
    import torch
    p = cli_runs[1]["info"].result()
    assert p.returncode == 0, p.stderr
    assert f"torch {torch.__version__}" in p.stdout
    assert f"open_clip {open_clip.__version__}" in p.stdout
    assert "world size 1" in p.stdout.splitlines()
    assert p.stderr == ""


def _unwritable_dir(tmp: Path) -> Path:
    """A directory this process cannot write in: a 0o555 one, or for root (whom permission bits do
    not stop) a kernel file system."""
    ro = tmp / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    for d in (ro, Path("/sys"), Path("/proc")):
        try:
            (d / ".pfedmoap-probe").mkdir()
        except OSError:
            return d
        (d / ".pfedmoap-probe").rmdir()
    pytest.skip("no unwritable directory here")


@pytest.mark.parametrize("below", ["", "new/run"])
def test_out_in_a_read_only_directory_is_one_error_at_start(tmp_path, capsys, keep_signals, monkeypatch, below):
    for var in _LAUNCHER_VARS + ("PFEDMOAP_MPI",):
        monkeypatch.delenv(var, raising=False)
    ro = _unwritable_dir(tmp_path)
    out = str(ro / below) if below else str(ro)
    try:
        rc = cli.main(["run", *SMALL_DATA, "--set", "model.name=tiny-clip", "--set", "model.pretrained=",
                       "--out", out])
    finally:
        (tmp_path / "read-only").chmod(0o755)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: --out {out!r}: cannot write"), lines[0]
    assert "# pfedmoap" not in captured.out          # refused before the run started


def test_run_prints_a_short_header_not_the_config(tmp_path, capsys, keep_signals, monkeypatch):
    for var in _LAUNCHER_VARS + ("PFEDMOAP_MPI",):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    rc = cli.main(["run", *SMALL_DATA, "--set", "model.name=tiny-clip", "--set", "model.pretrained=",
                   "--set", "rounds=1", "--set", "run.progress=false", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    headers = [line for line in lines if line.startswith("# pfedmoap")]
    assert headers == [f"# pfedmoap zeroshot: synthetic, dirichlet partition, 2 clients, 1 round, "
                       f"world size 1 -> {out}"], captured.out
    # not the ~70-line resolved config (it is in results.h5)
    assert not any(line.startswith("[") and line.endswith("]") for line in lines), captured.out
    for key in ("n_ctx", "gating_dim", "noise_multiplier", "warmup_lr"):
        assert key not in captured.out
    assert (out / "results.h5").exists()
