"""Paper tables as configs (src/pfedmoap/tables.py, configs/paper/tables/tables.toml): the
packaged tables, the CoOp overlay, how a run's config is layered, overlays on `pfedmoap run`,
one-line errors, `pfedmoap table`, and the DP ε in the ordinary report.

The end-to-end pipeline (runs through tools/run_table.sh and jobs/table.sbatch, the rendered
table against the HDF5 files) is tests/test_mini_table.py."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from pfedmoap import algorithms, cli, config, configs, tables
from pfedmoap.errors import PFedMoAPError

PAPER_METHODS = ["ZS-CLIP", "CoOp", "PromptFL", "PromptFL+FT", "PromptFL+FedPer", "PromptFL+FedProx",
                 "PromptFL+FedAMP", "pFedPrompt", "FedOTP", "pFedMoAP"]
ALGORITHM = {"ZS-CLIP": "zeroshot", "CoOp": "local", "PromptFL": "promptfl", "PromptFL+FT": "promptfl_ft",
             "PromptFL+FedPer": "fedper", "PromptFL+FedProx": "fedprox", "PromptFL+FedAMP": "fedamp",
             "pFedPrompt": "pfedprompt", "FedOTP": "fedotp", "pFedMoAP": "pfedmoap"}


# ------------------------------------------------------------------------ the packaged tables

@pytest.fixture(scope="module")
def packaged():
    return tables.load()


def test_paper_tables_have_the_papers_rows_and_columns(packaged):
    few = packaged["fewshot"]
    assert [c.name for c in few.columns] == ["Flowers102", "OxfordPets", "Food101", "Caltech101", "DTD"]
    assert [c.config for c in few.columns] == ["paper/oxford_flowers", "paper/oxford_pets", "paper/food101",
                                               "paper/caltech101", "paper/dtd"]
    assert [c.config for c in packaged["label_shift"].columns] == ["paper/cifar10", "paper/cifar100"]
    for name in ("fewshot", "label_shift", "domainnet", "office_caltech10"):
        t = packaged[name]
        assert [r.name for r in t.rows] == PAPER_METHODS and t.seeds == (1, 2, 3)
        assert [r.name for r in t.rows if r.missing] == []          # pFedPrompt runs too (issue 23)
        assert len(t.runs()) == len(t.columns) * 10 * 3
    for name, domains in (("domainnet", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]),
                          ("office_caltech10", ["amazon", "caltech", "dslr", "webcam"])):
        t = packaged[name]
        assert t.layout == "domains" and list(t.domains) == domains and len(t.columns) == 1
        assert t.columns[0].config == f"paper/{name}"


@pytest.mark.parametrize("name", ["fewshot", "label_shift", "domainnet", "office_caltech10"])
def test_every_run_of_a_paper_table_is_its_method_on_the_data_set_config(packaged, name):
    t = packaged[name]
    for spec in t.runs():
        cfg = spec.config("OUT")
        base = config.load(spec.column.config)
        assert cfg.algorithm == ALGORITHM[spec.row.name] and cfg.seed == spec.seed
        assert cfg.out == os.path.join("OUT", name, spec.column.key, spec.row.key, f"seed{spec.seed}")
        dense = algorithms.manifest(cfg.algorithm).data.dense
        if dense:      # FedOTP: patch features exist for clean images only (build.py refuses views)
            assert cfg.data.augment_mode == "none" and base.data.augment_mode != "none"
            assert cfg.data == replace(base.data, augment="none", augment_views=0)
        else:          # the data-set config's own values
            assert cfg.data == base.data
        assert cfg.model == base.model
        if spec.row.name == "CoOp":        # the overlay: 25 local epochs, no communication, all clients
            assert (cfg.rounds, cfg.train.local_epochs, cfg.train.frac) == (1, 25, 1.0)
        else:
            assert (cfg.rounds, cfg.train.local_epochs, cfg.train.frac, cfg.train.batch_size) == (
                base.rounds, base.train.local_epochs, base.train.frac, base.train.batch_size)
        if spec.row.name == "FedOTP":      # its authors' recipe (HongxiaLee/FedOTP's scripts)
            f, t = cfg.options, cfg.train
            assert (f.method, f.top_percent, f.thresh, f.max_iter) == ("cot", 0.8, 1e-3, 100)
            assert f.eps == (0.01 if name == "fewshot" else 0.1)
            # SGD at 0.001 throughout: every local epoch is a warm-up epoch at 0.001
            assert t.lr == t.warmup_lr == 0.001 and t.warmup_epochs >= t.local_epochs
            assert (t.momentum, t.weight_decay) == (0.9, 5e-4)
        else:
            assert cfg.train == replace(base.train, local_epochs=cfg.train.local_epochs, frac=cfg.train.frac)


def test_ablations_sweep_one_key_of_pfedmoap(packaged):
    """The paper's grids: Fig. 4's λ from 0 to 5, Table 8's K + 1 from 5 to 30 on DomainNet (its
    K + 1 = 20 row is Table 3's), Table 9's d up to 1024, Table 7's linear gate over 3 experts,
    Fig. 3's shots."""
    swept = {"ablation_lambda": ("moe", "lam", [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0]),
             "ablation_experts": ("moe", "n_experts", [5, 10, 15, 20, 25, 30]),
             "ablation_gating_dim": ("moe", "gating_dim", [32, 64, 128, 256, 512, 1024]),
             "ablation_gate": ("moe", "gate", ["attention", "linear", "attention", "attention"]),
             "ablation_shots": ("data", "shots", [1, 2, 4, 8, 16])}
    for name, (section, key, values) in swept.items():
        t = packaged[name]
        column = "domainnet" if name == "ablation_experts" else "dtd"
        assert t.columns == packaged[column if column == "domainnet" else "fewshot"].columns
        first = [spec.config("OUT") for spec in t.runs() if spec.column.key == column and spec.seed == 1]
        assert {c.algorithm for c in first} == {"pfedmoap"}
        assert [getattr(c.options if section == c.section else getattr(c, section), key) for c in first] == values
    assert packaged["ablation_experts"].layout == "domains"
    main = next(s.config("OUT") for s in packaged["domainnet"].runs() if s.row.key == "pfedmoap")
    k20 = next(s.config("OUT") for s in packaged["ablation_experts"].runs() if s.row.key == "k20")
    assert k20.hash() == main.hash() and k20.options.n_experts == 20       # Table 8's row = Table 3's
    gate = [spec.config("OUT") for spec in packaged["ablation_gate"].runs() if spec.seed == 1][:4]
    assert [c.options.aggregate_gate for c in gate] == [False, False, False, True]
    assert [c.options.n_experts for c in gate] == [10, 3, 3, 10]
    shots = [spec.config("OUT") for spec in packaged["ablation_shots"].runs() if spec.seed == 1][:5]
    assert [c.train.batch_size for c in shots] == [1, 2, 4, 8, 16]


