"""The VQA answer normalisation and the 10-annotator soft accuracy (VQAv2, TextVQA, VizWiz).

Written here from the rules of MoE-LLaVA's ``moellava/eval/m4c_evaluator.py``
(``EvalAIAnswerProcessor``, lines 7-218, itself from mmf's EvalAI processor; and
``TextVQAAccuracyEvaluator``, lines 221-257), which its TextVQA scorer and its VQAv2 / VizWiz
submission converters use. ``normalize`` applies, in order:

1. lowercase; delete every "," and "?"; "'s" becomes " 's"; strip;
2. newlines and tabs become spaces; strip;
3. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted when
   it stands next to a space anywhere in the text (checked on the text as it was before
   this step), or when the text holds a comma between two digits; otherwise it becomes a
   space. Then every "." not followed by a digit is deleted, at most 32 of them (the
   evaluator passes ``re.UNICODE``, which is 32, as ``re.sub``'s count);
4. per word: "none"/"zero".."ten" become digits, the articles a/an/the are dropped, and the
   lowercase apostrophe-less contractions ("dont" -> "don't" ...) are repaired (the
   evaluator's capitalised keys "Im", "Ive", "Id've" can never match after step 1, so they
   are left out); words are joined by single spaces.

``soft_accuracy(prediction, references)``: each of the n reference answers is left out in
turn; the prediction scores min(1, matches among the other n - 1 / 3); the score is the mean
over the n choices (n = 10 in VQAv2, TextVQA, VizWiz: the "10 choose 9" average). Both the
prediction and the references are normalised first, as the evaluator does.
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
           "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
MAX_PERIODS_REMOVED = 32  # re.UNICODE == 32, passed as re.sub's count by the evaluator
# the evaluator's contraction table (m4c_evaluator.py lines 14-135), lowercase keys only
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    return _PERIOD.sub("", out, count=MAX_PERIODS_REMOVED)


def _digits_and_articles(text: str) -> str:
    words = [NUMBERS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize(answer: object) -> str:
    """The evaluator's normalised form of one answer (rules in the module docstring)."""
    text = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def soft_accuracy(prediction: str, references: list[str]) -> float:
    """The VQA accuracy of ``prediction`` against the annotators' ``references`` (normalised
    here): mean over leaving each reference out of min(1, matches among the rest / 3)."""
    if not references:
        raise ValueError("soft_accuracy needs at least one reference answer")
    predicted = normalize(prediction)
    answers = [normalize(r) for r in references]
    total = 0.0
    for left_out in range(len(answers)):
        matches = sum(1 for i, a in enumerate(answers) if i != left_out and a == predicted)
        total += min(1.0, matches / 3)
    return total / len(answers)
