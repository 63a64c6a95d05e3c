"""A deterministic, embedded instruction-style text set (no downloads).

Each sample is a (question, answer) pair drawn from a few task families:
arithmetic, word facts (animal sounds, opposites, colours, plurals), letter
and list manipulation. ``generate_conversations(n, seed)`` always returns the
same list for the same arguments, so every rank and every restart sees the
same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"
GENERATOR_VERSION = 1  # bump when the generator's output changes (invalidates caches)

ANIMAL_SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
    "lion": "roar", "owl": "hoot", "snake": "hiss", "horse": "neigh", "frog": "croak",
    "pig": "oink", "bee": "buzz", "mouse": "squeak", "crow": "caw", "wolf": "howl",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
    "happy": "sad", "open": "closed", "early": "late", "full": "empty", "hard": "soft",
    "high": "low", "old": "new", "rich": "poor", "wet": "dry", "strong": "weak",
}
COLOURS = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow",
    "blood": "red", "orange": "orange", "plum": "purple", "chocolate": "brown",
    "cloud": "white", "lemon": "yellow", "leaf": "green", "tomato": "red", "night": "black",
}
PLURALS = {
    "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "box": "boxes", "city": "cities", "leaf": "leaves", "knife": "knives",
    "goose": "geese", "bus": "buses", "baby": "babies", "wolf": "wolves", "dish": "dishes",
}
WORDS = sorted(set(ANIMAL_SOUNDS) | set(OPPOSITES) | set(COLOURS) | set(PLURALS))
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve"]


@dataclass(frozen=True)
class Conversation:
    question: str
    answer: str


def _arithmetic(rng: random.Random) -> Conversation:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "*":
        a, b = a % 13, b % 13
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    phrasing = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.",
                           "Calculate {a} {op} {b}."])
    return Conversation(phrasing.format(a=a, op=op, b=b), f"{a} {op} {b} = {result}.")


def _animal_sound(rng: random.Random) -> Conversation:
    animal = rng.choice(sorted(ANIMAL_SOUNDS))
    return Conversation(f"What sound does a {animal} make?",
                        f"A {animal} says {ANIMAL_SOUNDS[animal]}.")


def _opposite(rng: random.Random) -> Conversation:
    word = rng.choice(sorted(OPPOSITES))
    return Conversation(f"What is the opposite of {word}?",
                        f"The opposite of {word} is {OPPOSITES[word]}.")


def _colour(rng: random.Random) -> Conversation:
    thing = rng.choice(sorted(COLOURS))
    return Conversation(f"What colour is {thing}?", f"{thing.capitalize()} is {COLOURS[thing]}.")


def _plural(rng: random.Random) -> Conversation:
    word = rng.choice(sorted(PLURALS))
    return Conversation(f"What is the plural of {word}?",
                        f"The plural of {word} is {PLURALS[word]}.")


def _reverse_word(rng: random.Random) -> Conversation:
    word = rng.choice(WORDS)
    return Conversation(f"Spell {word} backwards.", f"{' '.join(reversed(word))}")


def _count_letters(rng: random.Random) -> Conversation:
    word = rng.choice(WORDS)
    return Conversation(f"How many letters are in {word}?",
                        f"{word.capitalize()} has {NUMBER_WORDS[min(len(word), 12)]} letters.")


def _sort_numbers(rng: random.Random) -> Conversation:
    numbers = [rng.randint(0, 50) for _ in range(rng.randint(3, 5))]
    return Conversation(f"Sort these numbers: {', '.join(map(str, numbers))}.",
                        ", ".join(map(str, sorted(numbers))) + ".")


TASKS = (_arithmetic, _animal_sound, _opposite, _colour, _plural, _reverse_word,
         _count_letters, _sort_numbers)


def generate_conversations(num_samples: int, seed: int = 0) -> list[Conversation]:
    """``num_samples`` question/answer pairs, identical for identical arguments."""
    rng = random.Random(seed)
    return [rng.choice(TASKS)(rng) for _ in range(num_samples)]


def format_prompt(question: str) -> str:
    """The chat-template text before the answer (loss-masked)."""
    return f"{USER_TAG} {question}\n{ASSISTANT_TAG} "


def format_conversation(conversation: Conversation) -> str:
    """The whole chat-template text of one sample (tokenizer training uses this)."""
    return format_prompt(conversation.question) + conversation.answer
