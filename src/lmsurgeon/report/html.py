"""report.html: one self-contained page (figures embedded as data URIs) rendered by a Jinja2 template."""

from __future__ import annotations

import base64
import html as _html
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape


@dataclass
class Section:
    """One block of the report: a heading, some text, an optional table and figures (paths in the run folder)."""

    title: str
    text: str = ""
    table: list[dict] | None = None
    figures: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (label, relative href)
    note: str = ""


@dataclass
class Report:
    """What a command shows a person: a verdict-first summary, how to read it, then sections."""

    title: str
    summary: dict = field(default_factory=dict)
    how_to_read: str = ""
    sections: list[Section] = field(default_factory=list)
    subtitle: str = ""


def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("lmsurgeon.report", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = format_cell
    env.tests["numeric"] = is_numeric_cell
    return env


def is_numeric_cell(v: object) -> bool:
    """Numbers are right-aligned so their digits line up; text, names and verdicts stay left."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_cell(v: object) -> str:
    """Numbers at a readable precision; None (undefined, non-finite) as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "—"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_report(report: Report, base: str | Path) -> str:
    """Render ``report``; figure paths are resolved against ``base`` and embedded."""
    base = Path(base)
    sections = []
    for s in report.sections:
        figs = [(f, _data_uri(base / f)) for f in s.figures if (base / f).is_file()]
        cols: list[str] = []
        for row in s.table or []:
            cols.extend(k for k in row if k not in cols)
        sections.append({"s": s, "figures": figs, "columns": cols})
    return _env().get_template("report.html.j2").render(report=report, sections=sections, escape=_html.escape)
