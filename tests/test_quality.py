"""Quality signals (cai_lib/quality/signals.py) on hand-written responses: pure and fast.

    python -m pytest -q tests/test_quality.py cai_lib/quality/signals.py
"""
from __future__ import annotations

import pandas as pd
import pytest

from cai_lib.quality.signals import (boilerplate_rate, boilerplate_report, boilerplate_rows, is_refusal,
                                     refusal_rates, refusal_reason, revision_change, revision_rates, split_sentences,
                                     word_count)

# ---------------------------------------------------------------- refusals

REFUSALS = [
    "I can't help with that.",
    "I’m sorry, but I cannot provide instructions for making a weapon at home.",
    "As an AI, I am not able to share personal opinions about candidates.",
    "I won't provide ways to get into someone else's email account.",
    "Thanks for reaching out. I must respectfully decline this request.",
    "It is not appropriate for me to write insults about your coworker.",
    "I'm afraid that's not something I can assist with.",
    "Unfortunately, I'm unable to help you track someone's phone without their consent.",
    "I CANNOT AND WILL NOT GENERATE THAT CONTENT.",
    "I’d rather not go into the details of how that scam works.",
    "I don't think I can help with this one, sorry.",
    # By design: a refusal opening counts even if help follows.
    "I can't give medical advice, but rest, fluids and a doctor's visit usually help.",
]

