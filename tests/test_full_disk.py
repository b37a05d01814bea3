"""A full disk (issue 19): results.h5's first write and FedOTP's dense-feature cache failing with
ENOSPC are one error line, exit 2, with no h5py "Exception ignored" traceback and no crash (the
process used to segfault at exit), at 1 and 3 ranks; no temporary file is left.

The full disk is a 16 KiB tmpfs mounted in a private mount namespace of the test's own subprocess
(`unshare -m`): it exists only for that process and goes with it, nothing on the machine changes.
Where namespaces are not permitted the tests skip; the mapping of a write error to the one line is
also tested in-process by injecting OSError(ENOSPC)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pfedmoap.data import features
from pfedmoap.errors import PFedMoAPError

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
TINY = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=4",
        "data.n_train=200", "data.n_test=80", "data.min_size=5", "data.cache_dir=", "rounds=2",
        "train.local_epochs=1", "run.threads=1", "algorithm=pfedmoap", "prompt.n_ctx=4",
        "moe.n_experts=3", "moe.gating_dim=32", "moe.gating_heads=4"]
# mount a tmpfs of $1 bytes on $2, run the rest, list what is left in $2, exit with the run's status
SCRIPT = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; d="$2"; shift 2; "$@"; rc=$?; ' \
         'echo "LEFT: $(ls -A "$d"/* 2>/dev/null | tr "\\n" " ")"; exit $rc'


def _namespaces() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    return None if p.returncode == 0 else f"no private mount namespace here (unshare -m: {p.stderr.strip()[:80]})"


def _on_full_disk(mnt: Path, argv: list[str], size: str = "16k") -> subprocess.CompletedProcess:
    why = _namespaces()
    if why:
        pytest.skip(f"a full file system needs a private tmpfs mount: {why}")
    mnt.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", SCRIPT, "sh", size, str(mnt),
                           *argv], capture_output=True, text=True, env=ENV, timeout=300)


def _run(out: Path, sets: list[str], ranks: int) -> list[str]:
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    if ranks:
        if not os.path.exists(MPIEXEC):
            pytest.skip("no mpiexec")
        args = [MPIEXEC, "-n", str(ranks), *args]
    return args


def _one_clean_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and needle in errors[0] and "(No space left on device)" in errors[0], p.stderr[-3000:]
    rest = [line for line in p.stderr.splitlines() if not line.startswith(("error", "Abort(2)"))
            and line.strip()]
    assert not rest, p.stderr[-3000:]        # no traceback, no "Exception ignored", no crash


@pytest.mark.parametrize("ranks", [0, 3])
def test_results_h5_on_a_full_disk_is_one_line(tmp_path, ranks):
    mnt = tmp_path / "full"
    p = _on_full_disk(mnt, _run(mnt / "r", TINY, ranks))
    _one_clean_error(p, f"{mnt / 'r' / 'results.h5'}: could not be written")
    assert ".tmp" not in p.stdout.split("LEFT:")[-1]


@pytest.mark.parametrize("ranks", [0, 3])
def test_fedotp_dense_cache_on_a_full_disk_is_one_line(tmp_path, ranks):
    mnt = tmp_path / "full"
    sets = [s for s in TINY if not s.startswith(("algorithm=", "data.cache_dir=", "moe."))]
    p = _on_full_disk(mnt, _run(tmp_path / "r", sets + ["algorithm=fedotp", f"data.cache_dir={mnt / 'cache'}"], ranks))
    _one_clean_error(p, f"data.cache_dir = '{mnt / 'cache'}': the feature cache features-")
    assert ".tmp" not in p.stdout.split("LEFT:")[-1]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_failed_cache_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, code):
    """Without a full disk: the write error injected into the dense cache's writing."""
    def failing(backbone, split, need):
        yield 0, 1, np.zeros((1, 4), np.float32), np.zeros((1, 2, 4), np.float16)
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(features, "_dense_chunks", failing)
    monkeypatch.setattr(features, "dense_shape", lambda backbone: (2, 4))
    split = type("Split", (), {"__len__": lambda self: 3})()
    path = tmp_path / "cache" / "features-x.h5"
    with pytest.raises(PFedMoAPError) as e:
        features.write_dense(path, None, split)
    assert str(e.value) == (f"data.cache_dir = '{tmp_path / 'cache'}': the feature cache features-x.h5 could not be "
                            f"written ({os.strerror(code)}); free space or set data.cache_dir to a directory with "
                            f"room (or to \"\" for no cache)")
    assert list((tmp_path / "cache").iterdir()) == []
