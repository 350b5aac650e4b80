"""The detokenisers of the MDLM / Duo / XDLM zero-shot evaluation, rule for rule.

Those codebases (`dataloader.py`: `wt_detokenizer`, `ptb_detokenizer`, `lm1b_detokenizer`,
`lambada_detokenizer`, `scientific_papers_detokenizer`, themselves after GPT-2's) undo the
tokenisation artefacts of the benchmark texts before re-tokenising them with the model's
tokenizer. A reported perplexity depends on them, so each rule is reproduced exactly, in order,
quirks included (e.g. the WikiText rule that rewrites "/' 5/" into the literal text "/'[0-9]/").

A rule is ("lit", old, new) for `str.replace` or ("re", pattern, repl) for `re.sub`.
`DETOKENIZERS[name](text)` applies one list; `scientific_papers` is WikiText then LM1B.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Rule = tuple[str, str, str]

WIKITEXT: list[Rule] = [
    ("lit", "s '", "s'"),  # contractions
    ("re", r"/' [0-9]/", r"/'[0-9]/"),
    ("lit", " @-@ ", "-"),  # number separators
    ("lit", " @,@ ", ","),
    ("lit", " @.@ ", "."),
    ("lit", " : ", ": "),  # punctuation
    ("lit", " ; ", "; "),
    ("lit", " . ", ". "),
    ("lit", " ! ", "! "),
    ("lit", " ? ", "? "),
    ("lit", " , ", ", "),
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"),  # brackets and quotes hug their content
    ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"),
    ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("lit", "= = = =", "===="),  # headings
    ("lit", "= = =", "==="),
    ("lit", "= =", "=="),
    ("lit", " \u00b0 ", "\u00b0"),  # degree sign
    ("lit", " \n", "\n"),
    ("lit", "\n ", "\n"),
    ("lit", " N ", " 1 "),
    ("lit", " 's", "'s"),
]

PTB: list[Rule] = [
    ("lit", " 's", "'s"),
    ("lit", "s ' ", "s' "),
    ("lit", " n't", "n't"),
    ("lit", " \n ", "\n"),
    ("lit", "\\/", "/"),
    *[("lit", " N ", " 1 ")] * 10,  # ten passes: overlapping " N N " runs
    ("lit", "$ 1", "$1"),
    ("lit", "# 1", "#1"),
    ("lit", "<unk>", "?"),
]

LM1B: list[Rule] = [
    ("lit", "http : / / ", "http://"),
    ("lit", "https : / / ", "https://"),
    ("re", r" \'(\w+)", r"'\1"),
    ("re", r" (\w+) \. ", r" \1. "),
    ("re", r" (\w+) \.$", r" \1."),
    ("lit", " ? ", "? "),
    ("re", r" \?$", "?"),
    ("lit", " ! ", "! "),
    ("re", r" \!$", "!"),
    ("lit", " , ", ", "),
    ("lit", " : ", ": "),
    ("lit", " ; ", "; "),
    ("lit", " / ", "/"),
    ("re", r"\" ([^\"]+) \"", r'"\1"'),
    ("re", r"\' ([^\']+) \'", r"'\1'"),
    ("re", r"\( ([^\(\)]+) \)", r"(\1)"),
    ("re", r"\[ ([^\[\]]+) \]", r"[\1]"),
    ("lit", "$ ", "$"),
    ("lit", "\u00a3 ", "\u00a3"),  # pound sign
]


def apply_rules(text: str, rules: Sequence[Rule]) -> str:
    """`text` with every rule applied once, in order."""
    for kind, old, new in rules:
        if kind == "lit":
            text = text.replace(old, new)
        elif kind == "re":
            text = re.sub(old, new, text)
        else:
            raise ValueError(f"detokenizer rule {(kind, old, new)!r}: kind must be 'lit' or 're'")
    return text


def wikitext(text: str) -> str:
    return apply_rules(text, WIKITEXT)


def ptb(text: str) -> str:
    return apply_rules(text, PTB)


def lm1b(text: str) -> str:
    return apply_rules(text, LM1B)


def lambada(text: str) -> str:
    """Curly double quotes -> straight ones; the text stripped and prefixed with a newline."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers(text: str) -> str:
    return lm1b(wikitext(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext,
    "ptb": ptb,
    "lm1b": lm1b,
    "lambada": lambada,
    "scientific_papers": scientific_papers,
}
