"""Every rule of every detokeniser on a string that needs it (issue 29).

Each case is (rule list, index of the rule, input, output worked out by hand). The output is
checked against the whole list, and the list without that rule (every copy of it) must give
something else: a rule that no fixture string exercises, or a rule whose text is changed, fails
here. The end-to-end fixture strings of each benchmark: test_eval_protocols.py."""

from __future__ import annotations

import pytest

from xdlm.eval.detokenizers import (
    DETOKENIZERS,
    LM1B,
    PTB,
    WIKITEXT,
    apply_rules,
    lambada,
    scientific_papers,
)

W, P, L = "wikitext", "ptb", "lm1b"
RULES = {W: WIKITEXT, P: PTB, L: LM1B}
CASES = [
    (W, 0, "the boys ' toys", "the boys' toys"),
    (W, 1, "a /' 5/ b", "a /'[0-9]/ b"),  # the upstream quirk: the pattern text itself
    (W, 2, "1 @-@ 2", "1-2"),
    (W, 3, "1 @,@ 000", "1,000"),
    (W, 4, "3 @.@ 5", "3.5"),
    (W, 5, "a : b", "a: b"),
    (W, 6, "a ; b", "a; b"),
    (W, 7, "a . b", "a. b"),
    (W, 8, "a ! b", "a! b"),
    (W, 9, "a ? b", "a? b"),
    (W, 10, "a , b", "a, b"),
    (W, 11, "( a b )", "(a b)"),
    (W, 12, "[ a ]", "[a]"),
    (W, 13, "{ a }", "{a}"),
    (W, 14, '" a "', '"a"'),
    (W, 15, "' a '", "'a'"),
    (W, 16, "= = = = = x", "===== x"),  # without it: "==== = x"
    (W, 17, "= = = H = = =", "=== H ==="),
    (W, 18, "= = H = =", "== H =="),
    (W, 19, "5 \u00b0 C", "5\u00b0C"),
    (W, 20, "a \nb", "a\nb"),
    (W, 21, "a\n b", "a\nb"),
    (W, 22, "a N b", "a 1 b"),
    (W, 23, "it 's", "it's"),
    (P, 0, "the company 's", "the company's"),
    (P, 1, "the boys ' toys", "the boys' toys"),
    (P, 2, "does n't", "doesn't"),
    (P, 3, "a \n b", "a\nb"),
    (P, 4, "a\\/b", "a/b"),
    (P, 5, "fell N N N %", "fell 1 1 1 %"),  # one pass gives "fell 1 N 1 %" (no overlaps)
    (P, 15, "$ 1", "$1"),
    (P, 16, "# 1", "#1"),
    (P, 17, "<unk>", "?"),
    (L, 0, "see http : / / x.com", "see http://x.com"),
    (L, 1, "see https : / / x.com", "see https://x.com"),
    (L, 2, "John 's", "John's"),
    (L, 3, "a b . c", "a b. c"),
    (L, 4, "a b .", "a b."),
    (L, 5, "a ? b", "a? b"),
    (L, 6, "a ?", "a?"),
    (L, 7, "a ! b", "a! b"),
    (L, 8, "a !", "a!"),
    (L, 9, "a , b", "a, b"),
    (L, 10, "a : b", "a: b"),
    (L, 11, "a ; b", "a; b"),
    (L, 12, "a / b", "a/b"),
    (L, 13, 'say " hi there " now', 'say "hi there" now'),
    (L, 14, "say ' hi ' now", "say 'hi' now"),
    (L, 15, "a ( b ) c", "a (b) c"),
    (L, 16, "a [ b ] c", "a [b] c"),
    (L, 17, "$ 5", "$5"),
    (L, 18, "\u00a3 5", "\u00a35"),
]


@pytest.mark.parametrize(("name", "index", "text", "want"), CASES)
def test_each_rule_on_a_string_that_needs_it(name, index, text, want):
    rules = RULES[name]
    assert DETOKENIZERS[name](text) == want
    assert apply_rules(text, [r for r in rules if r != rules[index]]) != want


def test_every_rule_has_a_case():
    covered = {(name, RULES[name][index]) for name, index, _, _ in CASES}
    assert covered == {(name, rule) for name, rules in RULES.items() for rule in rules}


def test_rules_apply_in_order_and_an_unknown_kind_is_refused():
    assert apply_rules("ab", [("lit", "a", "b"), ("re", "b+", "c")]) == "c"
    assert apply_rules("ab", [("re", "b+", "c"), ("lit", "a", "b")]) == "bc"
    with pytest.raises(ValueError, match=r"kind must be 'lit' or 're'"):
        apply_rules("ab", [("regex", "a", "b")])


def test_lambada_straightens_curly_quotes_and_strips():
    assert lambada("\u201cHi,\u201d he said \u201cok\u201d") == '\n"Hi," he said "ok"'
    assert lambada(" \n\t text \n") == "\ntext"
    assert lambada("") == "\n"


def test_scientific_papers_is_wikitext_then_lm1b():
    # WikiText's " @-@ " first, then LM1B's " / " and "$ " (neither list alone gives this)
    text = "1 @-@ 2 / 3 costs $ 4"
    assert scientific_papers(text) == "1-2/3 costs $4"
    assert DETOKENIZERS["scientific_papers"] is scientific_papers
