"""The report page of a run: curves, clusters, filters, in one self-contained HTML file.

``build_report(run_dir, out_dir, ReportSettings(...))`` reads the run folder (``log.jsonl``,
``assignments/``, ``checkpoint.pt`` and the images) and writes ``index.html``; the
``deepcluster report`` command is a thin wrapper. Modules: ``run_data`` (reading the run),
``clusters`` (sizes, purity, bounded samples), ``plots`` (matplotlib), ``visuals`` (filters,
top images, gradient ascent), ``page`` (HTML), ``build`` (putting it together).
"""

from deepcluster.report.build import PAGE_NAME, ReportResult, ReportSettings, build_report

__all__ = ["PAGE_NAME", "ReportResult", "ReportSettings", "build_report"]
