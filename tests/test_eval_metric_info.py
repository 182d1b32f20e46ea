"""One table of metric metadata: direction, chance and order, shared by the suite, CLI table and report."""

import pytest

from fmrirecon.evaluation.metric_info import chance_level, higher_is_better, ordered_metrics
from fmrirecon.report import chance_level as report_chance_level


@pytest.mark.parametrize(
    "metric, pool, expected",
    [
        ("pixcorr", None, 0.0),
        ("brain_corr_v1", None, 0.0),
        ("alexnet2", None, 0.5),
        ("clip", None, 0.5),
        ("nway_10", None, 0.1),
        ("nway_class_50", None, 1 / 50),  # the report's old regex knew only nway_<n>: the tables had drifted
        ("retrieval_brain", 300, 1 / 300),
        ("retrieval_image", None, None),
        ("ssim", None, None),
        ("fid", None, None),
        ("is", None, None),
    ],
)
def test_chance_levels(metric, pool, expected):
    assert chance_level(metric, pool) == (pytest.approx(expected) if expected is not None else None)


def test_report_chance_reads_the_same_table_and_lets_the_file_win():
    for metric in ("pixcorr", "alexnet5", "nway_class_5", "ssim"):
        assert report_chance_level(metric) == chance_level(metric)
    assert report_chance_level("retrieval_image", n_images=40) == pytest.approx(1 / 40)
    assert report_chance_level("retrieval_image", n_images=982) == pytest.approx(1 / 300)
    assert report_chance_level("ssim", settings={"chance": {"ssim": 0.2}}) == 0.2


def test_direction_and_order():
    assert [m for m in ("pixcorr", "effnet", "swav", "fid", "is") if not higher_is_better(m)] == [
        "effnet",
        "swav",
        "fid",
    ]
    keys = {"nway_class_2", "fid", "brain_corr_v1", "nway_10", "pixcorr", "nway_2", "ssim", "retrieval_image"}
    assert ordered_metrics(keys) == [
        "pixcorr", "ssim", "retrieval_image", "fid", "nway_2", "nway_10", "nway_class_2", "brain_corr_v1",
    ]  # fmt: skip
