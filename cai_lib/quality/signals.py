"""Quality signals for SL-CAI training data: refusals, boilerplate, revisions, lengths.

Plain, deterministic functions (no Spark, no model) that the Great Expectations gates call
on collected columns of responses and revisions:

- is_refusal / refusal_reason / refusal_rates: does a response refuse or evade instead of
  engaging? Our own phrase list, looked for in the first two sentences only.
- split_sentences / boilerplate_report / boilerplate_rate / boilerplate_rows: the same
  sentence or long word n-gram recurring across many *different* responses (a Goodhart
  symptom: the model learned a phrase the critic likes, e.g. "You are valid and valued.").
- revision_change / revision_rates: revisions that came back empty or unchanged.
- word_count: for length bounds.

    python -m pytest -q tests/test_quality.py cai_lib/quality/signals.py
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

import pandas as pd

__all__ = ["is_refusal", "refusal_reason", "refusal_rates", "split_sentences",
           "boilerplate_report", "boilerplate_rate", "boilerplate_rows",
           "revision_change", "revision_rates", "word_count"]

# Curly quotes and the modifier apostrophe become straight ones, so "I’m" == "I'm".
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "`": "'",
                         "\u201c": '"', "\u201d": '"'})
_END_PUNCT = string.punctuation + string.whitespace + "\u2026\u2013\u2014"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def _text(x, name: str) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{name} must be a str, got {type(x).__name__}: {x!r}")
    return x


def _norm(text: str) -> str:
    """Lowercase, straight quotes, single spaces."""
    return " ".join(text.translate(_QUOTES).lower().split())


# ---------------------------------------------------------------- refusals

# Why only the first two sentences: a response that refuses says so up front ("I'm sorry,
# but I can't ..."); an engaged answer may decline one detail late on ("... I won't list real
# leaked passwords, but ...") and still be an answer. A refusal opening followed by help
# ("I can't give medical advice, but rest and fluids help") counts as a refusal, on purpose:
# the opening is what the revision step is meant to remove.
REFUSAL_HEAD_SENTENCES = 2

# Contractions are expanded first, so each pattern is written once ("can't" -> "cannot").
_CONTRACTIONS = [(re.compile(p), r) for p, r in [
    (r"\bcan't\b", "cannot"), (r"\bcan not\b", "cannot"), (r"\bwon't\b", "will not"),
    (r"n't\b", " not"), (r"\bi'm\b", "i am"), (r"\bi'd\b", "i would"), (r"\bi'll\b", "i will"),
    (r"\bit's\b", "it is"), (r"\bthat's\b", "that is"), (r"\bthis's\b", "this is")]]

# "I <unwilling> [up to 3 words] <act>": "i cannot help", "i will not provide",
# "i cannot and will not generate". "would not" is left out on purpose: "I would not give
# chocolate to a dog" is advice, not a refusal.
_UNWILLING = ("(?:cannot|will not|am not able to|am unable to|am not going to|am not willing to"
              "|am not in a position to|am not comfortable|do not feel comfortable"
              "|would rather not|refuse to)")
_ACT = ("(?:help|assist|provide|give|share|comply|fulfil|fulfill|support|create|write|generate"
        "|engage|produce|offer|answer|participate|discuss|describe|continue|go into"
        "|do that|do this)")
REFUSAL_PATTERNS = [re.compile(p) for p in [
    # "but"/"up" exclude "I can't help but smile" and "I won't give up on you".
    rf"\bi {_UNWILLING}(?: [^\s.!?]+){{0,3}}? {_ACT}\b(?! but\b| up\b)",
    rf"\bi do not think i (?:can|should)(?: [^\s.!?]+){{0,2}}? {_ACT}\b(?! but\b| up\b)",
    r"\bi (?:must|have to|will have to|need to) (?:respectfully |politely )?(?:decline|refuse)\b",
    r"\b(?:that|this|it) is not something i (?:can|will|am able to|am willing to)\b",
    # "for me" keeps etiquette answers out: "It is not appropriate to wear white to a wedding."
    r"\b(?:not|never) appropriate for me to\b|\binappropriate for me to\b",
    r"\bas an ai(?: language model| model| assistant)?,? i (?:cannot|am not|am unable|do not|will not)\b",
    r"\bi am (?:just|only) an ai\b",
]]


def refusal_reason(text: str) -> str | None:
    """The refusal phrase found in the first two sentences (normalised), or None.

    >>> refusal_reason("I’m sorry, but I can’t provide that. Is there anything else?")
    'i cannot provide'
    >>> refusal_reason("Sure! Here is a recipe.") is None
    True
    """
    head = ". ".join(split_sentences(_text(text, "text"))[:REFUSAL_HEAD_SENTENCES])
    for pattern, repl in _CONTRACTIONS:
        head = pattern.sub(repl, head)
    for pattern in REFUSAL_PATTERNS:
        m = pattern.search(head)
        if m:
            return m.group(0)
    return None


def is_refusal(text: str) -> bool:
    """Whether a response refuses or evades instead of engaging (see REFUSAL_PATTERNS).

    >>> is_refusal("I can't help with that.")
    True
    >>> is_refusal("I’m sorry, but I cannot write malware.")
    True
    >>> is_refusal("As an AI, I am not able to share personal opinions.")
    True
    >>> is_refusal("Thanks for asking. I must decline this request.")
    True
    >>> is_refusal("It is not appropriate for me to insult your coworker.")
    True
    >>> is_refusal("You can't go wrong with a slow cooker: brown the meat first.")
    False
    >>> is_refusal("If you can't sleep, try a fixed bedtime and no screens after ten.")
    False
    >>> is_refusal("Use a passphrase. Turn on 2FA. Check for breaches. "
    ...            "I won't provide real leaked passwords, but that site lists them.")
    False
    >>> is_refusal("   ")
    False
    """
    return refusal_reason(text) is not None


def refusal_rates(df: pd.DataFrame, text_col: str = "text", group_col: str = "category") -> pd.DataFrame:
    """Refusals per group: columns [group_col, n, refusals, refusal_rate], sorted by group.

    A null text counts in n and is not a refusal (empty responses have their own check).

    >>> df = pd.DataFrame({"category": ["red", "red", "helpful"],
    ...                    "text": ["I won't provide that.", "Here you go: ...", "Sure."]})
    >>> refusal_rates(df).to_dict("records")  # doctest: +NORMALIZE_WHITESPACE
    [{'category': 'helpful', 'n': 1, 'refusals': 0, 'refusal_rate': 0.0},
     {'category': 'red', 'n': 2, 'refusals': 1, 'refusal_rate': 0.5}]
    """
    missing = [c for c in (text_col, group_col) if c not in df.columns]
    if missing:
        raise ValueError(f"refusal_rates: column(s) {missing} not in the frame "
                         f"(columns: {list(df.columns)}); pass text_col=/group_col=")
    refused = df[text_col].map(lambda t: False if t is None or t is pd.NA or t != t
                               else is_refusal(_text(t, text_col)))
    out = (pd.DataFrame({group_col: df[group_col], "refused": refused.astype(bool)})
           .groupby(group_col, dropna=False, sort=True)["refused"]
           .agg(n="size", refusals="sum").reset_index())
    out["n"] = out["n"].astype("int64")
    out["refusals"] = out["refusals"].astype("int64")
    out["refusal_rate"] = out["refusals"] / out["n"]
    return out


# ---------------------------------------------------------------- boilerplate

# Defaults, and why. Items are whole sentences of >= 5 words and word 8-grams: courtesy
# phrases ("I'm sorry.", "Great question!", "I hope this helps.") are shorter than 5 words,
# and common collocations ("if you have any questions") are shorter than 8, so varied
# answers share almost nothing; 8 identical words in a row across responses on different
# prompts is a template. An item counts once per response; it must recur (>= 2 responses).
MIN_WORDS = 5
NGRAM = 8
# A gate quarantines rows holding an item shared by more than 20% of responses: far above
# chance for varied text (a varied set of 30 scores 0.0), well below a planted phrase (~0.5).
BOILERPLATE_THRESHOLD = 0.2


def split_sentences(text: str) -> list[str]:
    """Sentences, normalised: lowercase, straight quotes, single spaces, no end punctuation.

    >>> split_sentences("Hello there!  You are   VALID, friend.\\n\\n“Ok”")
    ['hello there', 'you are valid, friend', 'ok']
    >>> split_sentences("  ")
    []
    """
    parts = (_norm(s).strip(_END_PUNCT) for s in _SENTENCE_END.split(_text(text, "text")))
    return [p for p in parts if p]


def _words(text: str) -> list[str]:
    return _WORD.findall(_norm(text))


def _items(text: str, min_words: int, ngram: int) -> set[tuple[str, str]]:
    """The (kind, text) items of one response: long sentences and word n-grams."""
    items = {("sentence", s) for s in split_sentences(text) if len(_words(s)) >= min_words}
    w = _words(text)
    items |= {("ngram", " ".join(w[i:i + ngram])) for i in range(len(w) - ngram + 1)}
    return items


def _counts(texts: Sequence[str], min_words: int, ngram: int) -> tuple[list[set], Counter]:
    for name, v in (("min_words", min_words), ("ngram", ngram)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    per_row = [_items(_text(t, f"texts[{i}]"), min_words, ngram) for i, t in enumerate(texts)]
    return per_row, Counter(item for items in per_row for item in items)


def boilerplate_report(texts: Sequence[str], min_words: int = MIN_WORDS, ngram: int = NGRAM) -> pd.DataFrame:
    """Recurring sentences and n-grams: columns kind, text, responses, share (of all texts).

    Sorted by share desc (sentences before n-grams on ties). An n-gram inside a reported
    sentence with the same count is left out: it says nothing the sentence does not.

    >>> texts = ["Boil the pasta. You are valid, valued and cared for.",
    ...          "Water the fern weekly. You are valid, valued and cared for!", "Sure."]
    >>> boilerplate_report(texts, ngram=6).to_dict("records")  # doctest: +NORMALIZE_WHITESPACE
    [{'kind': 'sentence', 'text': 'you are valid, valued and cared for', 'responses': 2,
      'share': 0.6666666666666666}]
    """
    _, counts = _counts(texts, min_words, ngram)
    rows = [(kind, text, c) for (kind, text), c in counts.items() if c >= 2]
    sentences = {(" ".join(_words(t)), c) for kind, t, c in rows if kind == "sentence"}
    rows = [(kind, t, c) for kind, t, c in rows if kind == "sentence"
            or not any(c == sc and f" {t} " in f" {s} " for s, sc in sentences)]
    rows.sort(key=lambda r: (-r[2], r[0] != "sentence", r[1]))
    out = pd.DataFrame(rows, columns=["kind", "text", "responses"]).astype({"responses": "int64"})
    out["share"] = out["responses"] / len(texts) if len(texts) else 0.0
    return out


def boilerplate_rate(texts: Sequence[str], min_words: int = MIN_WORDS,
                     ngram: int = NGRAM) -> tuple[float, str | None]:
    """The largest share of responses holding one recurring item, and that item.

    (0.0, None) when nothing recurs.

    >>> boilerplate_rate(["One two three four five six.", "One two three four five six!",
    ...                   "Something else entirely here.", "Short."], ngram=6)
    (0.5, 'one two three four five six')
    >>> boilerplate_rate(["I'm sorry. Try a warm bath.", "I'm sorry. Call a friend tonight."])
    (0.0, None)
    """
    report = boilerplate_report(texts, min_words, ngram)
    if report.empty:
        return 0.0, None
    return float(report["share"].iloc[0]), str(report["text"].iloc[0])


def boilerplate_rows(texts: Sequence[str], threshold: float = BOILERPLATE_THRESHOLD,
                     min_words: int = MIN_WORDS, ngram: int = NGRAM) -> list[bool]:
    """Per response: does it hold an item shared by more than `threshold` of all responses?

    >>> boilerplate_rows(["A b c d e f.", "A b c d e f.", "Other words here now ok."],
    ...                  threshold=0.5, ngram=6)
    [True, True, False]
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a share in [0, 1), got {threshold!r}")
    per_row, counts = _counts(texts, min_words, ngram)
    common = {item for item, c in counts.items() if c >= 2 and c / len(texts) > threshold}
    return [bool(items & common) for items in per_row]


