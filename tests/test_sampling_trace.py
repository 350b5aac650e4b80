"""The HTML trace: self-contained markup, and a real headless-browser screenshot check.

The screenshot test needs Debian's chromium (`apt-get install -y chromium`); it renders a
trace, then reads the PNG and checks that the page is not blank and that each transition colour
fills token boxes in the step list (below y = 300 px, under the legend and the chart), while a
trajectory without changes shows none there.
Manual check: docs/sampling.md, "Checking a trace in a real browser".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xdlm.sampling import Trajectory, write_trace_html
from xdlm.sampling.trace_html import COLOURS, MASK_GLYPH, NAMES

CHROMIUM = "/usr/bin/chromium"
M = 9


def _decode(ids: list[int]) -> str:
    return "".join(f"w{i}" for i in ids)


def _trajectory() -> Trajectory:
    states = [[M] * 8, [1, M, M, 2, M, M, M, M], [1, 3, M, 4, M, M, 5, M], [1, 3, 5, M, 6, 7, 5, 2]]
    states += [[1, 3, 5, 4, 6, 8, 6, 2]]
    return Trajectory(torch.tensor(states).unsqueeze(1), ["s1", "s2", "s3", "final"], M)


def test_html_is_self_contained_and_escaped(tmp_path):
    path = write_trace_html(_trajectory(), lambda ids: "<b>&", tmp_path / "t.html")
    text = path.read_text()
    assert "<svg" in text and "type='range'" in text
    assert "&lt;b&gt;&amp;" in text and "<b>&" not in text
    assert "http://" not in text and "https://" not in text and " src=" not in text
    for colour in COLOURS.values():
        assert colour in text
    with pytest.raises(ValueError, match="sample"):
        write_trace_html(_trajectory(), _decode, tmp_path / "x.html", sample=3)


class _Page(HTMLParser):
    """The parts of a trace page, as a browser's parser sees them: title, legend, slider, rows
    (id, data-label, label text, token spans with their attributes and text) and any text that
    sits where only markup belongs (`loose`)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.decl, self.title, self.h2, self.loose = "", "", "", ""
        self.legend, self.rows, self.slider, self._in = [], [], {}, None
        self.feed(text)

    def handle_decl(self, decl):
        self.decl = decl

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "row":
            self.rows.append({"id": a["id"], "label": a["data-label"], "lab": "", "spans": []})
            self._in = "row"
        elif tag == "div" and a.get("class") in ("lab", "legend"):
            self._in = a["class"]
        elif tag == "span" and self._in in ("row", "legend"):
            target = self.rows[-1]["spans"] if self._in == "row" else self.legend
            target.append([attrs, ""])
            self._in += "-span"
        elif tag == "input":
            self.slider = a
        elif tag in ("title", "h2", "style", "script", "svg"):
            self._in = tag

    def handle_endtag(self, tag):
        if tag in ("title", "h2", "style", "script", "svg"):
            self._in = None
        elif tag in ("span", "div"):
            self._in = {"row-span": "row", "legend-span": "legend", "lab": "row"}.get(self._in)

    def handle_data(self, data):
        if self._in in ("row-span", "legend-span"):
            (self.rows[-1]["spans"] if self._in == "row-span" else self.legend)[-1][1] += data
        elif self._in in ("title", "h2"):
            setattr(self, self._in, getattr(self, self._in) + data)
        elif self._in == "lab":
            self.rows[-1]["lab"] += data
        elif self._in not in ("style", "script", "svg"):
            self.loose += data


def _svg(text: str) -> ET.Element:
    return ET.fromstring(text[text.index("<svg") : text.index("</svg>") + len("</svg>")])


_STEPS = {"revealed": [2, 2, 4, 1], "revised": [0, 1, 0, 2], "re-masked": [0, 0, 1, 0]}


def test_each_state_is_a_row_of_its_tokens_coloured_by_their_transition(tmp_path):
    trajectory = _trajectory()
    page = _Page(write_trace_html(trajectory, _decode, tmp_path / "a" / "b" / "t.html").read_text())
    assert page.decl.lower() == "doctype html" and page.loose.strip() == ""
    assert page.title == page.h2 == "XDLM sampling trace"
    assert page.legend == [[[("style", f"background:{COLOURS[c]}")], n] for c, n in NAMES.items()]
    assert (page.slider["min"], page.slider["max"]) == ("0", "4")
    assert [row["id"] for row in page.rows] == [f"step{i}" for i in range(5)]
    tallies = [", ".join(f"{_STEPS[n][i]} {n}" for n in _STEPS) for i in range(4)]
    steps = zip(["s1", "s2", "s3", "final"], tallies, strict=True)
    labels = ["initial state z_1"] + [f"{s} \u2014 {t}" for s, t in steps]
    assert [row["label"] for row in page.rows] == [row["lab"] for row in page.rows] == labels
    codes = [[0] * 8, *trajectory.transitions()[:, 0].tolist()]
    for row, ids, row_codes in zip(page.rows, trajectory.states[:, 0].tolist(), codes, strict=True):
        expected = []
        for tok, code in zip(ids, row_codes, strict=True):
            attrs = [("class", "tok m" if tok == M else "tok")]
            if code in COLOURS:
                attrs.append(("style", f"background:{COLOURS[code]};color:#fff"))
            expected.append([attrs, MASK_GLYPH if tok == M else f"w{tok}"])
        assert row["spans"] == expected


