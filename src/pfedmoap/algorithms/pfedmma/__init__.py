"""pFedMMA: multi-modal adapters in both CLIP towers; only their shared projection travels (method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import DataNeeds, Manifest


@dataclass
class PFedMMAOptions:
    # Sources: sajjad-ucsb/pFedMMA, configs/trainers/pFedMMA/vit_b16.yaml (TRAINER.MMADAPTER),
    # scripts/DomainNet.sh and pfedmma_cifar.sh (LR), Dassl's OPTIM defaults (momentum, weight decay).
    n_layers: int = 8             # adapted residual blocks per tower, the last ones: ADAPTER_START 5 .. ADAPTER_END 12 of 12
    dim: int = 32                 # ADAPTER_DIM: the down-projection's width, and the shared projection's
    scale: float = 0.001          # ADAPTER_SCALE: the adapter's output is added times this
    lr: float = 0.001             # the scripts' LR (SGD, constant: single_step with GAMMA=1)
    momentum: float = 0.9         # Dassl's OPTIM.MOMENTUM
    weight_decay: float = 5e-4    # Dassl's OPTIM.WEIGHT_DECAY
    text: str = "a photo of a"    # TEXT_CTX_INIT: the fixed words before each class name
    all_clients_first_round: bool = True   # round 0 trains every client, as federated_main.py does

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise PFedMoAPError(msg)
        need(self.n_layers >= 1, f"pfedmma.n_layers = {self.n_layers}: expected >= 1")
        need(self.dim >= 1, f"pfedmma.dim = {self.dim}: expected >= 1")
        need(self.scale > 0, f"pfedmma.scale = {self.scale}: expected > 0")
        need(self.lr > 0, f"pfedmma.lr = {self.lr}: expected > 0")
        need(0 <= self.momentum < 1, f"pfedmma.momentum = {self.momentum}: expected 0 <= momentum < 1")
        need(self.weight_decay >= 0, f"pfedmma.weight_decay = {self.weight_decay}: expected >= 0")
        need(bool(self.text.strip()), f"pfedmma.text = {self.text!r}: expected words (e.g. 'a photo of a')")


register(Manifest("pfedmma", "pfedmoap.algorithms.pfedmma.method:PFedMMA", label="pFedMMA", order=105,
                  section="pfedmma", options=PFedMMAOptions, data=DataNeeds(images=True),
                  summary="multi-modal adapters in both towers; only their shared projection is FedAvg'd"))
