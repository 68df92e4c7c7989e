"""Contrastive losses whose distributed gradients equal single-process large-batch gradients.

LOSSES registers each loss that a config can name (`loss.name`) by its options model, which
lives beside the loss in its module. A new loss is one module (the loss and its options) and
one entry here."""

from distributed_cl.losses.clip import ClipLoss, ClipOptions
from distributed_cl.losses.core import LossStats, Memory
from distributed_cl.losses.infonce import InfoNCELoss, InfoNCEOptions
from distributed_cl.losses.labels import pair_labels
from distributed_cl.losses.ntxent import NTXentLoss, NTXentOptions
from distributed_cl.losses.options import LossOptions
from distributed_cl.losses.pairs import ContrastiveLoss, ContrastiveOptions
from distributed_cl.losses.siglip import SigLipLoss, SigLipOptions
from distributed_cl.losses.supcon import SupConLoss, SupConOptions

LOSSES: dict[str, type[LossOptions]] = {
    options.model_fields["name"].default: options
    for options in (NTXentOptions, InfoNCEOptions, ClipOptions, SigLipOptions, SupConOptions, ContrastiveOptions)
}

__all__ = ["LOSSES", "ClipLoss", "ContrastiveLoss", "InfoNCELoss", "LossOptions", "LossStats", "Memory", "NTXentLoss",
           "SigLipLoss", "SupConLoss", "pair_labels"]
