"""The paper's Table 6 as a packaged table (`pfedmoap run --table dp`): PromptFL, PromptFL+FedProx and
pFedMoAP on the five few-shot data sets under client-level DP at ε = 50 and 25, δ = 0.05."""
from __future__ import annotations

from dataclasses import replace

from pfedmoap import config, tables


def test_table6_rows_columns_and_budgets():
    packaged = tables.load()
    t = packaged["dp"]
    assert t.columns == packaged["fewshot"].columns and t.seeds == (1, 2, 3)
    assert [r.name for r in t.rows] == [f"{m}, ε = {e}" for e in (50, 25)
                                        for m in ("PromptFL", "PromptFL+FedProx", "pFedMoAP")]
    runs = t.runs()
    assert len(runs) == 6 * 5 * 3
    for spec in runs:
        cfg = spec.config("OUT")
        base = config.load(spec.column.config, [f"algorithm={cfg.algorithm}"])
        eps = 50.0 if spec.row.key.endswith("eps50") else 25.0
        assert cfg.algorithm == {"promptfl": "promptfl", "fedprox": "fedprox", "pfedmoap": "pfedmoap"}[
            spec.row.key.split("_")[0]]
        # the budget, not a noise multiplier: σ is solved for it; the paper's mechanism (the default)
        assert (cfg.dp.epsilon, cfg.dp.delta, cfg.dp.noise_multiplier) == (eps, 0.05, 0.0)
        assert cfg.dp.clip > 0 and cfg.dp.mechanism == "gradient"
        # otherwise the data set's few-shot config, unchanged
        assert replace(cfg, dp=base.dp, out=base.out, seed=base.seed) == base
