"""A small, deterministic, math-flavoured text corpus for training the test tokenizer.

Generated from templates rather than shipped as data, so the factory needs no files and the
tokenizer's merges reflect the kind of text a math rollout produces (numbers, operators,
"step by step", \\boxed{...}).
"""

from __future__ import annotations

import random

_NAMES = ["Alice", "Bob", "Carla", "Deepak", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal"]
_ITEMS = ["apples", "books", "marbles", "pencils", "cookies", "stickers", "coins", "tickets"]
_VERBS = [("buys", "+"), ("finds", "+"), ("gives away", "-"), ("sells", "-"), ("eats", "-")]
_PHRASES = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let's think step by step.",
    "First, we compute the total.",
    "Therefore, the answer is",
    "We substitute the value into the equation.",
    "The sum of the two numbers is",
    "Multiply both sides by",
    "Solve for x:",
    "The probability that the event occurs is",
    "Simplify the fraction",
]


def _problem(rng: random.Random) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 99), rng.randint(1, 50), rng.randint(2, 9)
    verb, op = rng.choice(_VERBS)
    after = a + b if op == "+" else a - b
    total = after * c
    return (
        f"{name} has {a} {item}. {name} {verb} {b} {item}. Then {name} makes {c} times as many. "
        f"How many {item} does {name} have?\n"
        f"{rng.choice(_PHRASES)} {a} {op} {b} = {after}. {after} * {c} = {total}. "
        f"The answer is \\boxed{{{total}}}.\n#### {total}"
    )


def _algebra(rng: random.Random) -> str:
    p, q, r = rng.randint(2, 12), rng.randint(1, 40), rng.randint(1, 9)
    x = rng.randint(-20, 20)
    rhs = p * x + q
    return (
        f"Solve for x: {p}x + {q} = {rhs}. Subtract {q} from both sides: {p}x = {rhs - q}. "
        f"Divide by {p}: x = {x}. Check: {p} * ({x}) + {q} = {rhs}. So x = \\boxed{{{x}}}. "
        f"Also $\\frac{{{r}}}{{{r + 1}}} + \\frac{{1}}{{{r + 1}}} = 1$ and ${r}^2 = {r * r}$."
    )


def math_corpus(num_docs: int = 3000, seed: int = 0) -> list[str]:
    """Return ``num_docs`` short documents; identical for identical arguments."""
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        docs.append(_problem(rng) if i % 2 == 0 else _algebra(rng))
    docs.extend(_PHRASES)
    return docs