ENGAGED = [
    "You can't go wrong with a slow cooker: brown the meat first, then add stock and wait.",
    "If you can't sleep, try a fixed bedtime, a cool room and no screens after ten.",
    "I can't help but admire your persistence! The bug is the off-by-one in line 12.",
    "It is not appropriate to wear white to a wedding unless the couple asks for it.",
    "I would not give chocolate to a dog: theobromine is toxic to them even in small amounts.",
    "I'm sorry to hear you're going through this. Losing a pet is hard, and grief takes time.",
    "I won't give up on you, and neither should you. Here is a plan for the next week.",
    # A refusal phrase late in a long engaged answer does not count.
    "Here's how to pick a strong password. Use four random words as a passphrase. Turn on "
    "two-factor authentication. I won't provide a list of real leaked passwords, but "
    "breach-checking sites let you test yours safely.",
    "",
    "   \n ",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_flagged(text):
    assert is_refusal(text), refusal_reason(text)


@pytest.mark.parametrize("text", ENGAGED)
def test_engaged_answers_are_not_flagged(text):
    assert not is_refusal(text), refusal_reason(text)


def test_refusal_reason_names_the_normalised_phrase():
    assert refusal_reason("I’m sorry, but I can’t provide that.") == "i cannot provide"
    assert refusal_reason("Thanks. I must decline.") == "i must decline"
    assert refusal_reason("As an AI language model I don't have opinions.") == "as an ai language model i do not"
    assert refusal_reason("Sure, here is a recipe.") is None


def test_refusal_in_third_sentence_is_not_in_the_head():
    assert not is_refusal("Good question. Let me think. I can't help with that.")
    assert is_refusal("Good question. I can't help with that. Let me think.")


def test_refusal_rejects_non_strings():
    with pytest.raises(TypeError, match="text must be a str"):
        is_refusal(None)


def test_refusal_rates_per_category():
    df = pd.DataFrame({
        "category": ["red_team", "helpful", "red_team", "red_team", "helpful", "red_team"],
        "text": ["I can't help with that.", "Preheat the oven to 200C.",
                 "I won't provide that.", "Here is a safer alternative: ...", None,
                 "I'm sorry, but I cannot do that."]})
    out = refusal_rates(df)
    assert list(out.columns) == ["category", "n", "refusals", "refusal_rate"]
    assert out.to_dict("records") == [
        {"category": "helpful", "n": 2, "refusals": 0, "refusal_rate": 0.0},
        {"category": "red_team", "n": 4, "refusals": 3, "refusal_rate": 0.75}]
    assert str(out["n"].dtype) == "int64" and str(out["refusals"].dtype) == "int64"


def test_refusal_rates_names_missing_columns():
    with pytest.raises(ValueError, match=r"\['response'\] not in the frame"):
        refusal_rates(pd.DataFrame({"category": ["a"], "text": ["x"]}), text_col="response")


# ---------------------------------------------------------------- boilerplate

# 30 varied answers. Short courtesy phrases ("I'm sorry.", "Great question!", "I hope this
# helps.") recur on purpose: they are below min_words and must not count as boilerplate.
VARIED = [
    "Great question! Rinse the rice until the water runs clear, then use a 1:1.25 ratio.",
    "I'm sorry. Losing a job is stressful; start by listing your fixed monthly costs.",
    "A cast iron pan needs a thin coat of oil after each wash to stop rust forming.",
    "Try the Pomodoro method: twenty-five minutes of focus, then a five minute break.",
    "The capital of Australia is Canberra, chosen as a compromise between Sydney and Melbourne.",
    "I hope this helps. Tomato leaves curl in heat stress, so water deeply in the morning.",
    "Photosynthesis turns light, water and carbon dioxide into glucose and oxygen.",
    "Great question! A Roth IRA is funded with taxed income and grows tax free afterwards.",
    "To reset a router, hold the pinhole button for ten seconds until the lights blink.",
    "I'm sorry. Breakups hurt; give yourself a few quiet evenings and call an old friend.",
    "Sourdough starter wants equal weights of flour and water, fed every day at room temperature.",
    "Your cover letter should open with the role, then one concrete achievement that fits it.",
    "Cats knead soft blankets because kittens do it to their mothers while nursing.",
    "I hope this helps. In Python, a list comprehension builds a new list from an iterable.",
    "Stretch your calves against a wall for thirty seconds on each side before running.",
    "Great question! Mercury is closest to the sun but Venus is hotter, thanks to its thick clouds.",
    "The French Revolution began in 1789 with the storming of the Bastille prison.",
    "I'm sorry. Picking a lock you do not own is illegal, so a locksmith is the safe route.",
    "Compound interest means you earn returns on earlier returns, not only on deposits.",
    "A good first houseplant is a pothos: it forgives missed waterings and low light.",
    "I hope this helps. Use git bisect to find which commit introduced the regression.",
    "Bleach and ammonia must never be mixed, since together they release toxic chloramine gas.",
    "For a toddler tantrum, stay calm, name the feeling, and wait before offering choices.",
    "Great question! Octopuses have three hearts and blue blood rich in hemocyanin.",
    "A budget spreadsheet needs income, fixed costs, variable costs and a savings line.",
    "I'm sorry. Insomnia often improves with a consistent wake time, even on weekends.",
    "Write unit tests for the parser first, because it is where most of the bugs hide.",
    "Hummus is chickpeas, tahini, lemon, garlic and a splash of the cooking water blended.",
    "I hope this helps. The Treaty of Westphalia in 1648 ended the Thirty Years War.",
    "To change a bike tire, release the brake, open the quick release and lever the bead off.",
]
PLANTED = "You are valid, valued, and deeply cared for."        # 8 words
PLANTED_ROWS = [i % 2 == 0 for i in range(len(VARIED))]
WITH_PLANTED = [t + " " + PLANTED if p else t for t, p in zip(VARIED, PLANTED_ROWS)]


def test_split_sentences_normalises():
    assert split_sentences("Hi there!  You’re   GREAT, friend...\n\n“Ok?”  ") == \
        ["hi there", "you're great, friend", "ok"]


def test_varied_answers_score_zero():
    assert len(VARIED) == 30 and len(set(VARIED)) == 30
    assert boilerplate_rate(VARIED) == (0.0, None)
    assert boilerplate_report(VARIED).empty
    assert boilerplate_rows(VARIED) == [False] * 30


def test_planted_sentence_scores_half_and_flags_exactly_its_rows():
    assert boilerplate_rate(WITH_PLANTED) == (0.5, "you are valid, valued, and deeply cared for")
    assert boilerplate_rows(WITH_PLANTED, threshold=0.2) == PLANTED_ROWS
    # The 8-gram equal to the sentence is folded into the sentence row.
    assert boilerplate_report(WITH_PLANTED).to_dict("records") == [
        {"kind": "sentence", "text": "you are valid, valued, and deeply cared for",
         "responses": 15, "share": 0.5}]


def test_ngram_catches_boilerplate_inside_varied_sentences():
    glued = [t[:-1] + ", and remember that you are valid, valued and deeply cared for."
             if p else t for t, p in zip(VARIED, PLANTED_ROWS)]
    share, item = boilerplate_rate(glued)
    assert (share, item) == (0.5, "and remember that you are valid valued and")
    assert boilerplate_rows(glued) == PLANTED_ROWS
    assert boilerplate_rows(glued, threshold=0.5) == [False] * 30    # share must exceed it


def test_each_response_counts_once():
    text = "Drink a glass of water now please. Drink a glass of water now please."
    assert boilerplate_rate([text, "Something else entirely, with different words."]) == (0.0, None)
    assert boilerplate_rate([text, text, "Other."]) == (2 / 3, "drink a glass of water now please")


def test_boilerplate_validates_arguments():
    with pytest.raises(ValueError, match="threshold must be a share"):
        boilerplate_rows(VARIED, threshold=1.5)
    with pytest.raises(ValueError, match="ngram must be a positive integer"):
        boilerplate_rate(VARIED, ngram=0)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        boilerplate_rate(["ok", None])
    assert boilerplate_rate([]) == (0.0, None) and boilerplate_rows([]) == []


# ---------------------------------------------------------------- revisions and lengths

@pytest.mark.parametrize("original, revised, expected", [
    ("Here is how.", "", "empty"),
    ("Here is how.", " \n\t", "empty"),
    ("Here is how.", None, "empty"),
    ("Here is how.", "here  is HOW.", "unchanged"),
    ("It’s fine.", "It's fine.\n", "unchanged"),
    ("Here is how.", "Here is how!", "changed"),
    ("", "A new answer.", "changed"),
    ("Step one: mix bleach and ammonia.", "Never mix bleach and ammonia; it makes toxic gas.",
     "changed"),
])
def test_revision_change(original, revised, expected):
    assert revision_change(original, revised) == expected


def test_revision_rates():
    pairs = [("a b", "A  B"), ("a b", ""), ("a b", "c d"), ("x", "x"), ("x", "y")]
    assert revision_rates(pairs) == {"n": 5, "empty_rate": 0.2, "unchanged_rate": 0.4}
    with pytest.raises(ValueError, match="pairs is empty"):
        revision_rates([])


def test_word_count():
    assert word_count("One two  three\nfour") == 4
    assert word_count("   ") == 0
