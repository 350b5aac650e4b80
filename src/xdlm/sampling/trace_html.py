"""A self-contained HTML view of one sample's trajectory (no external resources).

Top: a legend and an inline SVG chart of the per-step counts of the three XDLM transitions.
Below: every state as a row of tokens, the tokens that changed in that step coloured by their
transition (revealed / revised / re-masked); a slider highlights and scrolls to a step.

    write_trace_html(out.trajectory, tokenizer.decode, "trace.html", sample=0)
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path

from xdlm.sampling.trajectory import REMASKED, REVEALED, REVISED, Trajectory

COLOURS = {REVEALED: "#2ca02c", REVISED: "#1f77b4", REMASKED: "#d62728"}
NAMES = {REVEALED: "revealed", REVISED: "revised", REMASKED: "re-masked"}
MASK_GLYPH = "\u2591" * 2  # ░░ for [MASK]

_CSS = """
body { font-family: sans-serif; margin: 16px; color: #222; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 8px; color: #fff; }
.row { margin: 2px 0; padding: 3px; border-left: 4px solid transparent; }
.row.sel { border-left-color: #444; background: #f4f4f4; }
.lab { font-size: 12px; color: #555; }
.tok { display: inline-block; white-space: pre; font-family: monospace; font-size: 14px;
       padding: 1px 2px; margin: 1px; border-radius: 3px; background: #eee; }
.tok.m { color: #999; }
"""
_JS = """
const s = document.getElementById('slider');
function show(v) {
  document.querySelectorAll('.row').forEach(r => r.classList.remove('sel'));
  const r = document.getElementById('step' + v); r.classList.add('sel');
  document.getElementById('cur').textContent = r.dataset.label;
}
s.addEventListener('input', () => { show(s.value);
  document.getElementById('step' + s.value).scrollIntoView({block: 'nearest'}); });
show(s.value);
"""


def write_trace_html(
    trajectory: Trajectory,
    tokenizer_decode: Callable[[list[int]], str],
    path: str | Path,
    sample: int = 0,
    title: str = "XDLM sampling trace",
) -> Path:
    """Write the trace of batch element `sample` to `path`; returns the path.

    `tokenizer_decode(ids) -> str` renders each token on its own (e.g. `TextTokenizer.decode`).
    """
    if not 0 <= sample < trajectory.states.shape[1]:
        raise ValueError(f"sample={sample} but the trajectory has {trajectory.states.shape[1]}")
    states = trajectory.states[:, sample].tolist()  # (S + 1) lists of L ids
    codes = trajectory.transitions()[:, sample].tolist()  # S lists of L codes
    counts = trajectory.counts()
    per_step = {c: getattr(counts, n)[:, sample].tolist() for c, n in _FIELDS.items()}
    rows = [
        _row(0, "initial state z_1", states[0], [0] * len(states[0]), trajectory, tokenizer_decode)
    ]
    for i, label in enumerate(trajectory.labels):
        tally = ", ".join(f"{per_step[c][i]} {NAMES[c]}" for c in NAMES)
        name = f"{label} \u2014 {tally}"
        rows.append(_row(i + 1, name, states[i + 1], codes[i], trajectory, tokenizer_decode))
    legend = "".join(f'<span style="background:{COLOURS[c]}">{NAMES[c]}</span>' for c in NAMES)
    body = (
        f"<h2>{html.escape(title)}</h2><div class='legend'>{legend}</div>"
        f"{_chart(per_step)}"
        f"<p><input type='range' id='slider' min='0' max='{len(rows) - 1}' value='0' "
        f"style='width:600px'> <span id='cur'></span></p>" + "".join(rows)
    )
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}<script>{_JS}</script></body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


_FIELDS = {REVEALED: "revealed", REVISED: "revised", REMASKED: "remasked"}


def _row(
    index: int,
    label: str,
    ids: Sequence[int],
    codes: Sequence[int],
    trajectory: Trajectory,
    decode: Callable[[list[int]], str],
) -> str:
    spans = []
    for tok, code in zip(ids, codes, strict=True):
        is_mask = tok == trajectory.mask_id
        text = MASK_GLYPH if is_mask else decode([tok]) or "\u2423"
        style = f" style='background:{COLOURS[code]};color:#fff'" if code in COLOURS else ""
        cls = "tok m" if is_mask else "tok"
        spans.append(f"<span class='{cls}'{style}>{html.escape(text)}</span>")
    esc = html.escape(label, quote=True)
    return (
        f"<div class='row' id='step{index}' data-label='{esc}'>"
        f"<div class='lab'>{esc}</div>{''.join(spans)}</div>"
    )


def _chart(per_step: dict[int, list[int]], width: int = 600, height: int = 160) -> str:
    """Inline SVG: one polyline per transition, x = step, y = count."""
    n = max(len(v) for v in per_step.values())
    top = max(1, *(max(v, default=0) for v in per_step.values()))
    pad = 30

    def xy(i: int, c: int) -> str:
        x = pad + (width - 2 * pad) * (i / max(n - 1, 1))
        return f"{x:.1f},{height - pad - (height - 2 * pad) * c / top:.1f}"

    lines = [
        f"<polyline fill='none' stroke='{COLOURS[c]}' stroke-width='2' "
        f"points='{' '.join(xy(i, v) for i, v in enumerate(vals))}'/>"
        for c, vals in per_step.items()
    ]
    axes = (
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' "
        "stroke='#888'/>"
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{height - pad}' stroke='#888'/>"
        f"<text x='{pad}' y='{pad - 8}' font-size='11'>count (max {top})</text>"
        f"<text x='{width - pad}' y='{height - 8}' font-size='11' text-anchor='end'>"
        f"step (1..{n})</text>"
    )
    return f"<svg width='{width}' height='{height}' role='img'>{axes}{''.join(lines)}</svg>"
