"""Distillation from the last exit into the earlier ones (IMTA's one-for-all distillation, Li et al. 2019)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_losses"]


def soft_losses(logits: list[Tensor], temperature: float = 3.0) -> list[Tensor]:
    """What every exit before the last learns from the last exit's softened predictions.

    For exit k: ``T^2 * KL(softmax(z_K / T) || softmax(z_k / T))``. The teacher z_K is detached, so
    the last exit learns from the labels only; T^2 keeps the gradients on the scale of a
    cross-entropy's whatever T is.

    Args:
        logits: one [B, classes] tensor per exit, the last one the teacher.
        temperature: T > 0.
    Returns:
        one scalar per exit but the last (len(logits) - 1 of them).
    """
    teacher = F.log_softmax(logits[-1].detach().float() / temperature, dim=1)
    return [
        F.kl_div(F.log_softmax(z.float() / temperature, dim=1), teacher, reduction="batchmean", log_target=True)
        * temperature**2
        for z in logits[:-1]
    ]
