"""PromptFolio: a global (FedAvg) and a local prompt per client whose text features are mixed with
a portfolio weight theta (method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest


@dataclass
class PromptFolioOptions:
    # theta, the local prompt's share of the mixed text features: 0 = the global prompt alone, 1 = the
    # local prompt alone. 0.4 is the authors' (github.com/PanBikang/PromptFolio): federated_main.py
    # `--frac_p` default and the README's example command; PMFLT's config/models/promptfolio.yaml
    # (FRAC: 0.4) agrees, FLiP's main.py `--folio_frac` defaults to 0.2.
    theta: float = 0.4

    def validate(self):
        if not 0 <= self.theta <= 1:
            raise PFedMoAPError(f"promptfolio.theta = {self.theta}: expected 0 <= theta <= 1")


register(Manifest("promptfolio", "pfedmoap.algorithms.promptfolio.method:PromptFolio", label="PromptFolio",
                  order=84, quickstart=True, section="promptfolio", options=PromptFolioOptions,
                  summary="a global (FedAvg) and a local prompt whose text features are mixed "
                          "(1 - theta) global + theta local"))