def test_overlay_is_not_listed_as_a_config_and_resolves_by_name():
    assert all("methods" not in n for n in configs.packaged())
    cfg = config.load("paper/cifar10", ["seed=2"], overlays=["paper/methods/coop"])
    assert (cfg.algorithm, cfg.rounds, cfg.train.local_epochs, cfg.train.frac, cfg.seed) == ("local", 1, 25, 1.0, 2)
    assert cfg.data.n_clients == 100 and cfg.model.name == "RN50-quickgelu"
    with pytest.raises(PFedMoAPError, match=r"^overlay 'paper/methods/nope' does not exist .*paper/methods/coop"):
        config.load("paper/cifar10", overlays=["paper/methods/nope"])
    with pytest.raises(PFedMoAPError, match="overlay '../paper/food101' does not exist"):
        config.load("paper/cifar10", overlays=["../paper/food101"])


def test_run_with_overlay_through_the_cli_parser(tmp_path):
    args = cli._parser().parse_args(["run", "paper/food101", "--with", "paper/methods/coop",
                                     "--set", "train.local_epochs=3", "--out", str(tmp_path / "r")])
    [cfg] = cli._configs(args)
    assert (cfg.algorithm, cfg.rounds, cfg.train.local_epochs, cfg.data.dataset) == ("local", 1, 3, "food101")
    mine = tmp_path / "mine.toml"
    mine.write_text('rounds = 4\n[train]\nlr = 0.5\n')
    # no CONFIG: the quick-start base with the overlay, one run (not the quick-start's comparison)
    [cfg] = cli._configs(cli._parser().parse_args(["run", "--with", str(mine), "--with", "paper/methods/coop"]))
    assert (cfg.algorithm, cfg.rounds, cfg.train.lr, cfg.data.dataset) == ("local", 1, 0.5, "digits")


