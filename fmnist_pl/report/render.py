"""Rendering the report: report.md and report.html from the jinja2 templates in templates/, and the Markdown with
its figures inlined for the Prefect UI."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup, escape

from fmnist_pl.layout import RunFolder

TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class Figure:
    path: str  # relative to the run folder
    caption: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]

    @classmethod
    def of(cls, frame: pd.DataFrame) -> Table:
        """A DataFrame as header and rows of text; its index a first column only where it means something (class
        names), never pandas' 0, 1, 2, ..."""
        if frame.index.name or not isinstance(frame.index, pd.RangeIndex):
            frame = frame.reset_index()
        return cls([str(c) for c in frame.columns], [[str(v) for v in row] for row in frame.itertuples(index=False)])


@dataclass
class Section:
    """One part of the report, rendered both to Markdown and to HTML; paragraphs may mark **bold** text."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    code: str | None = None  # a preformatted block


def bold(text: str) -> Markup:
    """A paragraph for HTML: escaped, and **text** in bold."""
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", str(escape(text))))


def png_data_uri(path: Path, max_pixels: int | None = None) -> str:
    """A PNG file as a data URI; with `max_pixels`, downscaled to fit that box and reduced to a 64-colour palette
    (plots need no more, and the result is 3-4 times smaller)."""
    data = path.read_bytes()
    if max_pixels is not None:
        from PIL import Image

        image = Image.open(path)
        image.thumbnail((max_pixels, max_pixels))  # keeps the aspect ratio
        buffer = io.BytesIO()
        # Octree quantization keeps small markers' colours, which the default median cut turns grey.
        image.convert("RGB").quantize(colors=64, method=Image.Quantize.FASTOCTREE).save(buffer, "PNG", optimize=True)
        data = buffer.getvalue()
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


def environment(run_dir: Path, autoescape: bool) -> jinja2.Environment:
    """The templates' environment: `bold` for paragraphs, `data_uri` for a figure of the run folder."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["bold"] = bold
    env.filters["data_uri"] = lambda path: png_data_uri(run_dir / path)
    return env


def render_markdown(title: str, sections: list[Section], run_dir: Path) -> str:
    """report.md: the sections, figures linked from figures/."""
    text = environment(run_dir, autoescape=False).get_template("report.md.j2").render(title=title, sections=sections)
    return re.sub(r"\n{3,}", "\n\n", text)


def render_html(title: str, cards: list[dict], sections: list[Section], run_dir: Path) -> str:
    """report.html: one self-contained page, styles inline and figures embedded, readable on screen and paper."""
    template = environment(run_dir, autoescape=True).get_template("report.html.j2")
    style = (TEMPLATES / "report.css").read_text()
    return template.render(title=title, cards=cards, sections=sections, style=Markup(style))


def markdown_with_embedded_figures(run_dir: Path, max_pixels: int = 800) -> str:
    """report.md with every figure inlined as a downscaled PNG data URI, for places that cannot see the run
    folder (the Prefect UI's markdown artifacts, stored in its database), headed by the run folder's path."""
    run = RunFolder(Path(run_dir).resolve())
    markdown = re.sub(
        r"!\[([^\]]*)\]\((figures/[^)]+)\)",
        lambda m: f"![{m.group(1)}]({png_data_uri(run.path / m.group(2), max_pixels)})",
        run.report(".md").read_text(),
    )
    return markdown.replace("\n", f"\n\nRun folder: `{run.path}`\n", 1)
