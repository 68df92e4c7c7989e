"""Contrastive losses whose distributed gradients equal single-process large-batch gradients."""

from distributed_cl.losses.clip import ClipLoss
from distributed_cl.losses.core import LossStats, Memory
from distributed_cl.losses.infonce import InfoNCELoss
from distributed_cl.losses.ntxent import NTXentLoss
from distributed_cl.losses.pairs import ContrastiveLoss, pair_labels
from distributed_cl.losses.siglip import SigLipLoss
from distributed_cl.losses.supcon import SupConLoss

__all__ = ["ClipLoss", "ContrastiveLoss", "InfoNCELoss", "LossStats", "Memory", "NTXentLoss", "SigLipLoss", "SupConLoss", "pair_labels"]
