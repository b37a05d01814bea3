"""FedPGP: a global prompt plus a per-client low-rank personal term U V, with a CLIP-guided
prompt-wise contrastive loss (method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest


@dataclass
class FedPGPOptions:
    # Defaults from the authors' code (github.com/TianyuCuiOvO/FedPGP): scripts/plot_basetonew_base.sh,
    # the repository's one script (MODEL=FedPGP: BOTTLENECK=8, MU=0.5, TEMP=0.5); its earlier
    # scripts/plot_ours_cifar10.sh (commit ba16025, model then named "reparaFL") ran the same three.
    # federated_main.py's argparse defaults differ (--bottleneck 4, --mu 1) and are not what the
    # scripts run. The optimiser (SGD at 0.001, no warm-up or decay) is the overlay paper/methods/fedpgp.
    rank: int = 8                 # r, the "bottleneck": the personal term is U (n_ctx, r) @ V (r, W)
    mu: float = 0.5               # weight of the contrastive loss added to the cross-entropy
    temp: float = 0.5             # temperature of the contrastive loss
    all_clients_first_round: bool = True   # round 0 trains every client, as federated_main.py does

    def validate(self):
        if not 1 <= self.rank <= 4096:
            raise PFedMoAPError(f"fedpgp.rank = {self.rank}: expected 1 to 4096")
        if not self.mu >= 0:
            raise PFedMoAPError(f"fedpgp.mu = {self.mu}: expected >= 0")
        if not self.temp > 0:
            raise PFedMoAPError(f"fedpgp.temp = {self.temp}: expected > 0")


register(Manifest("fedpgp", "pfedmoap.algorithms.fedpgp.method:FedPGP", label="FedPGP", order=82, quickstart=True,
                  section="fedpgp", options=FedPGPOptions,
                  summary="a global prompt (FedAvg) plus a personal low-rank term U V per client, with a "
                          "CLIP-guided contrastive loss"))