# ------------------------------------------------------------------------ layering and errors

def _write(tmp_path, text, name="t.toml"):
    f = tmp_path / name
    f.write_text(text)
    return f


LAYERS = '''
seeds = [4, 7]
[tables.t]
title = "layers"
rows = [
    { name = "A" },
    { name = "B b", with = ["over.toml"] },
    { name = "C", with = ["over.toml"], set = ["train.lr=0.4"] },
    { name = "D", missing = "not here" },
]
columns = [{ name = "X", config = "base.toml", set = ["train.lr=0.2", "train.batch_size=7"] }]
'''


def test_layers_in_order_file_column_overlay_row_user_seed(tmp_path):
    _write(tmp_path, 'rounds = 3\n[train]\nlr = 0.1\nbatch_size = 5\nmomentum = 0.8\n', "base.toml")
    _write(tmp_path, '[train]\nlr = 0.3\nmomentum = 0.5\n', "over.toml")
    f = _write(tmp_path, LAYERS)
    t = tables.get("t", f)
    assert [r.key for r in t.rows] == ["a", "b_b", "c", "d"] and t.seeds == (4, 7)
    runs = t.runs()
    assert [(s.index, s.row.key, s.seed) for s in runs] == [(0, "a", 4), (1, "a", 7), (2, "b_b", 4), (3, "b_b", 7),
                                                           (4, "c", 4), (5, "c", 7)]
    cfgs = tables.configs_for("t", tmp_path / "o", [], [], f)
    lr = [c.train.lr for c in cfgs[::2]]
    assert lr == [0.2, 0.3, 0.4]                     # column set > file; overlay > column; row set > overlay
    assert [c.train.momentum for c in cfgs[::2]] == [0.8, 0.5, 0.5]
    assert {c.train.batch_size for c in cfgs} == {7} and {c.rounds for c in cfgs} == {3}
    user = tables.configs_for("t", tmp_path / "o", ["train.lr=0.5", "seed=99"], [5, 0], f)
    assert [(c.train.lr, c.seed) for c in user] == [(0.5, 7), (0.5, 4)]       # user > row; the seed is the table's
    assert user[0].out == str(tmp_path / "o" / "t" / "x" / "c" / "seed7")
    with pytest.raises(PFedMoAPError, match=r"^--index 6: table 't' has 6 runs \(indices 0 to 5"):
        tables.select(t, [6])
    listing = tables.table_main("runs", "t", f, "OUT").splitlines()
    assert listing[0].split("\t")[:2] == ["0", "OUT/t/x/a/seed4"]
    # column settings under a row's overlays: no command line layers them so; the table's own run
    assert listing[4].split("\t")[2] == f"pfedmoap run --table t --tables {f} --index 4 --out OUT"
    assert listing[-1] == "-\t(no run)\tD: not here"
    assert tables.table_main("runs", "t", f, count=True) == "6"
    assert tables.table_main("list", None, f).split() [:3] == ["t", "6", "runs"]


