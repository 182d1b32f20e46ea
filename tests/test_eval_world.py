"""The world preset on a tiny synthetic store: brain correlation with the simulator, several folders."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fmrirecon.data.prepare import prepare_nsd
from fmrirecon.data.store import PreparedStore
from fmrirecon.data.synthetic import write_synthetic_nsd
from fmrirecon.evaluation.features import FeatureExtractor
from fmrirecon.evaluation.suite import evaluate_reconstructions


class PooledPixels(torch.nn.Module):
    """Stand-in for the world CLIP (its weights may not be built): pooled pixels as embeddings."""

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 48)
        return {"image_embeds": pooled, "zero_shot": pooled[:, :12]}


def _write_recon(folder, ids, images, subject, variant):
    (folder / "images").mkdir(parents=True)
    for image_id, image in zip(ids, images):
        Image.fromarray(image).save(folder / "images" / f"{image_id}_0.png")
    manifest = {"method": "oracle", "subject": subject, "variant": variant, "ids": ids.tolist(), "samples": 1}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def world_store(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_world")
    write_synthetic_nsd(
        base / "root",
        n_subjects=1,
        n_shared=12,
        n_unique=24,
        n_repeats=2,
        max_sessions=2,
        n_voxels_base=300,
        formats=("hdf5",),
        progress=False,
    )
    prepare_nsd(base / "root", base / "store", betas_format="hdf5", progress=False)
    store = PreparedStore(base / "store")
    ids, _ = store.subject(1).averaged("test")
    images = store.images(ids)
    return {
        "store": base / "store",
        "true": _write_recon(base / "true", ids, images, 1, "true"),
        # each id shows the image of another id: a reconstruction of the wrong image
        "shuffled": _write_recon(base / "shuffled", ids, np.roll(images, 1, axis=0), 1, "shuffled"),
        "other_subject": _write_recon(base / "other", ids, images, 2, "true"),
    }


def test_world_preset_brain_correlation_separates_true_from_wrong_images(world_store):
    extractors = {
        "world_clip": FeatureExtractor("world_clip", PooledPixels(), ["image_embeds", "zero_shot"], "x")
    }
    report = evaluate_reconstructions(
        [world_store["true"], world_store["shuffled"], world_store["other_subject"]],
        world_store["store"],
        "world",
        extractors=extractors,
        progress=False,
    )
    true, shuffled, other = (r["metrics"] for r in report["results"])
    rois = ("V1", "V2", "V3", "V4", "higher", "whole")
    for roi in rois:
        # the noiseless encoder explains the true images' averaged betas (limited by trial noise) ...
        assert true[f"brain_corr_{roi}"] > 0.3, roi
        # ... and not the betas of another image
        assert true[f"brain_corr_{roi}"] > shuffled[f"brain_corr_{roi}"] + 0.3, roi
    assert true["pixcorr"] == pytest.approx(1.0) and true["clip"] == 1.0
    assert shuffled["clip"] < 1.0
    # subject 2 is not in the store: brain correlation unavailable for that folder only, with the reason
    assert not any(k.startswith("brain_corr") for k in other)
    assert "oracle/subj02/true" in report["settings"]["unavailable"]["brain_corr_*"]
    details = report["results"][0]["details"]["brain_corr"]["rois"]
    assert details["higher"].startswith("streams labels [5, 6, 7]")
    assert report["settings"]["truth"]["kind"] == "store"
    assert report["settings"]["chance"]["nway_class_5"] == pytest.approx(0.2)
