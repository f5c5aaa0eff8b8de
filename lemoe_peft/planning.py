"""Clustering-based order planning: related edits share an expert, unrelated edits do not fight over one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 50) -> torch.Tensor:
    """Spherical k-means (cosine) with k-means++ seeding; deterministic for a given ``seed``. Returns labels (n,).

    Each seeding step and each iteration costs O(n k d), so planning 10,000 edits into 1,000 batches takes seconds.
    """
    points = F.normalize(points.double(), dim=-1)
    n = points.shape[0]
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    centres = [int(torch.randint(n, (1,), generator=generator))]
    distance = (1 - points @ points[centres[0]]).clamp_min(0)  # to the nearest centre so far
    for _ in range(1, k):
        distance[centres[-1]] = 0
        if distance.sum() <= 0:
            chosen = set(centres)
            centres.append(next(i for i in range(n) if i not in chosen))
        else:
            centres.append(int(torch.multinomial(distance, 1, generator=generator)))
        distance = torch.minimum(distance, (1 - points @ points[centres[-1]]).clamp_min(0))
    centroids = points[centres].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new_labels = (points @ centroids.T).argmax(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        filled = torch.bincount(labels, minlength=k) > 0
        centroids[filled] = F.normalize(sums[filled], dim=-1)
    return labels


def plan_batches(embeddings: torch.Tensor, batch_size: int, seed: int) -> list[list[int]]:
    """Order edits by cluster and cut the order into batches of ``batch_size``.

    Edits are clustered into ``ceil(n / batch_size)`` clusters by their embeddings; clusters are laid out largest
    first (ties: the cluster whose first edit came first), each keeping the arrival order of its edits, so a batch
    holds edits of one cluster wherever cluster sizes allow.
    """
    n = embeddings.shape[0]
    if n <= batch_size or batch_size == 1:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    labels = kmeans(embeddings, math.ceil(n / batch_size), seed).tolist()
    clusters: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        clusters.setdefault(label, []).append(index)
    ordered = sorted(clusters.values(), key=lambda members: (-len(members), members[0]))
    sequence = [index for members in ordered for index in members]
    return [sequence[i : i + batch_size] for i in range(0, n, batch_size)]
