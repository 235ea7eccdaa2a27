"""AdaLoRA's rank budget (Zhang et al., 2023, section 3.3): during training, score every
singular triplet ``(P_i, Λ_i, Q_i)`` by its smoothed sensitivity ``|p · ∇p|`` times its
uncertainty, and zero the ``Λ`` entries of the least important ones down to a budget that
falls from ``init_r`` to ``target_r`` per target on PEFT's cubic schedule.

The schedule is training-loop state, so it lives outside the delta, in a
:class:`RankAllocator` from :func:`adalora_allocator`; the tensors keep their ``init_r``
shape (a pruned triplet is a zero in ``Λ``), so files and merges need nothing else.
"""

from __future__ import annotations

import torch

from ..errors import DeltaStateError, UnsupportedOperationError
from .adalora import AdaLoRA


def adalora_allocator(delta) -> RankAllocator:
    """The rank allocator (and orthogonality regulariser) of ``delta``'s AdaLoRA part.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> delta = dh.attach(model, dh.AdaLoRA(targets=["0"], init_r=2, target_r=1, total_step=10))
        >>> float(dh.adalora_allocator(delta).orthogonality_loss()) > 0
        True
    """
    found = [i for i, spec in enumerate(delta.specs) if isinstance(spec, AdaLoRA)]
    if len(found) != 1:
        raise UnsupportedOperationError(
            f"delta {delta.name!r} has {len(found)} AdaLoRA specs; the rank allocator needs "
            "exactly one (PEFT likewise trains one AdaLoRA adapter at a time)"
        )
    return RankAllocator(delta, found[0])


class RankAllocator:
    """PEFT's AdaLoRA budget schedule and importance-based masking, on a delta's tensors.

    Call :meth:`update_and_allocate` once per training step after the optimizer step and
    before ``zero_grad`` (the gradients score the triplets), and add
    :meth:`orthogonality_loss` to the loss. ``rank_pattern`` holds the last mask per target
    (``{path: [kept, ...]}``), as PEFT's ``config.rank_pattern``.
    """

    def __init__(self, delta, spec_index: int) -> None:
        self.delta = delta
        self.spec: AdaLoRA = delta.specs[spec_index]
        self.spec_index = spec_index
        self.paths = [p.path for p in delta.parts if p.spec_index == spec_index]
        self.init_budget = self.spec.init_r * len(self.paths)
        self.target_budget = self.spec.target_r * len(self.paths)
        self.rank_pattern: dict[str, list[bool]] = {}
        self.reset_importance()

    def reset_importance(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{path: {"lora_A": ..., "lora_B": ..., "lora_E": ...}}``, looked up now."""
        if not self.delta.attached:
            raise DeltaStateError("the delta of this allocator is detached")
        found = {}
        for part in self.delta.parts:
            if part.spec_index == self.spec_index:
                found[part.path] = {k.rsplit(".", 1)[1]: t for k, t in part.tensors.items()}
        return found

    def budget(self, step: int) -> tuple[int, bool]:
        """``(budget, mask now)`` at ``step``: PEFT's cubic schedule."""
        spec = self.spec
        if step <= spec.tinit:
            return self.init_budget, False
        if step > spec.total_step - spec.tfinal:
            return self.target_budget, True
        left = 1 - (step - spec.tinit) / (spec.total_step - spec.tfinal - spec.tinit)
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % spec.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """Smoothed sensitivity ``|p · ∇p|`` and its uncertainty, per entry."""
        beta1, beta2 = self.spec.beta1, self.spec.beta2
        for path, tensors in self._tensors().items():
            for name, p in tensors.items():
                key = f"{path}.{name}"
                if p.grad is None:
                    raise DeltaStateError(
                        f"{key} has no gradient: call update_and_allocate after backward and "
                        "before zero_grad"
                    )
                ipt = (p * p.grad).abs()
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                avg = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = (
                    beta2 * self.exp_avg_unc[key] + (1 - beta2) * (ipt - avg).abs()
                )

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per target, one score per singular triplet: ``s(Λ_i) + mean s(Q_i) + mean s(P_i)``."""
        scores = {}
        for path in self._tensors():
            score = {
                n: self.exp_avg_ipt[f"{path}.{n}"] * self.exp_avg_unc[f"{path}.{n}"]
                for n in ("lora_A", "lora_B", "lora_E")
            }
            vectors = torch.cat(
                [
                    score["lora_A"].mean(dim=1, keepdim=True),
                    score["lora_B"].mean(dim=0).view(-1, 1),
                ],
                dim=1,
            )
            scores[path] = score["lora_E"].view(-1) + vectors.sum(dim=1)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the ``Λ`` entries of all but the ``budget`` most important triplets."""
        scores = self.triplet_scores()
        pruned = self.init_budget - budget
        if pruned <= 0:
            threshold = float("-inf")
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=pruned)[0].item()
        pattern = {}
        for path, tensors in self._tensors().items():
            drop = (scores[path] <= threshold).view(-1, 1)
            tensors["lora_E"].masked_fill_(drop, 0.0)
            pattern[path] = (~drop).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        for path, tensors in self._tensors().items():
            keep = torch.tensor(self.rank_pattern[path], device=tensors["lora_E"].device)
            tensors["lora_E"].masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> int:
        """One step of PEFT's ``update_and_allocate``; returns the budget at ``step``."""
        if self.delta.merged:
            raise DeltaStateError(
                "the AdaLoRA delta is merged: its rank cannot change; call delta.unmerge() first"
            )
        final = self.spec.total_step - self.spec.tfinal
        budget, mask_now = self.budget(step)
        if step < final:
            self.update_importance()
            if mask_now:
                self.rank_pattern = self.mask_to_budget(budget)
        elif step == final:
            self.rank_pattern = self.mask_to_budget(budget)
            self.reset_importance()
        elif self.rank_pattern:
            self.mask_using_rank_pattern()
        return budget

    def orthogonality_loss(self) -> torch.Tensor:
        """``orth_reg_weight`` × the mean over ``P`` and ``Q`` of ``‖QQᵀ − I‖_F`` /
        ``‖PᵀP − I‖_F``: add it to the training loss (PEFT adds it in its forward)."""
        terms = []
        for tensors in self._tensors().values():
            for name in ("lora_A", "lora_B"):
                p = tensors[name]
                cov = p @ p.T if name == "lora_A" else p.T @ p
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.spec.orth_reg_weight * torch.stack(terms).mean()
