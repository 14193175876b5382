"""Seeded Rademacher (Johnson-Lindenstrauss) projection of flattened gradients, block by block.

The projection of a gradient ``g`` (flattened over its parameters ``p = 0..P-1``) to ``dim`` is ``g
· R / sqrt(dim)`` with ``R`` a ±1 matrix. ``R`` is never built whole: the rows of parameter ``p``
are drawn in chunks of ``SEED_ROWS``, chunk ``c`` from its own generator seeded by ``(seed, p, c)``
(numpy PCG64, the same bits on every platform), and products run on blocks of a few chunks
(``block_mb``), so the block size changes memory and speed but not ``R``. A sample's feature
therefore depends only on its own gradient, the seed and the parameter layout, never on the batch,
shard, actor or device that computed it.

The first blocks are kept in memory up to ``cache_mb`` in total (a block costs ``4 · block_rows ·
dim`` bytes); the others are regenerated on every call, so memory stays at the cache plus one block
whatever the adapter size. :attr:`RademacherProjector.peak_bytes` reports the most block memory
held at once.

Products run on groups of exactly ``ROWS`` samples (the last group padded with zero rows). A BLAS
kernel's rounding depends on the matrix shapes, so with a varying number of rows a sample's feature
would change in the last bits with its batch size; with a fixed shape it is bit-identical whatever
batch it came in (docs/algorithms.md §2).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["ROWS", "RademacherProjector"]

ROWS = 32
SEED_ROWS = 4096
# _SIGNS[b] = the 8 entries (±1, most significant bit first) that random byte b stands for
_SIGNS = torch.from_numpy(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
                          .astype(np.float32) * 2 - 1)


class RademacherProjector:
    """Project per-sample gradients given parameter by parameter.

    Args:
        sizes: number of entries of each parameter, in the flattening order.
        dim: output dimension.
        seed: seed of ``R``.
        block_mb: size of one block of ``R`` held for a product (rounded to whole ``SEED_ROWS``
            chunks, at least one).
        cache_mb: keep blocks in memory up to this total; 0 disables the cache.
        device: where blocks live and the products run.
    """

    def __init__(self, sizes: list[int], dim: int, seed: int = 0, *, block_mb: float = 64,
                 cache_mb: float = 2048, device: str | torch.device = "cpu"):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.sizes, self.dim, self.seed = list(sizes), dim, seed
        self.block_rows = SEED_ROWS * max(1, int(block_mb * 2**20) // (4 * dim * SEED_ROWS))
        self.device = torch.device(device)
        self.cache_bytes = int(cache_mb * 2**20)
        self.cached_bytes = 0
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self.peak_bytes = 0
        self.scale = 1.0 / math.sqrt(dim)
        self._scratch: torch.Tensor | None = None  # memory of uncached blocks, reused
        self._signs = _SIGNS.to(self.device)

    def _block(self, p: int, c: int, rows: int) -> torch.Tensor:
        """The ±1 block ``c`` of parameter ``p`` (``rows × dim`` float32).

        Each random byte becomes its 8 signs through a 256-row table (:data:`_SIGNS`, most
        significant bit first, as ``np.unpackbits``), in one pass: 1.6 ms a 16 MiB chunk against
        4.7 ms for unpacking the bits and converting them in three passes (2 cores). With a
        trained adapter on every projection the matrix is far larger than the cache (SmolLM2:
        4.9M gradient entries, 20 GB at dim 1024), so this runs for most blocks of every pass."""
        block = self._cache.get((p, c))
        if block is None:
            cache = self.cached_bytes + 4 * rows * self.dim <= self.cache_bytes
            if not cache and self._scratch is None:
                self._scratch = torch.empty(self.block_rows, self.dim, device=self.device)
            block = (torch.empty(rows, self.dim, device=self.device) if cache
                     else self._scratch[:rows])
            flat = block.view(-1)
            first = c * self.block_rows // SEED_ROWS
            for s in range(first, first + -(-rows // SEED_ROWS)):
                rng = np.random.Generator(np.random.PCG64([self.seed, p, s]))
                n = min(SEED_ROWS, c * self.block_rows + rows - s * SEED_ROWS) * self.dim
                codes = np.frombuffer(rng.bytes(SEED_ROWS * self.dim // 8), np.uint8)
                codes = torch.from_numpy(codes[:-(-n // 8)].astype(np.int32)).to(self.device)
                at = (s - first) * SEED_ROWS * self.dim
                if n % 8:
                    flat[at:at + n] = self._signs[codes].view(-1)[:n]
                else:
                    torch.index_select(self._signs, 0, codes, out=flat[at:at + n].view(-1, 8))
            if cache:
                self._cache[(p, c)] = block
                self.cached_bytes += 4 * block.numel()
            else:
                self.peak_bytes = max(self.peak_bytes, self.cached_bytes + 4 * block.numel())
        self.peak_bytes = max(self.peak_bytes, self.cached_bytes)
        return block

    def project(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """Project a batch: ``grads[p]`` is ``(B, sizes[p])`` (any shape ``(B, ...)``), or ``None``
        for a parameter whose gradient is known to be zero (it is skipped). Returns ``(B, dim)``
        float32 on ``device``."""
        present = [(p, g.reshape(g.shape[0], -1)) for p, g in enumerate(grads) if g is not None]
        if not present:
            raise ValueError("no gradient to project")
        for p, g in present:
            if g.shape[1] != self.sizes[p]:
                raise ValueError(f"parameter {p} has {g.shape[1]} entries, expected "
                                 f"{self.sizes[p]}")
        n = present[0][1].shape[0]
        groups = -(-n // ROWS)
        out = torch.zeros(groups, ROWS, self.dim, device=self.device)
        for p, g in present:
            padded = torch.zeros(groups * ROWS, g.shape[1], device=self.device)
            padded[:n] = g
            padded = padded.view(groups, ROWS, -1)
            for c, start in enumerate(range(0, self.sizes[p], self.block_rows)):
                block = self._block(p, c, min(self.block_rows, self.sizes[p] - start))
                for k in range(groups):
                    out[k].addmm_(padded[k, :, start:start + self.block_rows], block)
        return out.view(-1, self.dim)[:n].mul_(self.scale)
