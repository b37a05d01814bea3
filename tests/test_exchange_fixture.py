"""Methods own their exchange (issue 12): every existing method, router, DP and partial participation
gives the accuracy, loss, experts, participation and bytes of the recording
(tests/fixtures/exchange_recorded.npz), in one process and under mpiexec -n 3.

The recording was made on one CPU; the suite meets others, whose SIMD kernels sum float32 in
another order (issue 19). So a replay is compared as `exchange_cases.compare` says: integers, masks
and bytes exactly, loss and accuracy within tolerances stated (with their reasons) there, knn
expert ids exactly except where the recorded distances tie within float32 rounding. One process and
three ranks on the same machine must agree bit for bit. What issue 21 stopped sending is taken
off the recording explicitly (`as_sent_since_issue_21`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures"))
import exchange_cases  # noqa: E402

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")

# Issue 21 changed what travels, on purpose; the recording is adjusted for it exactly
# (`as_sent_since_issue_21`) before the replay is compared with it:
# - pFedMoAP's experts go to the clients without their ids (int32, one per expert slot, sent to
#   every routed client: in the pinned "snapshot" participation every client, every round);
# - under DP the sample count (one int32 per participant) is no longer uploaded, and FedAvg weighs
#   the noised uploads equally, which changes these cases' science by design: their accuracy, loss
#   and experts are not compared with the recording (tests/test_dp_*.py check DP runs; the
#   1-vs-3-ranks test below still compares every array of them).
DP_CASES = ("pp-pfedmoap-dp", "pp-promptfl-dp")


def as_sent_since_issue_21(recorded: dict) -> dict:
    out = dict(recorded)
    for case in exchange_cases.CASES:
        ex = recorded.get(f"{case}/experts")
        if ex is not None and ex.shape[-1]:
            out[f"{case}/bytes_down"] = recorded[f"{case}/bytes_down"] - 4 * ex.shape[-1]
        if case in DP_CASES:
            up = recorded[f"{case}/bytes_up"]
            out[f"{case}/bytes_up"] = up - 4 * recorded[f"{case}/participated"].astype(up.dtype)
            for f in ("accuracy", "loss", "experts", "knn_distance", "knn_unit"):
                out.pop(f"{case}/{f}", None)
    return out


def _recording() -> dict:
    return dict(np.load(exchange_cases.RECORDED))


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """replay(ranks) -> {case/field: array}, each rank count run once (0: no mpiexec)."""
    done: dict[int, dict] = {}

    def run(ranks: int) -> dict:
        if ranks and not os.path.exists(MPIEXEC):
            pytest.skip("no mpiexec beside the venv's python")
        if ranks not in done:
            out = tmp_path_factory.mktemp(f"exchange{ranks}") / "got.npz"
            cmd = [sys.executable, str(HERE / "fixtures" / "exchange_cases.py"), "record", str(out)]
            env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
            p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + cmd, capture_output=True,
                               text=True, timeout=1800, env=env)
            assert p.returncode == 0, p.stderr[-3000:]
            done[ranks] = dict(np.load(out))
        return done[ranks]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [0, 3])        # 0: plain python, no mpiexec
def test_exchange_matches_the_recording(replay, ranks):
    problems, checked = exchange_cases.compare(as_sent_since_issue_21(_recording()), replay(ranks))
    assert not problems, "\n".join(problems)
    assert checked == 70 - 5                 # every case ran and was compared (less the DP cases' science)


@pytest.mark.slow
def test_one_process_equals_three_ranks_bit_for_bit(replay):
    one, three = replay(0), replay(3)
    assert sorted(one) == sorted(three)
    for key in one:
        assert one[key].dtype == three[key].dtype, key
        assert np.array_equal(one[key], three[key], equal_nan=True), f"{key} differs between 1 and 3 ranks"


# The comparison itself, on the recordings with one thing changed (no runs: fast).

def _check(got: dict) -> list[str]:
    return exchange_cases.compare(_recording(), got)[0]


def test_the_recording_holds_against_issue_12s_from_another_machine():
    """exchange_before.npz was recorded at 81a992b on another CPU: not bit for bit equal (so the
    tolerances are exercised by real cross-machine data), but within them."""
    recorded = _recording()
    before = dict(np.load(HERE / "fixtures" / "exchange_before.npz"))
    assert exchange_cases.compare(recorded, before) == ([], 70)
    differs = [k for k in recorded if k in before and not np.array_equal(recorded[k], before[k])]
    assert "qs-local/loss" in differs and "pp-pfedmoap/experts" in differs


def test_the_recording_compares_equal_to_itself_and_its_experts_are_knn_answers():
    recorded = _recording()
    assert exchange_cases.compare(recorded, dict(recorded)) == ([], 70)
    knn_cases = [c for c in exchange_cases.CASES if f"{c}/knn_distance" in recorded]
    assert knn_cases == ["qs-pfedmoap", "pp-pfedmoap", "pp-pfedmoap-dp"]
    for case in knn_cases:                # the recorded distances rank the recorded experts
        ex, d = recorded[f"{case}/experts"], recorded[f"{case}/knn_distance"]
        unit = recorded[f"{case}/knn_unit"]
        routed = ~np.isnan(d).all(-1)
        assert routed.any(), case
        for r, c in zip(*np.nonzero(routed)):
            ids = ex[r, c][ex[r, c] >= 0]
            assert np.isfinite(d[r, c, ids]).all() and np.isfinite(d[r, c]).sum() == len(ids), (case, r, c)
            slack = exchange_cases.KNN_UNITS * (unit[r, c, ids][1:] + unit[r, c, ids][:-1])
            assert (np.diff(d[r, c, ids]) >= -slack).all(), (case, r, c)


@pytest.mark.parametrize("field", ["participated", "bytes_up", "bytes_down"])
def test_integers_and_masks_must_be_exact(field):
    got = _recording()
    a = got["pp-promptfl/" + field].copy()
    a[1, 2] = (not a[1, 2]) if a.dtype == bool else a[1, 2] + 1
    got["pp-promptfl/" + field] = a
    assert _check(got) == [f"pp-promptfl/{field} differs"]


@pytest.mark.parametrize("case", ["pp-promptfl-dp", "qs-local"])
def test_loss_within_the_tolerance_holds_beyond_it_fails(case):
    rtol = exchange_cases.TOLERANCES[case[:2]][0]
    got = _recording()
    loss = got[f"{case}/loss"]
    got[f"{case}/loss"] = loss * np.float32(1 + rtol / 2)
    assert _check(got) == []
    got[f"{case}/loss"] = loss * np.float32(1 + rtol * 2)
    [problem] = _check(got)
    assert problem.startswith(f"{case}/loss: max relative difference")


@pytest.mark.parametrize("case", ["pp-local", "qs-local"])
def test_accuracy_may_differ_by_a_few_images_per_client_no_more(case):
    recorded = _recording()
    n, acc = recorded[f"{case}/n_test"], recorded[f"{case}/accuracy"]
    flips = exchange_cases.TOLERANCES[case[:2]][1]
    got = dict(recorded)
    got[f"{case}/accuracy"] = (acc + np.float32(flips) / n).astype(np.float32)
    assert _check(got) == []
    got[f"{case}/accuracy"] = (acc + np.float32(flips + 1) / n).astype(np.float32)
    assert _check(got) == [f"{case}/accuracy: {flips + 1} images of a client differ in a round > {flips}"]


def _widest_gap(case: str):
    """(round, client, j, a, b): the consecutive recorded experts a = ids[j], b = ids[j + 1] whose
    distance gap is the most units of rounding: the clearest ordering in the recording."""
    recorded = _recording()
    ex, d, u = (recorded[f"{case}/{k}"] for k in ("experts", "knn_distance", "knn_unit"))
    best = None
    for r, c in zip(*np.nonzero(~np.isnan(d).all(-1))):
        ids = ex[r, c][ex[r, c] >= 0]
        for j in range(len(ids) - 1):
            a, b = ids[j], ids[j + 1]
            ratio = (d[r, c, b] - d[r, c, a]) / (u[r, c, a] + u[r, c, b])
            if best is None or ratio > best[0]:
                best = (ratio, r, c, j, a, b)
    return best


def test_an_expert_swap_is_allowed_only_at_a_recorded_tie():
    case = "pp-pfedmoap"
    ratio, r, c, j, a, b = _widest_gap(case)
    assert ratio > exchange_cases.KNN_UNITS          # a clear order: swapping it is an error ...
    recorded = _recording()
    got = dict(recorded)
    ex = recorded[f"{case}/experts"].copy()
    ex[r, c, [j, j + 1]] = [b, a]
    got[f"{case}/experts"] = ex
    [problem] = _check(got)
    assert problem.startswith(f"{case}/experts: round {r + 1} client {c}:") and "no tie" in problem
    # ... and so it is when the replay's distances moved, but less than the gap
    d = recorded[f"{case}/knn_distance"].copy()
    gap = d[r, c, b] - d[r, c, a]
    d[r, c, a] += gap / 8
    got[f"{case}/knn_distance"] = d
    [problem] = _check(got)
    assert "no tie" in problem or "the replay's distances moved by" in problem
    # ... while the swap this machine made against issue 12's recording (experts 1 and 2 of client 0
    # in round 4: distances 1.3947e-5 and 1.3968e-5) is a tie
    before = dict(np.load(HERE / "fixtures" / "exchange_before.npz"))
    got = dict(recorded)
    got[f"{case}/experts"] = before[f"{case}/experts"]
    assert (got[f"{case}/experts"] != recorded[f"{case}/experts"]).any()
    assert _check(got) == []


def test_seeded_routers_must_give_the_same_expert_ids():
    got = _recording()
    ex = got["pp-pfedmoap-random/experts"].copy()
    r, c = np.argwhere((ex >= 0).sum(-1) >= 2)[0]
    ex[r, c, [0, 1]] = ex[r, c, [1, 0]]
    got["pp-pfedmoap-random/experts"] = ex
    assert _check(got) == ["pp-pfedmoap-random/experts differs"]
