"""FedOTP: a global and a local prompt per client, matched to the image's patch features by
optimal transport (method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import DataNeeds, Manifest

OT_METHODS = ("cot", "sinkhorn")           # pfedmoap.ot.METHODS (checked equal in tests/test_fedotp.py)
OT_STOPS = ("per_problem", "batch")        # pfedmoap.ot.STOPS


@dataclass
class FedOTPOptions:
    method: str = "cot"            # "cot" (partial OT, the reference's COT) | "sinkhorn" (balanced)
    eps: float = 0.1               # entropic regularisation
    thresh: float = 1e-3           # stop: mean |change| of the watched scaling vector below this
    max_iter: int = 100            # OT iterations at most
    top_percent: float = 0.8       # COT: mass moved (the published scripts' 0.8, see pfedmoap.ot)
    stop: str = "per_problem"      # "per_problem" | "batch" (the reference's rule)
    n_prompts: int = 2             # global + local; only 2 is supported
    all_clients_first_round: bool = True   # round 0 trains every client, as the reference does

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise PFedMoAPError(msg)
        need(self.method in OT_METHODS, f"fedotp.method = {self.method!r}: expected one of {', '.join(OT_METHODS)}")
        need(self.stop in OT_STOPS, f"fedotp.stop = {self.stop!r}: expected one of {', '.join(OT_STOPS)}")
        need(self.eps > 0, f"fedotp.eps = {self.eps}: expected > 0")
        need(self.thresh >= 0, f"fedotp.thresh = {self.thresh}: expected >= 0")
        need(1 <= self.max_iter <= 10 ** 6, f"fedotp.max_iter = {self.max_iter}: expected 1 to 1000000")
        need(0 < self.top_percent <= 1, f"fedotp.top_percent = {self.top_percent}: expected a fraction in (0, 1]")
        need(self.n_prompts == 2, f"fedotp.n_prompts = {self.n_prompts}: only 2 (one global and one local "
                                  f"prompt) is supported")


register(Manifest("fedotp", "pfedmoap.algorithms.fedotp.method:FedOTP", label="FedOTP", order=80, quickstart=True,
                  section="fedotp", options=FedOTPOptions, data=DataNeeds(dense=True),
                  summary="a global and a local prompt per client, matched to the image's patches by "
                          "optimal transport"))
