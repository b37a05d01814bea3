"""FedTPG (Qiu et al., ICLR 2024): one prompt-generator network shared by every client (FedAvg of
its parameters); it turns the class names' text embeddings into the context vectors (method.py).
Its options are the [fedtpg] section; the defaults are the authors' published scripts
(boschresearch/FedTPG)."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import MAX_ROUNDS
from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest

AGGREGATIONS = ("samples", "uniform")


@dataclass
class FedTPGOptions:
    # The generator's local SGD (federated/utils.py build_optimizer: torch SGD), values of
    # config/defaults.py (OPTIM.LR, OPTIM.MOMENTUM, OPTIM.WEIGHT_DECAY), as the published run's log
    # prints them (output/cross_cls/fedtpg/20_8/43/log.txt). The learning rate follows a cosine over
    # the rounds (OPTIM.LR_SCHEDULER = "cosine", CosineAnnealingLR(T_max = OPTIM.MAX_EPOCH = the
    # rounds), stepped once per round in federated/client.py Client.train), constant within a round.
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 1e-5
    # federated/client.py Client.train: one pass over the client's loader per round; 0 = train.local_epochs
    local_epochs: int = 1
    # Launch_FL.py --batch_size 200 (config/utils.py -> DATALOADER.TRAIN.BATCH_SIZE); 0 = train.batch_size
    batch_size: int = 200
    # model/prompt_net.py PromptTranslator: cross_heads = self_heads = 4, FeedForward mult = 4;
    # Launch_FL.py --model_depth 0 (MODEL.DEPTH: self-attention blocks after the cross-attention)
    heads: int = 4
    depth: int = 0
    ff_mult: int = 4
    # FedAvg weights: "samples" (the participants' training-set sizes, as every FedAvg here; equal
    # under DP) or "uniform" (federated/server.py Server.train: the plain mean of the participants)
    aggregation: str = "samples"

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise PFedMoAPError(msg)
        need(self.lr > 0, f"fedtpg.lr = {self.lr}: expected > 0")
        need(0 <= self.momentum < 1, f"fedtpg.momentum = {self.momentum}: expected 0 <= momentum < 1")
        need(self.weight_decay >= 0, f"fedtpg.weight_decay = {self.weight_decay}: expected >= 0")
        need(0 <= self.local_epochs <= MAX_ROUNDS,
             f"fedtpg.local_epochs = {self.local_epochs}: expected 0 to {MAX_ROUNDS} (0 = train.local_epochs)")
        need(0 <= self.batch_size <= 10 ** 7,
             f"fedtpg.batch_size = {self.batch_size}: expected 0 to 10000000 (0 = train.batch_size)")
        need(1 <= self.heads <= 1024, f"fedtpg.heads = {self.heads}: expected 1 to 1024")
        need(0 <= self.depth <= 64, f"fedtpg.depth = {self.depth}: expected 0 to 64")
        need(1 <= self.ff_mult <= 64, f"fedtpg.ff_mult = {self.ff_mult}: expected 1 to 64")
        need(self.aggregation in AGGREGATIONS,
             f"fedtpg.aggregation = {self.aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")


register(Manifest("fedtpg", "pfedmoap.algorithms.fedtpg.method:FedTPG", label="FedTPG", order=85, quickstart=True,
                  section="fedtpg", options=FedTPGOptions,
                  summary="a prompt-generator network shared by all clients (FedAvg), generating the context "
                          "from the class names' text embeddings"))
