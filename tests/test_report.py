"""The HTML report built from fake inputs in the real layouts: rows, escaping, embedding, losses, chance."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from fmrirecon.errors import DatasetLayoutError, EvaluationInputError
from fmrirecon.io import write_json_atomic
from fmrirecon.report import build_report, chance_level, collect_inputs
from fmrirecon.report.builder import format_value
from fmrirecon.report.fake import write_fake_report_inputs
from fmrirecon.report.inputs import GroundTruth, read_loss_log

EVIL = '<script>alert("x")</script>'


class _Page(HTMLParser):
    """Collects what the assertions need: every src/href, image rows per subject, table cells."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.rows: dict[str, list[str]] = {}
        self.subject: str | None = None
        self.scripts = 0
        self.loss_plots = 0
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])
        if tag == "script":
            self.scripts += 1
        if tag == "section" and "subject" in (attrs.get("class") or ""):
            self.subject = attrs["data-subject"]
            self.rows[self.subject] = []
        if tag == "tr" and attrs.get("class") == "image-row":
            self.rows[self.subject].append(attrs["data-id"])
        if tag == "img":
            self.images.append(attrs["src"])
            if "loss-plot" in (attrs.get("class") or ""):
                self.loss_plots += 1


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_report_inputs(
        tmp_path_factory.mktemp("inputs"),
        subjects={1: 7, 2: 5},
        methods=(("ridge", "default"), (f"nd{EVIL}", "guided")),
        caption=f"a cat {EVIL} & a dog",
    )


def test_rows_per_subject_follow_test_ids_and_limit(fake, tmp_path):
    out = build_report([fake.metrics], tmp_path / "report.html", max_images=6)
    page = _parse(out)
    # Subject 1 saw 7 test images (limited to 6), subject 2 saw 5; rows are in 73k-id order.
    assert page.rows == {
        "1": [str(i) for i in sorted(fake.test_ids[1])[:6]],
        "2": [str(i) for i in sorted(fake.test_ids[2])],
    }


def test_strings_from_data_are_escaped(fake, tmp_path):
    out = build_report([fake.metrics, fake.root / "runs"], tmp_path / "report.html")
    html = out.read_text(encoding="utf-8")
    page = _parse(out)
    assert page.scripts == 0
    assert EVIL not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "a cat &lt;script&gt;" in html  # the caption is shown, escaped


def test_self_contained_images_are_embedded_pngs(fake, tmp_path):
    out = build_report([fake.metrics], tmp_path / "report.html", max_images=3)
    page = _parse(out)
    assert page.links, "the report shows images"
    assert all(link.startswith("data:image/png;base64,") for link in page.links)
    # Rows x (ground truth + 2 methods), no loss plots without run dirs.
    assert len(page.images) == (3 + 3) * 3
    assert page.loss_plots == 0
    # The ground-truth cell decodes to exactly the stored stimulus.
    truth = GroundTruth(fake.store)
    first_id = sorted(fake.test_ids[1])[0]
    png = base64.b64decode(page.images[0].split(",", 1)[1])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), truth.images([first_id])[0])


def test_loss_plots_present_when_runs_have_jsonl(fake, tmp_path):
    out = build_report([fake.metrics, fake.root / "runs"], tmp_path / "report.html")
    page = _parse(out)
    # One plot per run: 2 methods x 2 subjects.
    assert page.loss_plots == 4
    # A run without metrics.jsonl is listed without a plot.
    bare = tmp_path / "bare_run"
    bare.mkdir()
    write_json_atomic(bare / "run.json", {"method": "ridge", "subject": 1, "seed": 3})
    out = build_report([fake.metrics, bare], tmp_path / "bare.html")
    assert _parse(out).loss_plots == 0
    assert "no per-step losses" in out.read_text(encoding="utf-8")


def test_loss_log_reads_steps_and_ignores_bookkeeping(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0 / (s + 1), "lr": 0.1, "mse": 2.0} for s in range(5)]
    log.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 5, "lo')  # truncated last line
    parsed = read_loss_log(log, "pretrain")
    np.testing.assert_array_equal(parsed.steps, np.arange(5))
    assert sorted(parsed.losses) == ["loss", "mse"]
    np.testing.assert_allclose(parsed.losses["loss"], [1.0, 0.5, 1 / 3, 0.25, 0.2])


def test_metric_table_has_chance_row_and_values(fake, tmp_path):
    out = build_report([fake.metrics], tmp_path / "report.html")
    html = out.read_text(encoding="utf-8")
    result = json.loads(fake.metrics.read_text())["results"][0]
    assert f"<td>{format_value(result['metrics']['pixcorr'])}</td>" in html
    # Chance row: pixcorr 0, ssim n/a, alexnet2 0.5, retrieval 1/4 (settings retrieval_pool), nway_5 0.2.
    chance_rows = [line for line in html.splitlines() if 'class="chance"' in line]
    assert len(chance_rows) == 2
    assert "<td>0.000</td><td>n/a</td><td>0.500</td>" in chance_rows[0]
    assert "<td>0.250</td>" in chance_rows[0] and "<td>0.200</td>" in chance_rows[0]


