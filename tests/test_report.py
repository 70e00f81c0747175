"""`deepcluster report`: the pieces (pure functions, filters) and the page of a tiny run."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepcluster.cli import main
from deepcluster.models import create_model
from deepcluster.report import ReportSettings, build_report
from deepcluster.report.clusters import choose_clusters, sample_members, summarize_clusters
from deepcluster.report.visuals import (AscentSettings, ascend, effective_first_filters, filter_grid,
                                        forward_to, gradient_ascent, pick_filters)

ROOT = Path(__file__).resolve().parents[1]
THREADS = torch.get_num_threads()
FAST = ["--activation-sample", "36", "--ascent-steps", "10", "--n-filters", "3", "--top-images", "4",
        "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cluster_summaries_give_sizes_majority_and_purity():
    assignments = np.array([0, 0, 0, 1, 1, -1, 2])
    labels = np.array([5, 5, 3, 3, 3, 5, 1])
    summaries = summarize_clusters(assignments, labels)
    assert [(s.cluster, s.size, s.majority) for s in summaries] == [(0, 3, 5), (1, 2, 3), (2, 1, 1)]
    assert summaries[0].purity == pytest.approx(2 / 3) and summaries[1].purity == 1.0
    assert [s.purity for s in summarize_clusters(assignments)] == [None, None, None]


def test_cluster_choice_is_bounded_at_imagenet_scale_and_keeps_the_purest():
    rng = np.random.default_rng(0)
    assignments = rng.integers(0, 10_000, 50_000)
    labels = rng.integers(0, 1000, 50_000)
    assignments[:40] = 10_000  # one pure cluster of 40 images, small next to the largest
    labels[:40] = 7
    summaries = summarize_clusters(assignments, labels)
    chosen = choose_clusters(summaries, 100, min_size_for_purity=10)
    assert len(chosen) == 100 and len({s.cluster for s in chosen}) == 100
    assert 10_000 in {s.cluster for s in chosen}
    assert chosen[0].size == max(s.size for s in summaries)
    members = sample_members(assignments, [s.cluster for s in chosen], 10, seed=1)
    assert all(len(v) <= 10 and np.all(assignments[v] == c) for c, v in members.items())
    again = sample_members(assignments, [s.cluster for s in chosen], 10, seed=1)
    assert all(np.array_equal(members[c], again[c]) for c in members)
    unlabelled = choose_clusters(summarize_clusters(assignments), 30)
    assert len(unlabelled) == 30 and unlabelled == sorted(unlabelled, key=lambda s: -s.size)


def test_sobel_first_filters_are_what_the_first_layer_applies_to_the_grey_image():
    torch.manual_seed(0)
    model = create_model("alexnet", sobel=True).eval()
    conv = model.first_conv()
    grey = torch.randn(1, 1, 67, 67).expand(1, 3, 67, 67)
    through_network = torch.nn.functional.conv2d(model.sobel(grey), conv.weight, stride=conv.stride,
                                                 padding=conv.padding)
    effective = torch.from_numpy(effective_first_filters(model)).permute(0, 3, 1, 2).float().repeat(1, 3, 1, 1)
    direct = torch.nn.functional.conv2d(grey, effective, stride=conv.stride, padding=conv.padding[0] + 1)
    assert effective_first_filters(model).shape == (96, 13, 13, 1)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the zero padding
    assert torch.allclose(through_network[inner], direct[inner], atol=1e-4)
    grid = filter_grid(effective_first_filters(model))
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    rgb = effective_first_filters(create_model("smallnet", sobel=False))
    assert rgb.shape == (32, 3, 3, 3)


def test_gradient_ascent_excites_its_filter():
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (restored after the test)
    torch.manual_seed(0)
    model = create_model("smallnet", sobel=True).eval()
    filters, mean, std = [0, 5, 9], (0.5,) * 3, (0.25,) * 3

    def response(pixels):
        with torch.no_grad():
            maps = forward_to(model, (pixels - 0.5) / 0.25, "conv4", before_relu=True)
            return maps[range(3), filters].mean(dim=(1, 2))

    pixels = ascend(model, "conv4", filters, mean, std, AscentSettings(size=32, steps=30))
    assert pixels.shape == (3, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    assert torch.equal(pixels[:, 0], pixels[:, 1])  # a Sobel network sees grey: the image stays grey
    noise = (0.5 + 0.05 * torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))).expand(3, 3, 32, 32)
    assert torch.all(response(pixels) > response(noise) + 0.1)
    assert all(p.grad is None for p in model.parameters())  # the weights are untouched
    shown = gradient_ascent(model, "conv4", filters, mean, std, AscentSettings(size=32, steps=2))
    assert shown.shape == (3, 32, 32, 3) and shown.dtype == np.uint8


def test_pick_filters_prefers_selective_ones_and_skips_dead_ones():
    scores = np.zeros((20, 4))
    scores[:, 0] = 1.0  # fires equally on everything
    scores[:2, 1] = 10.0  # fires on two images only
    scores[:, 2] = np.linspace(0, 1, 20)
    assert pick_filters(scores, 3, top_k=2) == [1, 2, 0]
    assert 3 not in pick_filters(scores, 4, top_k=2)


def page_images(html):
    return re.findall(r'<img src="([^"]*)"', html)


@pytest.fixture(scope="module")
def tiny_report(tiny_run, tmp_path_factory):
    """The report page of ``tiny_run``, built once for the tests that only read it."""
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(tiny_run), "--out", str(out), "--max-clusters", "4", "--images-per-cluster", "3"]
                + FAST) == 0
    torch.set_num_threads(THREADS)
    return out / "index.html"


@pytest.mark.slow
def test_report_of_a_tiny_run_is_one_self_contained_page(tiny_report):
    html = tiny_report.read_text()
    for anchor in ("curves", "clusters", "conv1", "units"):
        assert f'id="{anchor}"' in html
    for title in ("Clustering objective", "Training loss", "NMI(t-1, t)", "Against the true labels", "Cluster sizes"):
        assert title in html
    images = page_images(html)
    assert images and all(src.startswith("data:image/") for src in images)
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # nothing fetched: no file, no URL
    assert "<link" not in html and "<script src" not in html and "@import" not in html
    assert html.count('class="card"') == 4 and "purity" in html and "majority" in html
    assert "of the final clustering (trained network after epoch 2)" in html and "final clustering" in html
    assert len(re.findall(r'class="unit"', html)) == 3
    assert len(html.encode()) < 2_000_000


@pytest.mark.slow
def test_report_defaults_next_to_the_run_and_survives_moved_images(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(re.sub(r"^data: .*$", "data: /no/longer/here", config, flags=re.M))
    result = build_report(run, settings=ReportSettings(activation_sample=10, ascent_steps=0, n_filters=2))
    assert result.path == run / "report" / "index.html" and result.clusters_shown == 0
    assert any("pass --data" in note for note in result.notes)
    html = result.path.read_text()
    assert "Cluster sizes" in html and "First-layer filters" in html


@pytest.mark.parametrize("extra, message", [
    (["--layer", "conv42"], "is not a conv layer"),
    (["--epoch", "9"], "has no saved assignments"),
    (["--max-clusters", "0"], "--max-clusters must be a positive integer"),
    (["--filters", "1,x"], "comma-separated integers"),
    (["--filters", "100000"], "out of range"),
])
@pytest.mark.slow
def test_report_bad_options_exit_2(extra, message, tiny_run, tmp_path, capsys):
    code = main(["report", str(tiny_run), "--out", str(tmp_path / "r")] + FAST + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_report_of_a_folder_that_is_not_a_run_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a deepcluster run folder" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = "Chromium is not installed (apt-get install chromium; CI installs it)"
# CI sets DEEPCLUSTER_REQUIRE_CHROMIUM: there a missing browser fails these tests instead of skipping them.
SKIP_BROWSER = CHROMIUM is None and not os.environ.get("DEEPCLUSTER_REQUIRE_CHROMIUM")

# Injected first into a copy of the page: records console errors and failed loads, then,
# once everything has loaded, what a reader would see and do (the sort buttons, the class
# filter), as JSON in <pre id="probe"> for --dump-dom to return.
PROBE = """<script>
(function () {
  var errors = [];
  var oldError = console.error;
  console.error = function () { errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
                                oldError.apply(console, arguments); };
  window.addEventListener('error', function (e) {
    errors.push('error: ' + (e.message || (e.target && (e.target.src || e.target.outerHTML).slice(0, 80))));
  }, true);
  function visible() {
    return Array.prototype.filter.call(document.querySelectorAll('#cluster-grid .card'), function (c) {
      return !c.classList.contains('hidden');
    }).map(function (c) { return {size: +c.dataset.size, purity: +c.dataset.purity, cls: c.dataset.cls}; });
  }
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    var out = {errors: errors, images: images.length,
               broken: images.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length,
               count0: document.getElementById('count').textContent, initial: visible()};
    document.querySelector('button[data-sort="purity"]').click();
    out.by_purity = visible();
    var select = document.getElementById('class-filter');
    var wanted = select.options[select.options.length - 1].value;
    select.value = wanted;
    select.dispatchEvent(new Event('change'));
    out.wanted = wanted; out.filtered = visible(); out.count = document.getElementById('count').textContent;
    var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
})();
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM, NO_CHROMIUM
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def keep_artifact(path: Path) -> None:
    """Copy a file into ``$DEEPCLUSTER_TEST_ARTIFACTS`` when set (CI keeps that folder)."""
    folder = os.environ.get("DEEPCLUSTER_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(folder) / path.name)


@pytest.mark.slow
@pytest.mark.skipif(SKIP_BROWSER, reason=NO_CHROMIUM)
def test_the_page_renders_in_headless_chromium(tiny_report, tmp_path):
    shot = tmp_path / "report_page.png"
    result = subprocess.run([str(ROOT / "scripts" / "screenshot_report.sh"), str(tiny_report), str(shot),
                             "1200", "1600"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    keep_artifact(shot)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 20  # not a blank or error page: text, plots and thumbnails drawn
    # The plots are drawn: some columns in the upper part carry the blue of the curves.
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80) & (pixels[..., 1] > 80) & (pixels[..., 1] < 150)
    assert blue.sum() > 200


@pytest.mark.slow
@pytest.mark.skipif(SKIP_BROWSER, reason=NO_CHROMIUM)
def test_in_chromium_every_image_loads_no_error_is_logged_and_sorting_and_the_class_filter_work(
        tiny_report, tmp_path):
    html = tiny_report.read_text()
    page = tmp_path / "probed.html"
    page.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    result = chromium("--virtual-time-budget=10000", "--dump-dom", f"file://{page}", profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-500:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, "the page's load event never came"
    import html as html_module
    import json

    probe = json.loads(html_module.unescape(found.group(1)))
    assert probe["errors"] == []
    assert probe["images"] == len(page_images(html)) > 10 and probe["broken"] == 0
    assert probe["count0"] == "showing 4 of 4 clusters"
    sizes = [card["size"] for card in probe["initial"]]
    assert len(sizes) == 4 and sizes == sorted(sizes, reverse=True)
    purities = [card["purity"] for card in probe["by_purity"]]
    assert len(purities) == 4 and purities == sorted(purities, reverse=True)
    expected = sum(card["cls"] == probe["wanted"] for card in probe["initial"])
    assert expected >= 1 and [card["cls"] for card in probe["filtered"]] == [probe["wanted"]] * expected
    assert probe["count"] == f"showing {expected} of {expected} clusters"


@pytest.mark.slow
@pytest.mark.skipif(SKIP_BROWSER, reason=NO_CHROMIUM)
def test_the_page_script_sorts_by_the_linked_view_in_chromium(tiny_report, tmp_path):
    result = chromium("--dump-dom", f"file://{tiny_report}#sort=purity", profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-500:]
    cards = re.findall(r'<div class="card( hidden)?" data-size="(\d+)" data-purity="([\d.]+)"', result.stdout)
    purities = [float(p) for _, _, p in cards]
    assert len(cards) == 4 and purities == sorted(purities, reverse=True)  # the script re-ordered the grid
    assert "showing 4 of 4 clusters" in result.stdout


def test_charts_keep_noise_flat_the_legend_off_the_bars_and_whole_counts_whole():
    """Was: an offset label (1e-8+8.46774e-1) stretching rounding noise to full height, the
    'Time per epoch' legend over the last bar, cluster counts ticked at 2.5."""
    import matplotlib

    from deepcluster.report.plots import line_axes, size_axes, time_axes

    records = [{"epoch": e, "clustering_objective": 0.846774 + 1e-8 * (e % 2), "time_features": 1.0,
                "time_clustering": 0.5, "time_training": 10.0 + e} for e in range(1, 6)]
    figure = line_axes(records, [("clustering_objective", "objective")], "objective")
    figure.canvas.draw()
    axis = figure.axes[0]
    low, high = axis.get_ylim()
    assert axis.yaxis.get_offset_text().get_text() == ""
    assert high - low > 0.02  # the noise is a flat line, not a zig-zag across the plot
    labels = [tick.get_text() for tick in axis.get_yticklabels() if tick.get_text()]
    assert labels and all("e" not in label.lower() for label in labels), labels

    figure = time_axes(records)
    renderer = figure.canvas.get_renderer()
    figure.tight_layout()
    figure.canvas.draw()
    legend = figure.axes[0].get_legend().get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for patch in figure.axes[0].patches]
    assert bars and not any(legend.overlaps(bar) for bar in bars)

    figure = size_axes(np.array([5, 4, 4, 3, 3, 3, 2]), 8)
    figure.canvas.draw()
    histogram = figure.axes[1]
    for ticks in (histogram.get_yticks(), histogram.get_xticks()):
        assert np.allclose(ticks, np.round(ticks)), ticks
    matplotlib.pyplot.close("all")
