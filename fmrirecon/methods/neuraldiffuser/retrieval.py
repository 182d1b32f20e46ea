"""Retrieval with the guidance features, per-layer decisions merged by voting (NeuralDiffuser §5.3).

For each CLIP layer ``l`` the brain side is the projector output of ``f_g^l`` and the image side the
ground-truth layer features ``g^l`` (both flattened, cosine similarity). Each layer picks its top-1 candidate;
the candidate with the most votes wins, ties broken by the summed similarity over layers. Accuracy follows
MindEye's protocol: random pools of ``pool_size`` test items (300; chance ``1/pool_size``), every item a query
once per pool draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cosine_similarities(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``(N, D), (M, D) -> (N, M)`` cosine similarity."""
    q = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    c = np.asarray(candidates, dtype=np.float64).reshape(len(candidates), -1)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return q @ c.T


def vote_top1(similarities: np.ndarray) -> np.ndarray:
    """Merge per-layer top-1 decisions by voting.

    Args:
        similarities: ``(L, N, M)`` per-layer query × candidate similarities.

    Returns:
        ``(N,)`` index of the chosen candidate per query (most votes; ties → highest summed similarity).
    """
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.ndim != 3:
        raise ValueError(f"similarities must be (layers, queries, candidates), got shape {sims.shape}")
    n_layers, n, m = sims.shape
    votes = np.zeros((n, m))
    picks = sims.argmax(axis=2)  # (L, N)
    for layer in range(n_layers):
        votes[np.arange(n), picks[layer]] += 1
    # Ties between equally voted candidates go to the larger summed similarity (a fraction < 1 vote).
    total = sims.sum(axis=0)
    span = total.max(axis=1, keepdims=True) - total.min(axis=1, keepdims=True) + 1e-12
    score = votes + 0.5 * (total - total.min(axis=1, keepdims=True)) / span
    return score.argmax(axis=1)


def voting_retrieval(
    brain_layers: Sequence[np.ndarray],
    image_layers: Sequence[np.ndarray],
    pool_size: int = 300,
    n_draws: int = 30,
    seed: int = 0,
    per_item: dict | None = None,
) -> dict[str, float]:
    """Top-1 image and brain retrieval with per-layer voting.

    Args:
        brain_layers: per layer ``(N, D_l)`` brain embeddings (row ``i`` = test item ``i``).
        image_layers: per layer ``(N, D_l)`` image embeddings of the same items.
        pool_size: candidates per query (300, or ``N`` when smaller).
        n_draws: random pool draws averaged.
        per_item: if given, receives ``"retrieval_image"`` and ``"retrieval_brain"``: ``(N,)`` each item's
            top-1 hit rate as a query over the draws that placed it in a pool (NaN if none did), for paired
            comparisons of two decoders on the same items.

    Returns:
        ``{"retrieval_image": acc, "retrieval_brain": acc, "pool_size": p, "chance": 1/p}``.
    """
    if len(brain_layers) != len(image_layers) or not brain_layers:
        raise ValueError(
            f"need the same non-zero number of layers, got {len(brain_layers)} and {len(image_layers)}"
        )
    n = len(brain_layers[0])
    for b, im in zip(brain_layers, image_layers):
        if len(b) != n or len(im) != n:
            raise ValueError(f"every layer must have {n} rows on both sides, got {len(b)} and {len(im)}")
    pool = min(pool_size, n)
    sims = np.stack([cosine_similarities(b, im) for b, im in zip(brain_layers, image_layers)])  # (L, N, N)
    rng = np.random.default_rng(seed)
    # per item: top-1 hits as a query, and how many pools it was queried in
    hits, queried = {"image": np.zeros(n), "brain": np.zeros(n)}, np.zeros(n)
    for _ in range(n_draws if pool < n else 1):
        order = rng.permutation(n)
        for start in range(0, n - pool + 1, pool):
            idx = order[start : start + pool]
            block = sims[:, idx][:, :, idx]  # (L, pool, pool): brain queries × image candidates
            target = np.arange(pool)
            hits["image"][idx] += vote_top1(block) == target
            hits["brain"][idx] += vote_top1(block.transpose(0, 2, 1)) == target
            queried[idx] += 1
    if per_item is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            per_item.update({f"retrieval_{kind}": hits[kind] / queried for kind in hits})
    return {
        "retrieval_image": float(hits["image"].sum() / queried.sum()),
        "retrieval_brain": float(hits["brain"].sum() / queried.sum()),
        "pool_size": pool,
        "chance": 1.0 / pool,
    }