def test_chance_levels():
    assert chance_level("pixcorr") == 0.0
    assert chance_level("ssim") is None
    assert chance_level("clip") == 0.5
    assert chance_level("nway_50") == pytest.approx(1 / 50)
    assert chance_level("retrieval_brain", n_images=982) == pytest.approx(1 / 300)
    assert chance_level("retrieval_image", n_images=40) == pytest.approx(1 / 40)
    assert chance_level("retrieval_image", n_images=982, settings={"retrieval_batch": 100}) == pytest.approx(
        0.01
    )
    assert chance_level("ssim", settings={"chance": {"ssim": 0.1}}) == 0.1
    assert chance_level("brain_corr_v1") == 0.0
    assert chance_level("fid") is None


def test_format_value_variants():
    assert format_value(0.12345) == "0.123"
    assert format_value({"mean": 0.5, "ci": [0.4, 0.6]}) == "0.500 [0.400, 0.600]"
    assert format_value({"mean": 0.5, "std": 0.1}) == "0.500 ± 0.100"
    assert format_value(None) == "—"
    assert format_value(123.456) == "123.5"


def test_recon_dirs_from_cli_list_when_metrics_lack_recon_dir(fake, tmp_path):
    doc = json.loads(fake.metrics.read_text())
    for result in doc["results"]:
        del result["recon_dir"]
    bare_metrics = tmp_path / "metrics.json"
    write_json_atomic(bare_metrics, doc)
    assert collect_inputs([bare_metrics]).recons == []
    inputs = collect_inputs([bare_metrics], recon_dirs=fake.recon_dirs[:2])
    assert [r.path for r in inputs.recons] == fake.recon_dirs[:2]
    out = build_report([bare_metrics], tmp_path / "r.html", recon_dirs=fake.recon_dirs[:2])
    assert list(_parse(out).rows) == ["1", "2"]
    assert len(_parse(out).rows["1"]) == 7 and _parse(out).rows["2"] == []


def test_folder_source_is_searched_and_skipped_methods_listed(fake, tmp_path):
    out = build_report(
        [fake.root],
        tmp_path / "report.html",
        skipped=[{"method": "mindreader", "reason": f"ImportError {EVIL}"}],
    )
    html = out.read_text(encoding="utf-8")
    page = _parse(out)
    assert page.loss_plots == 4 and len(page.rows["1"]) == 7
    assert '<code class="skipped-method">mindreader</code>: ImportError &lt;script&gt;' in html


def test_bad_inputs_raise_domain_errors(tmp_path):
    not_metrics = tmp_path / "x.json"
    not_metrics.write_text('{"foo": 1}')
    with pytest.raises(EvaluationInputError, match="not a metrics.json"):
        build_report([not_metrics], tmp_path / "r.html")
    with pytest.raises(EvaluationInputError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "r.html")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationInputError, match="holds no metrics.json"):
        build_report([empty], tmp_path / "r.html")
    with pytest.raises(DatasetLayoutError, match="prepared store"):
        GroundTruth(empty)


def test_cli_report_writes_file(fake, tmp_path, capsys):
    from fmrirecon.cli import main

    out = tmp_path / "cli.html"
    code = main(
        ["report", str(fake.metrics), str(fake.root / "runs"), "--out", str(out), "--max-images", "2"]
    )
    assert code == 0
    assert str(out) in capsys.readouterr().out
    assert {k: len(v) for k, v in _parse(out).rows.items()} == {"1": 2, "2": 2}
    assert main(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_reads_the_evaluation_settings_as_the_suite_writes_them(fake, tmp_path):
    doc = json.loads(fake.metrics.read_text())
    for result in doc["results"]:
        result["recon_dir"] = str(
            (fake.metrics.parent / result["recon_dir"]).resolve()
        )  # absolute, like the suite
    doc["settings"] = {
        "truth": {"path": str(fake.store), "kind": "store"},
        "higher_is_better": {"pixcorr": True, "ssim": False},
        "chance": {"pixcorr": 0.0, "ssim": None},
        "unavailable": {"swav": f"swav: no weights under {EVIL}"},
    }
    metrics = tmp_path / "suite_metrics.json"
    write_json_atomic(metrics, doc)
    out = build_report([metrics], tmp_path / "r.html", max_images=2)
    html = out.read_text(encoding="utf-8")
    page = _parse(out)
    # Ground truth found through settings["truth"]["path"]: every row has a truth image + 2 recon images.
    assert len(page.images) == (2 + 2) * 3
    assert "<th>ssim ↓</th>" in html and "<th>effnet ↓</th>" in html and "<th>pixcorr</th>" in html
    assert "<code>swav</code>: swav: no weights under &lt;script&gt;" in html


def test_the_page_names_the_ground_truth_store_by_its_content_digest(fake, tmp_path):
    from fmrirecon.data.integrity import store_digest
    from fmrirecon.data.prepare import prepare_nsd
    from fmrirecon.data.synthetic import write_synthetic_nsd

    root = write_synthetic_nsd(
        tmp_path / "root",
        n_subjects=1,
        n_shared=4,
        n_unique=8,
        n_repeats=1,
        max_sessions=1,
        n_voxels_base=250,
        formats=("hdf5",),
        progress=False,
    )
    store = prepare_nsd(root, tmp_path / "store", betas_format="hdf5", progress=False)
    digest = store_digest(store)
    html = build_report([fake.metrics], tmp_path / "r.html", truth=store).read_text()
    assert f"(store digest {digest})" in html and not digest.startswith("unsealed:")
