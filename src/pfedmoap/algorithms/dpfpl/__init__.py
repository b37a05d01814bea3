"""DP-FPL: a global prompt plus a personal prompt whose low-rank part trains under local DP
(method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest


@dataclass
class DPFPLOptions:
    # Sources: linhhtran/DP-FPL, federated_main.py (argparse defaults, also srun_main.sh's
    # arguments) and trainers/DP_FPL.py; Dassl's defaults for what they leave unset.
    rank: int = 8                 # --rank 8: the rank r of the local prompt's factorisation U V
    noise: float = 0.0            # --noise (default 0 = no local DP; FLiP's default 0.4): the
                                  # reference's privacy level; local noise std = sqrt(rounds ln(1e5)) / noise * clip / batch
    clip: float = 10.0            # --norm-thresh 10: L2 clip of each step's gradient of U and of V (local DP)
    grad_scale: float = 0.1       # compute_full_grad divides the U and V gradients by 10 before mapping them to the local prompt
    lr: float = 0.001             # --lr 0.001; SGD, configs/trainers/DP-FPL: single_step never stepped = constant

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise PFedMoAPError(msg)
        need(1 <= self.rank <= 4096, f"dpfpl.rank = {self.rank}: expected 1 to 4096")
        need(self.noise >= 0, f"dpfpl.noise = {self.noise}: expected >= 0 (0: no local DP)")
        need(self.clip > 0, f"dpfpl.clip = {self.clip}: expected > 0")
        need(self.grad_scale > 0, f"dpfpl.grad_scale = {self.grad_scale}: expected > 0")
        need(self.lr > 0, f"dpfpl.lr = {self.lr}: expected > 0")


register(Manifest("dpfpl", "pfedmoap.algorithms.dpfpl.method:DPFPL", label="DP-FPL", order=100, quickstart=True,
                  section="dpfpl", options=DPFPLOptions,
                  summary="a global (FedAvg) prompt plus a personal prompt = low-rank U V + residual, "
                          "U V trained under local DP"))