def test_every_listed_command_runs_exactly_the_tables_run(tmp_path):
    """`table runs` prints, per run, a command; parsed by `pfedmoap run` it must give the very
    config of the table's run: also for a column without a config file (a bare `pfedmoap run`
    starts from the quick-start) and for column settings under row overlays."""
    import shlex
    _write(tmp_path, 'rounds = 3\n[train]\nlr = 0.1\n', "base.toml")
    _write(tmp_path, '[train]\nlr = 0.3\n', "over.toml")
    f = _write(tmp_path, '''
seeds = [2]
[tables.t]
rows = [{ name = "A", set = ["algorithm=promptfl"] }, { name = "B", with = ["over.toml"] }]
columns = [{ name = "defaults", config = "" }, { name = "file", config = "base.toml" },
           { name = "file+set", config = "base.toml", set = ["train.lr=0.2"] }]
''')
    user = ["train.local_epochs=3"]
    listing = tables.table_main("runs", "t", f, str(tmp_path / "OUT"), sets=user).splitlines()
    specs = tables.get("t", f).runs()
    assert len(listing) == len(specs) == 6
    for line, spec in zip(listing, specs):
        command = line.split("\t")[2]
        argv = shlex.split(command)
        assert argv[:2] == ["pfedmoap", "run"]
        [cfg] = cli._configs(cli._parser().parse_args(argv[1:]))
        assert cfg.to_toml() == spec.config(tmp_path / "OUT", user).to_toml(), command
    assert "--table t" in listing[0] and "--table t" not in listing[2]   # "" column; a config file


@pytest.mark.parametrize("text, message", [
    ('[tables.t]\nrows = [{name = "A"}]\n', r"tables.t.columns: expected a non-empty list of columns"),
    ('[tables.t]\nrows = "m"\ncolumns = [{name = "X"}]\n', r"tables.t.rows = 'm': no such list under \[rows\]"),
    ('[tables.t]\nrows = [{name = "A"}, {name = "a"}]\ncolumns = [{name = "X"}]\n',
     r"tables.t.rows\[1\]: key 'a' is used twice in this table"),
    ('[tables.t]\nrows = [{name = "A", sett = []}]\ncolumns = [{name = "X"}]\n',
     r"tables.t.rows\[0\]: unknown key 'sett'"),
    ('[tables.t]\nrows = [{name = "A", set = ["lr"]}]\ncolumns = [{name = "X"}]\n',
     r"tables.t.rows\[0\]: set entry 'lr': expected 'key=value'"),
    ('[tables.t]\nrows = [{name = "A", key = "../x"}]\ncolumns = [{name = "X"}]\n',
     r"tables.t.rows\[0\]: key '../x': expected letters"),
    ('[tables.t]\nrows = [{name = "A"}]\ncolumns = [{name = "X"}]\nseeds = [1, 1]\n',
     r"tables.t.seeds = \[1, 1\]: expected a list of distinct integers"),
    ('[tables.t]\nrows = [{name = "A"}]\ncolumns = [{name = "X"}, {name = "Y"}]\nlayout = "domains"\n',
     r"tables.t: layout 'domains' takes one column"),
    ('[tables.t]\nrows = [{name = "A"}]\ncolumns = [{name = "X"}]\nlayout = "wide"\n',
     r"tables.t.layout = 'wide': expected one of datasets, domains"),
    ('[tables.t]\nrows = [{name = "A"}]\ncolumns = [{name = "X"}]\ntitel = "x"\n', r"tables.t: unknown key 'titel'"),
    ('[tables.t]\nrows = [{name = "A"}]\ncolumns = "u"\n', r"tables.t.columns = 'u': expected the name of a table"),
    ('[tables.t]\nrows = [{name = "A", set = ["algorithm=fedpox"]}]\ncolumns = [{name = "X"}]\n',
     r"tables.t.rows\[0\]: algorithm = 'fedpox': expected one of .*zeroshot"),
    ('x = 1\n', r"no \[tables.NAME\] section"),
    ('[tables\n', r"is not valid TOML"),
])
def test_a_bad_tables_file_is_one_error_naming_the_entry(tmp_path, text, message):
    with pytest.raises(PFedMoAPError, match=message):
        tables.load(_write(tmp_path, text))


