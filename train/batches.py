"""The batch plan every trainer shares: which examples form each micro batch of an epoch, and on which rank.

A pure function of the examples' lengths, the seed and the epoch, so every rank computes the same plan without
talking, a resumed run skips exactly the batches it did, and Ray Data ingest (`train.ingest`) can deal each rank
only the rows of its own batches.
"""
from __future__ import annotations

import random


def epoch_batches(lengths: list[int], micro: int, world: int, accum: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro batches of example indices for one epoch, the same on every rank; rank r takes batches r, r+world, ...

    Examples are shuffled, then sorted by length inside windows of 64 micro batches (less padding), and the
    micro batches shuffled again. The count is cut to a multiple of world * accum so all ranks step together.
    """
    rng = random.Random(f"{seed}:{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = micro * 64
    batches = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + micro] for i in range(0, len(chunk), micro) if len(chunk[i:i + micro]) == micro]
    rng.shuffle(batches)
    keep = len(batches) // (world * accum) * (world * accum)
    return batches[:keep]
