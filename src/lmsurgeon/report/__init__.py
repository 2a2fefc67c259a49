"""Run folders: results.json (versioned schema), PNG figures and one self-contained report.html per command."""

from lmsurgeon.report.html import Report, Section, render_report
from lmsurgeon.report.results import SCHEMA_PREFIX, jsonable, versions
from lmsurgeon.report.runfolder import RunFolder, atomic_write_bytes, atomic_write_json, default_out_dir

__all__ = [
    "SCHEMA_PREFIX",
    "Report",
    "RunFolder",
    "Section",
    "atomic_write_bytes",
    "atomic_write_json",
    "default_out_dir",
    "jsonable",
    "render_report",
    "versions",
]
