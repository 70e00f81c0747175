"""The online kNN's top-5 is shown where its top-1 is: on the terminal's epoch line and on
the report's kNN curve."""

from __future__ import annotations

import matplotlib

from deepcluster.messages import format_line
from deepcluster.report.plots import KNN_LINES, epoch_curves, line_axes

RECORD = {"epoch": 3, "clustering_objective": 0.7412, "train_loss": 2.3029, "knn_top1": 41.23, "knn_top5": 78.46,
          "n_nonempty": 100, "largest_cluster_share": 0.021, "time_features": 1.0, "time_clustering": 0.2,
          "time_training": 3.4, "train_images_per_s": 530.0}


def test_the_epoch_line_shows_knn_top1_and_top5_side_by_side():
    assert "  knn top-1/5 41.2/78.5%  " in format_line(RECORD, 15)
    body = {**RECORD, "knn_body_top1": 45.04, "knn_body_top5": 80.15}
    assert "  knn top-1/5 41.2/78.5% (conv body 45.0/80.2%)  " in format_line(body, 15)


def test_a_record_without_top5_keeps_the_top1_alone():
    record = {key: value for key, value in RECORD.items() if key != "knn_top5"}
    assert "  knn top-1 41.2%  " in format_line(record, 15)


def test_the_knn_curve_draws_top5_dashed_in_the_colour_of_top1():
    records = [{**RECORD, "epoch": epoch, "knn_top1": 40.0 + epoch, "knn_top5": 75.0 + epoch,
                "knn_body_top1": 44.0 + epoch, "knn_body_top5": 79.0 + epoch} for epoch in range(1, 4)]
    figure = line_axes(records, KNN_LINES, "accuracy (%)")
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [label for _, label, _ in KNN_LINES]
    assert list(lines[1].get_ydata()) == [76.0, 77.0, 78.0]
    assert lines[0].get_color() == lines[1].get_color() and lines[1].get_linestyle() == "--"
    assert lines[2].get_color() == lines[3].get_color() != lines[0].get_color()
    titles = [f.title for f in epoch_curves(records)]
    assert "Online kNN" in titles and "top-5" in epoch_curves(records)[titles.index("Online kNN")].caption
    matplotlib.pyplot.close("all")
