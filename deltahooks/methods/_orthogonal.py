"""Block-orthogonal transforms shared by OFT and BOFT: the Cayley map and block rotations.

A transform ``M`` of width ``n`` is a chain of block-diagonal rotations, each read
through a butterfly reordering of the ``n`` coordinates (one level: plain OFT). Everything
acts on the last dimension of a tensor in PEFT's row convention, ``x ↦ x @ M``; a weight
``W`` (``out × in``) that should compute ``W (Mᵀ x)`` becomes ``W Mᵀ``:
``rotate(W, blocks, transpose=True)``.
"""

from __future__ import annotations

import torch

PEFT_OFT_BLOCK_SIZE = 32  # PEFT OFTConfig.oft_block_size default
PEFT_BOFT_BLOCK_SIZE = 4  # PEFT BOFTConfig.boft_block_size default


def nearest_divisor(width: int, preferred: int, *, allowed=lambda size: True) -> int | None:
    """The divisor of ``width`` closest to ``preferred`` among those ``allowed``; ties go to
    the smaller one (PEFT's ``adjust_oft_parameters`` rule). None when none is allowed.

    Example:
        >>> nearest_divisor(48, 32), nearest_divisor(97, 32), nearest_divisor(20, 32)
        (24, 1, 20)
    """
    sizes = [d for d in range(1, width + 1) if width % d == 0 and allowed(d)]
    if not sizes:
        return None
    return min(sizes, key=lambda d: (abs(d - preferred), d))


def skew_from_upper(vector: torch.Tensor, size: int) -> torch.Tensor:
    """``(blocks, size·(size-1)/2)`` strict upper triangles (row-major, PEFT's OFT layout)
    → ``(blocks, size, size)`` skew-symmetric matrices ``U - Uᵀ``."""
    rows, cols = torch.triu_indices(size, size, 1, device=vector.device)
    matrix = vector.new_zeros(vector.shape[0], size, size)
    matrix[:, rows, cols] = vector
    return matrix - matrix.transpose(-2, -1)


def cayley(skew: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """Orthogonal ``R = (I - Q)(I + Q)⁻¹`` of skew-symmetric ``Q`` (batched), or its
    Neumann-series approximation with ``neumann_terms`` terms as PEFT 0.21 computes it:
    ``I + 2Q + 2Q² + … + 2Qⁿ⁻² + Qⁿ⁻¹`` (for 3 terms PEFT's loop gives ``I + 2Q + 2Q² + Q³``,
    the same as for 4; kept so that adapters load exactly).
    """
    size = skew.shape[-1]
    eye = torch.eye(size, device=skew.device, dtype=skew.dtype)
    if neumann_terms is None:
        return torch.linalg.solve(eye + skew, eye - skew, left=False)
    result = eye.expand_as(skew)
    if neumann_terms <= 1:
        return result.clone()
    result = result + 2.0 * skew
    if neumann_terms == 2:
        return result
    power = skew @ skew
    result = result + 2.0 * power
    for _ in range(3, neumann_terms - 1):
        power = power @ skew
        result = result + 2.0 * power
    return result + power @ skew


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` on the last dimension (``blocks``: ``(r, b, b)``), or with
    every block transposed."""
    r, b, _ = blocks.shape
    pieces = x.unflatten(-1, (r, b))
    equation = "...rk,rck->...rc" if transpose else "...rk,rkc->...rc"
    return torch.einsum(equation, pieces, blocks).flatten(-2)


def butterfly(x: torch.Tensor, level: int, half: int, inverse: bool) -> torch.Tensor:
    """The butterfly reordering of BOFT level ``level`` on the last dimension (``x @ Pₗ``,
    or ``x @ Pₗᵀ`` with ``inverse``).

    Level ``l`` cuts the width into chunks of ``2ˡ⁺¹`` groups of ``half`` (half a block)
    coordinates and, in each chunk, puts the even-numbered groups before the odd ones
    (BOFT paper, Sec. 4; PEFT ``block_butterfly_perm``). Level 0 is the identity.
    """
    if level == 0:
        return x
    groups = 2**level
    shape = (-1, groups, 2, half) if inverse else (-1, 2, groups, half)
    return x.unflatten(-1, shape).transpose(-3, -2).flatten(-4)


def rotate(x: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ M`` (or ``x @ Mᵀ``) for ``M = B'ₙ₋₁ ⋯ B'₀``, ``B'ₗ = Pₗ Bₗ Pₗᵀ`` and
    ``rotations[l]`` the blocks of ``Bₗ`` (``(levels, r, b, b)``; OFT: one level)."""
    levels, _, size, _ = rotations.shape
    order = range(levels) if transpose else range(levels - 1, -1, -1)
    for level in order:
        x = butterfly(x, level, size // 2, inverse=False)
        x = rotate_blocks(x, rotations[level], transpose)
        x = butterfly(x, level, size // 2, inverse=True)
    return x