def test_labels_with_quotes_and_tokens_that_decode_to_nothing(tmp_path):
    label = """it's "<b>" & more"""
    trajectory = Trajectory(torch.tensor([[[M, M]], [[1, 2]]]), [label], M)
    decode = {1: "", 2: "x"}
    page = _Page(write_trace_html(trajectory, lambda ids: decode[ids[0]], tmp_path / "t.html",
                                  title="a 'title'").read_text())  # fmt: skip
    assert page.title == page.h2 == "a 'title'"
    full = f"{label} \u2014 2 revealed, 0 revised, 0 re-masked"
    assert (page.rows[1]["label"], page.rows[1]["lab"]) == (full, full)
    assert [text for _, text in page.rows[1]["spans"]] == ["\u2423", "x"]  # ␣ for ""


def _coords(element: ET.Element, *names: str) -> list[float]:
    return [float(element.get(name)) for name in names]


def test_the_chart_draws_each_count_inside_its_axes(tmp_path):
    """Counts go from the x axis (0) to the top of the y axis (the largest), steps evenly from
    the y axis to the x axis' end; everything within the SVG, the count label above the plot."""
    one_each = Trajectory(torch.tensor([[[M, M]], [[1, M]], [[1, 2]]]), ["a", "b"], M)
    one_steps = {"revealed": [1, 1], "revised": [0, 0], "re-masked": [0, 0]}  # largest count 1
    for trajectory, steps in ((_trajectory(), _STEPS), (one_each, one_steps)):
        svg = _svg(write_trace_html(trajectory, _decode, tmp_path / "t.html").read_text())
        width, height = _coords(svg, "width", "height")
        x_axis, y_axis = svg.findall("line")
        assert x_axis.get("stroke") == y_axis.get("stroke") == "#888"
        left, bottom, right, bottom2 = _coords(x_axis, "x1", "y1", "x2", "y2")
        assert (bottom2, *_coords(y_axis, "x1", "x2", "y2")) == (bottom, left, left, bottom)
        (top,) = _coords(y_axis, "y1")
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        highest, n_steps = max(max(v) for v in steps.values()), len(steps["revealed"])
        lines = svg.findall("polyline")
        assert [line.get("stroke") for line in lines] == list(COLOURS.values())
        for line, name in zip(lines, NAMES.values(), strict=True):
            counts = steps[name]
            points = [float(v) for p in line.get("points").split(" ") for v in p.split(",")]
            xs = [left + (right - left) * i / (n_steps - 1) for i in range(n_steps)]
            ys = [bottom - (bottom - top) * c / highest for c in counts]
            assert points == pytest.approx(
                [v for xy in zip(xs, ys, strict=True) for v in xy], abs=0.051
            )
        count_label, step_label = svg.findall("text")
        assert count_label.text == f"count (max {highest})"
        assert step_label.text == f"step (1..{n_steps})"
        x, y = _coords(count_label, "x", "y")
        assert 0 <= x and 0 < y < top
        x, y = _coords(step_label, "x", "y")
        assert x <= width and bottom < y <= height
        assert not (svg.text or "").strip() and all(not (e.tail or "").strip() for e in svg)


def test_a_trajectory_of_the_initial_state_alone_has_one_row_and_an_empty_chart(tmp_path):
    trajectory = Trajectory(torch.full((1, 2, 3), M), [], M)
    text = write_trace_html(trajectory, _decode, tmp_path / "t.html", sample=1).read_text()
    assert [row["id"] for row in _Page(text).rows] == ["step0"]
    assert [line.get("points") for line in _svg(text).findall("polyline")] == ["", "", ""]


@pytest.mark.parametrize("sample", [-1, 2])
def test_a_sample_outside_the_batch_is_refused_with_its_size(sample, tmp_path):
    trajectory = Trajectory(torch.full((2, 2, 3), M), ["a"], M)
    with pytest.raises(ValueError, match=f"sample={sample} but the trajectory has 2$"):
        write_trace_html(trajectory, _decode, tmp_path / "t.html", sample=sample)


def test_the_page_is_utf8_under_an_ascii_locale(tmp_path):
    """A POSIX locale (no UTF-8 mode) must not change the file: ░ and — are written as UTF-8."""
    code = (
        "import sys, torch\nfrom xdlm.sampling import Trajectory, write_trace_html\n"
        f"t = Trajectory(torch.tensor([[[{M}]], [[1]]]), ['a'], {M})\n"
        "write_trace_html(t, lambda ids: 'x', sys.argv[1])\n"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(tmp_path / "t.html")],
                   check=True, env=env, capture_output=True, timeout=120)  # fmt: skip
    text = (tmp_path / "t.html").read_bytes().decode("utf-8")
    assert MASK_GLYPH in text and "\u2014" in text


def _screenshot(html: Path, png: Path) -> np.ndarray:
    profile = tempfile.mkdtemp()
    try:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={png}",
             "--window-size=1200,900", html.resolve().as_uri()],
            check=True, capture_output=True, timeout=60, cwd=png.parent,
        )  # fmt: skip
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def _pixels(img: np.ndarray, hex_colour: str) -> int:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(-1) <= 8).sum())


@pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"needs a headless browser at {CHROMIUM} (apt-get install -y chromium)",
)
def test_screenshot_shows_the_three_transition_colours(tmp_path):
    img = _screenshot(write_trace_html(_trajectory(), _decode, tmp_path / "t.html"),
                      tmp_path / "t.png")  # fmt: skip
    still = Trajectory(torch.full((3, 1, 8), 1), ["a", "b"], M)
    base = _screenshot(write_trace_html(still, _decode, tmp_path / "s.html"), tmp_path / "s.png")
    assert img.shape[:2] == (900, 1200)
    assert img.std() > 10 and (img < 128).mean() > 0.001  # not a blank page
    for name, colour in COLOURS.items():
        assert _pixels(img[:300], colour) > 50, name  # legend swatch + chart line
        assert _pixels(img[300:], colour) > 100, name  # coloured token boxes in the steps
        assert _pixels(base[300:], colour) < 10, name
