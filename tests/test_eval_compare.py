"""Paired comparisons of evaluation results (fmrirecon.evaluation.compare) and their report table."""

import json

import numpy as np
import pytest
from scipy import stats

from fmrirecon.evaluation.compare import find_reference, paired_difference
from fmrirecon.report import build_report
from fmrirecon.report.fake import write_fake_report_inputs


def _result(method, ids, values, subject=1, variant=None):
    return {"method": method, "variant": variant, "subject": subject, "ids": list(ids), "per_image": values}


def test_difference_pairs_by_id_and_matches_a_paired_t_interval():
    rng = np.random.default_rng(0)
    ids = np.arange(100, 130)
    difficulty = rng.normal(0.5, 0.2, 30)  # shared by both methods: easy and hard images
    a, b = difficulty + 0.1 + rng.normal(0, 0.02, 30), difficulty + rng.normal(0, 0.02, 30)
    order = rng.permutation(30)  # the reference lists the same images in another order
    result = _result("nd", ids, {"pixcorr": a.tolist()})
    reference = _result("ridge", ids[order], {"pixcorr": b[order].tolist()})
    d = paired_difference(result, reference)["pixcorr"]
    diff = a - b
    half = stats.t.ppf(0.975, 29) * diff.std(ddof=1) / np.sqrt(30)
    assert d["n"] == 30
    np.testing.assert_allclose(
        [d["mean"], d["low"], d["high"]], [diff.mean(), diff.mean() - half, diff.mean() + half]
    )
    # narrower than the interval of either mean alone, since the difficulty cancels
    assert d["high"] - d["low"] < 2 * stats.t.ppf(0.975, 29) * a.std(ddof=1) / np.sqrt(30)


def test_a_metric_with_an_unscored_image_is_left_out_never_compared_on_a_subset():
    # None: an image without a score (metrics.json written before undefined scores were defined, e.g. a blank
    # reconstruction's PixCorr); comparing on the other images would drop the image where "nd" failed
    result = _result(
        "nd",
        [1, 2, 3, 4],
        {"pixcorr": [0.5, None, 0.7, 0.9], "ssim": [0.1, 0.2, 0.3, 0.4], "clip": [0.9, 0.8, 0.7, 0.6]},
    )
    reference = _result("ridge", [4, 3, 2, 9], {"pixcorr": [0.5] * 4, "ssim": [0.5, 0.5, 0.5, 0.5]})
    out = paired_difference(result, reference)
    assert set(out) == {"ssim"}  # pixcorr has an unscored shared image, clip is only on one side
    # all 3 shared images (ids 2, 3, 4); ids 1 and 9 are not shared
    assert out["ssim"]["n"] == 3
    assert out["ssim"]["mean"] == pytest.approx(np.mean([0.2, 0.3, 0.4]) - 0.5)


def test_bad_pairs_raise():
    a = _result("nd", [1, 2], {"pixcorr": [0.1, 0.2]})
    with pytest.raises(ValueError, match="one subject"):
        paired_difference(a, _result("ridge", [1, 2], {"pixcorr": [0.1, 0.2]}, subject=2))
    with pytest.raises(ValueError, match="share no test image"):
        paired_difference(a, _result("ridge", [3, 4], {"pixcorr": [0.1, 0.2]}))
    old = {"method": "ridge", "variant": None, "subject": 1, "metrics": {}}
    with pytest.raises(ValueError, match="re-run the evaluation"):
        paired_difference(a, old)


def test_find_reference_prefers_the_named_variant_else_the_first():
    results = [
        _result("ridge", [1], {}, variant="latent"),
        _result("ridge", [1], {}, variant="img2img"),
        _result("nd", [1], {}),
    ]
    assert find_reference(results)["variant"] == "img2img"
    assert find_reference(results, "ridge", "latent")["variant"] == "latent"
    assert find_reference(results, "mindreader") is None


def test_report_shows_paired_differences_against_ridge(tmp_path):
    fake = write_fake_report_inputs(
        tmp_path / "inputs", subjects={1: 6}, methods=(("ridge", "img2img"), ("nd", "guided"))
    )
    html = build_report([fake.metrics], tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Paired differences against ridge · img2img" in html
    results = json.loads(fake.metrics.read_text())["results"]
    nd, ridge = (next(r for r in results if r["method"] == m) for m in ("nd", "ridge"))
    d = paired_difference(nd, ridge)["pixcorr"]
    assert f'{d["mean"]:+.3f}<span class="interval">[{d["low"]:+.3f}, {d["high"]:+.3f}]</span>' in html


def test_report_pairs_only_within_the_reference_preset(tmp_path):
    fake = write_fake_report_inputs(
        tmp_path / "inputs", subjects={1: 6}, methods=(("ridge", "img2img"), ("nd", "guided"))
    )
    other = json.loads(fake.metrics.read_text())
    other["preset"] = "mindeye"
    other["results"] = [dict(r, variant="scored-otherwise") for r in other["results"] if r["method"] == "nd"]
    other_path = tmp_path / "inputs" / "other_metrics.json"
    other_path.write_text(json.dumps(other))
    html = build_report([fake.metrics, other_path], tmp_path / "report.html").read_text(encoding="utf-8")
    paired = html[html.index("Paired differences") :]
    paired = paired[: paired.index("</table>")]
    assert "nd · guided" in paired and "scored-otherwise" not in paired