def test_unknown_table_lists_the_tables():
    with pytest.raises(PFedMoAPError, match=r"^table 'table9': not in .*\(tables: fewshot, label_shift, domainnet"):
        tables.get("table9")


def test_cli_table_commands_and_errors(capsys, tmp_path):
    assert cli.main(["table", "runs", "fewshot", "--count"]) == 0
    assert capsys.readouterr().out.strip() == str(len(tables.get("fewshot").runs()))
    assert cli.main(["table", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["fewshot", "150", "runs"] and "[missing" not in out
    cases = [
        (["run", "paper/food101", "--table", "fewshot"], "error: --table fewshot: the table names each run's config"),
        (["run", "--index", "3"], "error: --tables and --index go with --table TABLE"),
        (["run", "--table", "fewshot", "--index", "150"], "error: --index 150: table 'fewshot' has 150 runs"),
        (["report", "--format", "latex", str(tmp_path)], "error: --format latex: only with --table TABLE"),
        (["report", "--table", "fewshot", str(tmp_path / "none")], f"error: {tmp_path / 'none'}: does not exist"),
        (["report", "--table", "fewshot", str(tmp_path)], f"error: {tmp_path}: no results.h5 under it"),
        (["table", "runs"], "error: table runs: expected a table name"),
    ]
    for argv, line in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(line), (argv, err)


# ------------------------------------------------------------------------ DP ε in the report

@pytest.mark.slow
def test_ordinary_report_shows_the_dp_epsilon_spent(tmp_path):
    from pfedmoap import store
    from pfedmoap.analysis import report_main
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    common = ["rounds=2", "train.local_epochs=1", "data.n_clients=4", "data.shots=4", "train.frac=0.5",
              "run.progress=false", "run.threads=1", f"data.cache_dir={tmp_path / 'cache'}",
              "data.domains=original", "algorithm=promptfl"]
    outs = []
    for name, extra in (("dp", ["dp.clip=1", "dp.noise_multiplier=1.2", "dp.delta=0.05"]), ("plain", [])):
        out = tmp_path / name
        args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
        for s in common + extra:
            args += ["--set", s]
        p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(str(out))
    eps = store.read_results(outs[0])["rounds"]["dp_epsilon"]
    assert eps.shape == (2,) and 0 < eps[0] < eps[1] < np.inf
    text = report_main(outs, "table")
    header, _, *rows = text.splitlines()
    assert header.rstrip().endswith("DP ε (δ)")
    dp_row = next(r for r in rows if "dp.clip=1.0" in r)
    plain_row = next(r for r in rows if "dp.clip=0.0" in r)
    assert dp_row.rstrip().endswith(f"{eps[-1]:.2f} (0.05)") and not plain_row.rstrip().endswith("(0.05)")
    records = {r["variant"]: r for r in csv.DictReader(io.StringIO(report_main(outs, "csv")))}
    dp = next(v for k, v in records.items() if "dp.clip=1.0" in k)
    plain = next(v for k, v in records.items() if "dp.clip=0.0" in k)
    assert float(dp["dp_epsilon_mean"]) == pytest.approx(eps[-1]) and float(dp["dp_delta"]) == 0.05
    assert plain["dp_epsilon_mean"] == plain["dp_delta"] == ""
    assert "DP ε" not in report_main(outs[1:], "table")          # no DP run: no column


def test_every_method_of_the_rows_is_registered(packaged):
    names = set(algorithms.names())
    for t in packaged.values():
        for r in t.rows:
            for s in r.sets:
                key, value = s.split("=", 1)
                if key == "algorithm":
                    assert value in names
