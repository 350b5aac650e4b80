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
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xdlm.sampling import Trajectory, write_trace_html
from xdlm.sampling.trace_html import COLOURS

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