# ---------------------------------------------------------------- revisions and lengths

def revision_change(original: str, revised: str | None) -> str:
    """'empty' (revised blank or None), 'unchanged' (same after case/space/quote
    normalisation) or 'changed'.

    >>> revision_change("Sure, here it is.", "  ")
    'empty'
    >>> revision_change("Sure,  here it is.", "sure, here it is.\\n")
    'unchanged'
    >>> revision_change("Here is how to pick a lock.", "I'd suggest calling a locksmith.")
    'changed'
    """
    if revised is None or not _text(revised, "revised").strip():
        return "empty"
    return "unchanged" if _norm(_text(original, "original")) == _norm(revised) else "changed"


def revision_rates(pairs: Iterable[tuple[str, str | None]]) -> dict:
    """Shares of empty and unchanged revisions over (original, revised) pairs.

    >>> revision_rates([("a", ""), ("a", "A"), ("a", "b"), ("a", "c")])
    {'n': 4, 'empty_rate': 0.25, 'unchanged_rate': 0.25}
    """
    kinds = Counter(revision_change(o, r) for o, r in pairs)
    n = sum(kinds.values())
    if n == 0:
        raise ValueError("pairs is empty; pass at least one (original, revised) pair")
    return {"n": n, "empty_rate": kinds["empty"] / n, "unchanged_rate": kinds["unchanged"] / n}


def word_count(text: str) -> int:
    """Whitespace-separated words.

    >>> word_count("  Hello,  world!\\n It's me. "), word_count("")
    (4, 0)
    """
    return len(_text(text, "text").split())
