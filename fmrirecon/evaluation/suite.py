"""Run a preset over reconstruction folders: batch the images, run each network once per image, score.

``evaluate_reconstructions`` is the Python entry point (the demo and ``fmrirecon evaluate`` call it).
Flow per reconstruction folder and sample k: load a batch of reconstructions and their ground truths ->
common resize -> pixel metrics -> one forward pass per network (all nodes) -> per-image scores;
ground-truth features are computed once per network for the union of ids of all folders. Several samples
per image are scored as the mean over samples (the ``metrics`` dict); the per-image best over samples,
averaged over images, goes to ``best_of_k``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fmrirecon.errors import EvaluationInputError, FmriReconError, WeightsUnavailableError
from fmrirecon.evaluation import device_metrics as DM
from fmrirecon.evaluation import metrics as M
from fmrirecon.evaluation.features import FeatureExtractor, load_extractor, resize_tensor, to_float_tensor
from fmrirecon.evaluation.io import ReconSet, Truth, read_recon_dir
from fmrirecon.evaluation.metric_info import chance_level, higher_is_better
from fmrirecon.evaluation.presets import Preset, get_preset
from fmrirecon.io import library_versions

logger = logging.getLogger(__name__)

# prf-visualrois labels (NSD): 1,2 = V1v/V1d, 3,4 = V2, 5,6 = V3, 7 = hV4
VISUAL_ROI_LABELS = {"V1": (1, 2), "V2": (3, 4), "V3": (5, 6), "V4": (7,)}
# streams labels 5..7 = ventral, lateral, parietal: the higher-level visual streams
HIGHER_STREAM_LABELS = (5, 6, 7)


class _Prepared:
    """One batch made ready for the pixel metrics and for every network of the preset."""

    def __init__(self, images: np.ndarray, preset: Preset, target_hw: tuple[int, int]):
        self.uint8 = images
        if preset.backend == "tensor":
            x = to_float_tensor(images)
            size = preset.common_size or target_hw
            self.common = _resize_hw(x, size, preset.common_antialias)
            self.pixel = preset.pixel.apply(self.common).clamp_(0.0, 1.0)
        else:
            self.common = None
            self.pixel = preset.pixel.apply(
                _resize_uint8_to(images, target_hw) if preset.pixel.size is None else images
            )

    def network_input(self, preset: Preset, network: str) -> torch.Tensor:
        pre = preset.networks[network]
        return pre.apply(self.uint8 if pre.backend == "pil" else self.common)


class _PreparedBatches(torch.utils.data.Dataset):
    """Batch ``b`` of reconstruction sample ``sample``: ``(start, uint8 recons, prepared recons, prepared
    truths)``, PNG decoding and resizing included, so that a DataLoader's workers do them while the
    networks run (issue 21)."""

    def __init__(self, recon: ReconSet, truth: Truth, preset: Preset, sample: int, batch_size: int, hw):
        self.recon, self.truth, self.preset, self.sample = recon, truth, preset, sample
        self.batch_size, self.hw = batch_size, hw

    def __len__(self) -> int:
        return -(-len(self.recon.ids) // self.batch_size)

    def __getitem__(self, b: int):
        index = slice(b * self.batch_size, (b + 1) * self.batch_size)
        recon_batch = self.recon.load_images(index, self.sample)
        truth_batch = self.truth.images(self.recon.ids[index])
        prepared = (_Prepared(x, self.preset, self.hw) for x in (recon_batch, truth_batch))
        return (index.start, recon_batch, *prepared)


def _as_is(item):
    return item


def _resize_hw(x: torch.Tensor, size, antialias: bool) -> torch.Tensor:
    if isinstance(size, int):
        return resize_tensor(x, size, "bilinear", antialias)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(
        x, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias
    )


def _resize_uint8_to(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == tuple(hw):
        return images
    x = _resize_hw(to_float_tensor(images), hw, True)
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------- brain
class _BrainTarget:
    """Measured responses, simulator voxel matching and ROI masks for brain correlation of one subject."""

    def __init__(self, truth: Truth, subject: int, ids: np.ndarray):
        store = truth.store
        self.simulator = store.world_subject(subject)
        if self.simulator is None:
            raise LookupError("the store has no ground-truth encoding model (not a synthetic-world store)")
        sub = store.subject(subject)
        # match store voxels to simulator voxels by their (i, j, k) grid position
        sim_index = {tuple(v): n for n, v in enumerate(np.asarray(self.simulator.voxel_ijk).tolist())}
        store_ijk = np.asarray(sub.voxel_ijk).tolist()
        unmatched = [v for v in store_ijk if tuple(v) not in sim_index]
        if unmatched:
            raise LookupError(f"{len(unmatched)} store voxels have no simulator voxel at the same ijk")
        self.voxels = np.array([sim_index[tuple(v)] for v in store_ijk])
        rows: dict[int, np.ndarray] = {}
        for split in ("test", "train"):
            split_ids, betas = sub.averaged(split)
            for n, image_id in enumerate(np.asarray(split_ids).tolist()):
                rows.setdefault(int(image_id), betas[n])
        missing = [int(i) for i in ids if int(i) not in rows]
        if missing:
            raise LookupError(f"no measured responses for {len(missing)} ids (e.g. {missing[:5]})")
        self.measured = {int(i): rows[int(i)] for i in ids}
        self.rois, self.roi_definitions = _brain_rois(sub.rois, sub.n_voxels)
        # The store's betas are z-scored per voxel (per session); the simulator speaks PSC with a voxel
        # baseline. Put predictions in the same units: z-score each voxel with the mean/SD of the simulator's
        # responses to the ground-truth images of the evaluated set.
        truth_images = truth.images(ids)
        self.image_hw = tuple(truth_images.shape[1:3])
        reference = self._predict_psc(truth_images)
        self.mean, self.sd = reference.mean(axis=0), reference.std(axis=0) + 1e-8

    def _predict_psc(self, images: np.ndarray) -> np.ndarray:
        images = _resize_uint8_to(images, self.image_hw)
        return np.asarray(self.simulator.response(images), dtype=np.float64)[:, self.voxels]  # (B, V_store)

    def correlate(self, recon_images: np.ndarray, ids: np.ndarray) -> tuple[dict, dict]:
        """-> ({roi: (B,) r}, {roi: (B,) bool undefined}) (``metrics.brain_correlation``)."""
        predicted = (self._predict_psc(recon_images) - self.mean) / self.sd
        measured = np.stack([self.measured[int(i)] for i in ids])
        return M.brain_correlation(predicted, measured, self.rois, return_undefined=True)


def _brain_rois(rois: Mapping[str, np.ndarray], n_voxels: int) -> tuple[dict, dict]:
    masks, definitions = {}, {}
    visual = rois.get("prf-visualrois")
    if visual is not None:
        visual = np.asarray(visual)
        for name, labels in VISUAL_ROI_LABELS.items():
            mask = np.isin(visual, labels)
            if mask.sum() >= 2:
                masks[name], definitions[name] = mask, f"prf-visualrois labels {list(labels)}"
    streams = rois.get("streams")
    if streams is not None and np.isin(np.asarray(streams), HIGHER_STREAM_LABELS).sum() >= 2:
        masks["higher"] = np.isin(np.asarray(streams), HIGHER_STREAM_LABELS)
        definitions["higher"] = f"streams labels {list(HIGHER_STREAM_LABELS)} (ventral, lateral, parietal)"
    elif visual is not None and (visual <= 0).sum() >= 2:
        masks["higher"] = visual <= 0
        definitions["higher"] = "nsdgeneral voxels outside prf-visualrois V1-hV4"
    masks["whole"] = np.ones(n_voxels, dtype=bool)
    definitions["whole"] = "all nsdgeneral voxels of the store"
    return masks, definitions


# ---------------------------------------------------------------------------------------------- extraction
class _FeatureBuffer:
    """``{network: {node: float32 (n, D)}}`` preallocated on the first batch and filled in place (no
    list-then-concatenate copy: AlexNet ``features.4`` of 1000 images is 0.74 GB)."""

    def __init__(self, n: int):
        self.n = n
        self.arrays: dict[str, dict[str, np.ndarray]] = {}

    def put(self, net: str, outputs: dict[str, torch.Tensor], start: int) -> None:
        for node, value in outputs.items():
            value = value.reshape(value.shape[0], -1).numpy()
            nodes = self.arrays.setdefault(net, {})
            if node not in nodes:
                nodes[node] = np.empty((self.n, value.shape[1]), dtype=np.float32)
            nodes[node][start : start + len(value)] = value


def _extract_truth(truth, ids, preset, extractors, batch_size, progress) -> dict[str, dict[str, np.ndarray]]:
    """Ground-truth features {network: {node: (n, D)}} for ``ids`` (one forward per image per network)."""
    feats = _FeatureBuffer(len(ids))
    target_hw = None
    for start in tqdm(range(0, len(ids), batch_size), desc="ground truth", disable=not progress, leave=False):
        batch = truth.images(ids[start : start + batch_size])
        target_hw = target_hw or batch.shape[1:3]
        prepared = _Prepared(batch, preset, target_hw)
        for net, extractor in extractors.items():
            feats.put(net, extractor(prepared.network_input(preset, net)), start)
    return feats.arrays


def _evaluate_recon(
    recon: ReconSet,
    truth: Truth,
    preset: Preset,
    extractors,
    truth_feats,
    truth_rows,
    batch_size,
    chunk_size,
    progress,
    unavailable,
    device="cpu",
    loader_workers: int = 0,
) -> dict:
    n, k_samples = len(recon.ids), recon.samples
    rows = np.array([truth_rows[int(i)] for i in recon.ids])
    if not np.array_equal(rows, np.arange(len(rows))) or any(
        len(a) != n for nodes in truth_feats.values() for a in nodes.values()
    ):
        truth_feats = {
            net: {node: a[rows] for node, a in nodes.items()} for net, nodes in truth_feats.items()
        }
    per_image: dict[str, np.ndarray] = {}
    per_sample: dict[str, list[float]] = {}
    details: dict[str, dict] = {}
    local_unavailable: dict[str, str] = {}
    # per metric that can be undefined (a correlation of a constant image or constant features): how many
    # reconstructions (image x sample) were; they keep their defined score (metrics.UNDEFINED_CORRELATION)
    undefined_counts: dict[str, int] = {}

    def image_scores(key, k, values, index=slice(None), undefined=None):
        per_image.setdefault(key, np.full((k_samples, n), np.nan))[k, index] = values
        if undefined is not None:
            undefined_counts[key] = undefined_counts.get(key, 0) + int(np.count_nonzero(undefined))

    brain = None
    if preset.brain_correlation:
        reason = None
        if truth.store is None:
            reason = "needs a prepared store as ground truth (got a PNG folder)"
        else:
            try:
                brain = _BrainTarget(truth, recon.subject, recon.ids)
            except (LookupError, FmriReconError) as err:
                reason = str(err)
        if reason:
            local_unavailable["brain_corr_*"] = reason
        else:
            details["brain_corr"] = {
                "rois": brain.roi_definitions,
                "encoding_model": "simulator noiseless response, z-scored per voxel with its responses to "
                "the evaluated ground-truth images; measured = repeat-averaged store betas",
            }

    truth_hw = truth.images(recon.ids[:1]).shape[1:3]
    for k in range(k_samples):
        recon_feats = _FeatureBuffer(n)
        batches = torch.utils.data.DataLoader(
            _PreparedBatches(recon, truth, preset, k, batch_size, truth_hw),
            batch_size=None,
            num_workers=loader_workers,
            collate_fn=_as_is,
        )
        for start, recon_batch, r_prep, t_prep in tqdm(
            batches, desc=f"{recon.label} sample {k}", disable=not progress, leave=False
        ):
            index = slice(start, start + batch_size)
            ids = recon.ids[index]
            # PixCorr and SSIM on the device, equal to metrics.pixcorr / metrics.ssim (device_metrics)
            r_pixel, t_pixel = r_prep.pixel.to(device), t_prep.pixel.to(device)
            r, undefined = DM.pixcorr(r_pixel, t_pixel, return_undefined=True)
            image_scores("pixcorr", k, r, index, undefined)
            gray_r, gray_t = DM.rgb_to_gray(r_pixel), DM.rgb_to_gray(t_pixel)
            image_scores("ssim", k, DM.ssim_where_fastest(gray_r, gray_t, preset.ssim_variant), index)
            for net, extractor in extractors.items():
                recon_feats.put(net, extractor(r_prep.network_input(preset, net)), start)
            if brain is not None:
                by_roi, undefined = brain.correlate(recon_batch, ids)
                for roi, r in by_roi.items():
                    image_scores(f"brain_corr_{roi}", k, r, index, undefined[roi])
        _score_features(
            preset,
            recon_feats.arrays,
            truth_feats,
            k,
            image_scores,
            per_sample,
            details,
            chunk_size,
            local_unavailable,
        )
        del recon_feats

    metrics, best, image_means = {}, {}, {}
    for key, values in per_image.items():
        # every image and sample counts, an undefined one with its defined score (never nanmean: dropping
        # a blank reconstruction from one method's mean would raise its score)
        metrics[key] = float(values.mean())
        # per image, the mean over its samples, for paired comparisons (JSON null only if not finite)
        image_means[key] = [float(v) if np.isfinite(v) else None for v in values.mean(0)]
        if k_samples > 1:
            best_per_image = values.max(0) if higher_is_better(key) else values.min(0)
            best[key] = float(best_per_image.mean())
    for key, values in per_sample.items():
        metrics[key] = float(np.mean(values))
        details.setdefault(key, {})["per_sample"] = values

    if preset.retrieval:
        reason = None
        if recon.retrieval_reason:
            reason = f"needs brain_embeddings.npy and image_embeddings.npy: {recon.retrieval_reason}"
        elif n < 2:
            reason = "needs at least 2 images"
        if reason:
            local_unavailable["retrieval_image"] = local_unavailable["retrieval_brain"] = reason
        else:
            # small sets (the world's test split) use every image as the pool; the pool size is recorded
            pool = min(preset.retrieval_pool_size, n)
            out = M.retrieval_top1(
                recon.brain_embeddings,
                recon.image_embeddings,
                pool_size=pool,
                n_draws=preset.retrieval_draws,
                seed=preset.retrieval_seed,
            )
            for direction in ("image", "brain"):
                metrics[f"retrieval_{direction}"] = out[direction]["mean"]
                details[f"retrieval_{direction}"] = {
                    "ci95": out[direction]["ci95"],
                    "pool_size": pool,
                    "n_draws": out["n_draws"],
                    "seed": out["seed"],
                }
    for key, reason in local_unavailable.items():
        unavailable.setdefault(key, {})[recon.label] = reason
    result = {
        "method": recon.method,
        "subject": recon.subject,
        "variant": recon.variant,
        "n_images": n,
        "samples": k_samples,
        "recon_dir": str(recon.path),
        "metrics": metrics,
        "details": details,
        "unavailable": local_unavailable,
        "undefined": undefined_counts,
        "ids": [int(i) for i in recon.ids],
        "per_image": image_means,
    }
    if best:
        result["best_of_k"] = best
    return result


def _score_features(
    preset, feats, truth_feats, k, image_scores, per_sample, details, chunk_size, local_unavailable
):
    """Score one sample's reconstruction features against the ground truth's (rows already paired)."""
    if not any(feats.values()):
        return  # no network available
    n = len(next(iter(next(iter(feats.values())).values())))
    for fm in preset.feature_metrics:
        if fm.network not in feats:
            continue
        truth, recon = truth_feats[fm.network][fm.node], feats[fm.network][fm.node]
        if fm.score == "two_way":
            if n < 2:
                local_unavailable[fm.key] = "two-way identification needs at least 2 images"
                continue
            image_scores(fm.key, k, M.two_way_identification(truth, recon, chunk_size=chunk_size))
        else:
            distance, undefined = M.correlation_distance(truth, recon, return_undefined=True)
            image_scores(fm.key, k, distance, undefined=undefined)
    if preset.nway_identification and preset.nway_identification[0] in feats:
        net, node = preset.nway_identification
        for n_way in preset.nway_ns:
            key = f"nway_{n_way}"
            if n_way > n:
                local_unavailable[key] = f"needs at least {n_way} images, got {n}"
                continue
            mean, sd = M.nway_identification(
                truth_feats[net][node],
                feats[net][node],
                n_way,
                repeats=preset.nway_repeats,
                seed=preset.seed + k,
            )
            per_sample.setdefault(key, []).append(mean)
            details.setdefault(key, {}).setdefault("sd_over_repeats", []).append(sd)
    if preset.nway_classification and preset.nway_classification[0] in feats:
        net, node = preset.nway_classification
        truth_labels = truth_feats[net][node].argmax(axis=1)
        scores = feats[net][node]
        for n_way in preset.nway_class_ns:
            key = f"nway_class_{n_way}"
            if n_way > scores.shape[1]:
                local_unavailable[key] = (
                    f"needs at least {n_way} classes, the classifier has {scores.shape[1]}"
                )
                continue
            success = M.nway_classification(
                scores, truth_labels, n_way, trials=preset.nway_class_trials, seed=preset.seed + k
            )
            image_scores(key, k, success)
    if preset.fid_is and preset.fid_is[0] in feats:
        net, feat_node, logit_node = preset.fid_is
        if n < 2:
            local_unavailable["fid"] = "FID needs at least 2 images"
        else:
            fid = M.frechet_distance(feats[net][feat_node], truth_feats[net][feat_node])
            per_sample.setdefault("fid", []).append(fid)
        probs = torch.softmax(torch.from_numpy(feats[net][logit_node]).double(), dim=1).numpy()
        per_sample.setdefault("is", []).append(M.inception_score(probs)[0])


# ---------------------------------------------------------------------------------------------- entry point
def _truth_digest(truth) -> dict[str, str]:
    """``{"store_digest": ...}`` when the ground truth is a prepared store (fmrirecon.data.integrity)."""
    from fmrirecon.data.integrity import store_digest

    is_store = truth.kind == "store" and os.path.isfile(os.path.join(truth.path, "manifest.json"))
    return {"store_digest": store_digest(truth.path)} if is_store else {}


def evaluate_reconstructions(
    recon_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    truth: str | os.PathLike | Truth,
    preset: str | Preset = "world",
    *,
    weights_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    two_way_chunk_size: int = 64,
    extractors: Mapping[str, FeatureExtractor] | None = None,
    random_weights_for_testing: bool = False,
    progress: bool = True,
    loader_workers: int = 0,
) -> dict:
    """Score reconstruction folders against ground truth with a preset; returns the ``metrics.json`` dict.

    Args:
        recon_dirs: one or more reconstruction folders (layout in ``fmrirecon.evaluation.io``).
        truth: a prepared store folder, a folder of ``<id73k>.png``, or a :class:`Truth`.
        preset: ``"mindeye"``, ``"braindiffuser"``, ``"world"`` or a :class:`Preset`.
        weights_dir: local folder searched first for network weights (then the torch / HF caches).
        extractors: network -> ready extractor, bypassing weight loading (tests, benchmark).
        random_weights_for_testing: build networks with random weights (tests and benchmark only: the numbers
            mean nothing).
        loader_workers: DataLoader worker processes that decode and resize the next batches while the
            networks run (0: in this process, between batches).

    Returns:
        ``{"preset", "settings", "versions", "results": [{"method", "subject", "variant", "n_images",
        "metrics", "best_of_k"?, "details", "unavailable", ...}]}``. A metric that cannot be computed is
        absent from ``metrics``; its reason is in ``settings["unavailable"][key]``.
    """
    if isinstance(recon_dirs, (str, os.PathLike)):
        recon_dirs = [recon_dirs]
    if not recon_dirs:
        raise EvaluationInputError("no reconstruction folder given")
    preset = get_preset(preset) if isinstance(preset, str) else preset
    truth = truth if isinstance(truth, Truth) else Truth(truth)
    recons = [read_recon_dir(d) for d in recon_dirs]
    for recon in recons:
        truth.check_ids(recon.ids, f"reconstructions in {recon.path}")

    unavailable: dict[str, object] = {}
    ready: dict[str, FeatureExtractor] = {}
    for net in preset.networks:
        if extractors and net in extractors:
            ready[net] = extractors[net]
            continue
        try:
            ready[net] = load_extractor(
                net,
                preset.nodes(net),
                weights_dir=weights_dir,
                device=device,
                random_weights_for_testing=random_weights_for_testing,
            )
        except WeightsUnavailableError as err:
            logger.warning("%s unavailable: %s", net, err)
            for key in _keys_of_network(preset, net):
                unavailable[key] = f"{net}: {err}"

    all_ids = np.array(sorted({int(i) for r in recons for i in r.ids}), dtype=np.int64)
    truth_rows = {int(i): n for n, i in enumerate(all_ids)}
    truth_feats = _extract_truth(truth, all_ids, preset, ready, batch_size, progress) if ready else {}
    per_recon_unavailable: dict[str, dict[str, str]] = {}
    results = []
    for recon in recons:
        results.append(
            _evaluate_recon(
                recon,
                truth,
                preset,
                ready,
                truth_feats,
                truth_rows,
                batch_size,
                two_way_chunk_size,
                progress,
                per_recon_unavailable,
                device,
                loader_workers,
            )
        )
    for key, by_recon in per_recon_unavailable.items():
        unavailable.setdefault(key, "; ".join(f"{label}: {reason}" for label, reason in by_recon.items()))

    keys = sorted({key for r in results for key in r["metrics"]} | set(unavailable))
    pool_size = min(preset.retrieval_pool_size, min(len(r.ids) for r in recons))
    settings = preset.settings()
    settings.update(
        {
            "truth": {"path": str(truth.path), "kind": truth.kind, **_truth_digest(truth)},
            "weights": {net: ex.weights for net, ex in ready.items()},
            "random_weights_for_testing": bool(random_weights_for_testing),
            "device": device,
            "samples": "metrics = mean over all samples and images; best_of_k = per-image best over samples, "
            "averaged over images (per-image metrics only)",
            "undefined": f"a correlation of a constant image or constant features scores r = "
            f"{M.UNDEFINED_CORRELATION} (correlation distance {1 - M.UNDEFINED_CORRELATION}) and stays in "
            "the mean; results[].undefined counts those reconstructions (image x sample) per metric",
            "chance": {key: chance_level(key, pool_size) for key in keys},
            "higher_is_better": {key: higher_is_better(key) for key in keys},
            "unavailable": unavailable,
        }
    )
    return {"preset": preset.name, "settings": settings, "versions": library_versions(), "results": results}


def _keys_of_network(preset: Preset, net: str) -> list[str]:
    keys = [m.key for m in preset.feature_metrics if m.network == net]
    if preset.nway_identification and preset.nway_identification[0] == net:
        keys += [f"nway_{n}" for n in preset.nway_ns]
    if preset.nway_classification and preset.nway_classification[0] == net:
        keys += [f"nway_class_{n}" for n in preset.nway_class_ns]
    if preset.fid_is and preset.fid_is[0] == net:
        keys += ["fid", "is"]
    return keys
