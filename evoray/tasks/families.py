"""Built-in targeted task families: multiple-choice questions with known answers.

Each family samples a :class:`Question` from a ``random.Random`` and renders its stem in several
wordings. A question's ``qkey`` identifies it canonically: the same arithmetic, conversion or
comparison has the same key whatever the wording or number format, so splits and pools can be
kept disjoint by key and near-duplicates recognised.

Families: ``arithmetic`` (multi-digit +, −, ×), ``unit_conversion`` (metric, time and imperial
units, both directions), ``day_of_week`` (days after/before a weekday), ``category`` (which word
belongs to a category; see :class:`Category`), ``compare`` (largest or
smallest of four fractions, decimals and percentages) and ``lookup`` (find the option that the
question names, the even number, the word with a given first letter; see :class:`Lookup`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["Question", "Family", "FAMILIES", "LETTERS", "fmt_number", "to_prompt"]

LETTERS = ("A", "B", "C", "D")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class Question:
    """A sampled question: options in display order and the index of the right one."""

    family: str
    qkey: str
    subtask: str
    params: dict = field(hash=False)
    options: tuple[str, ...]
    answer_index: int

    @property
    def answer(self) -> str:
        return LETTERS[self.answer_index]


def fmt_number(x: float | int, style: str = "plain") -> str:
    """``plain``: 3500, 3.5; ``comma``: 3,500; ``padded``: 3.50 (two decimals when fractional)."""
    if float(x).is_integer():
        n = int(x)
        return f"{n:,}" if style == "comma" else str(n)
    if style == "padded":
        return f"{x:.2f}"
    text = f"{x:,.4f}" if style == "comma" else f"{x:.4f}"
    return text.rstrip("0").rstrip(".")


def to_prompt(stem: str, options: tuple[str, ...]) -> str:
    """The MCQ prompt: stem, lettered options, and ``Answer:`` (the response is a letter)."""
    lines = [stem] + [f"{letter}. {opt}" for letter, opt in zip(LETTERS, options, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def _options(rng: random.Random, answer: str, distractors: list[str]) -> tuple[tuple, int]:
    """Four distinct options in random order: the answer and the first 3 distinct distractors."""
    picked: list[str] = []
    for d in distractors:
        if d != answer and d not in picked:
            picked.append(d)
        if len(picked) == 3:
            break
    if len(picked) < 3:
        raise ValueError(f"not enough distinct distractors for {answer!r}")
    opts = [answer] + picked
    rng.shuffle(opts)
    return tuple(opts), opts.index(answer)


class Family:
    """A task family: ``sample`` a question, ``render`` its stem in wording ``variant``."""

    name: str = ""
    description: str = ""
    n_variants: int = 3

    def sample(self, rng: random.Random) -> Question:
        raise NotImplementedError

    def render(self, q: Question, variant: int, style: str = "plain") -> str:
        raise NotImplementedError


class Arithmetic(Family):
    name = "arithmetic"
    description = "multi-digit addition, subtraction and multiplication"
    _ops = {"+": "addition", "-": "subtraction", "*": "multiplication"}
    _templates = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.",
                  "Find the value of {a} {op} {b}.")

    def sample(self, rng: random.Random) -> Question:
        op = rng.choice(list(self._ops))
        if op == "*":
            a, b = rng.randint(12, 99), rng.randint(12, 99)
            ans = a * b
            near = [ans + a, ans - b, ans + 10, ans - 10, ans + 100]
        else:
            a, b = rng.randint(100, 9999), rng.randint(100, 9999)
            if op == "-" and b > a:
                a, b = b, a
            ans = a + b if op == "+" else a - b
            near = [ans + 10, ans - 10, ans + 1, ans - 1, ans + 100, ans - 100]
        rng.shuffle(near)
        opts, idx = _options(rng, str(ans), [str(n) for n in near if n >= 0])
        return Question(self.name, f"arithmetic:{a}{op}{b}", self._ops[op],
                        {"a": a, "b": b, "op": op}, opts, idx)

    def render(self, q: Question, variant: int, style: str = "plain") -> str:
        p = q.params
        op = {"*": "×", "-": "−", "+": "+"}[p["op"]]
        return self._templates[variant % 3].format(a=fmt_number(p["a"], style), op=op,
                                                   b=fmt_number(p["b"], style))


class UnitConversion(Family):
    name = "unit_conversion"
    description = "converting lengths, masses, volumes and times between units"
    _pairs = (("kilometers", "meters", 1000), ("meters", "centimeters", 100),
              ("centimeters", "millimeters", 10), ("kilograms", "grams", 1000),
              ("grams", "milligrams", 1000), ("liters", "milliliters", 1000),
              ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
              ("weeks", "days", 7), ("feet", "inches", 12), ("yards", "feet", 3),
              ("gallons", "quarts", 4), ("pounds", "ounces", 16), ("years", "months", 12))
    _templates = ("How many {to} are in {v} {frm}?", "Convert {v} {frm} to {to}.",
                  "{v} {frm} is equal to how many {to}?")

    def sample(self, rng: random.Random) -> Question:
        big, small, factor = rng.choice(self._pairs)
        value = rng.randint(2, 250) / rng.choice((1, 1, 2))
        if rng.random() < 0.5:
            frm, to, v, ans, sub = big, small, value, value * factor, "to_smaller"
        else:
            frm, to, v, ans, sub = small, big, value * factor, value, "to_larger"
        wrong_factor = factor * 10 if sub == "to_smaller" else 1 / (factor * 10)
        wrong = [ans * 10, ans / 10, v * wrong_factor, ans + factor, ans * 2, ans + 1]
        rng.shuffle(wrong)
        opts, idx = _options(rng, fmt_number(ans), [fmt_number(round(w, 4)) for w in wrong])
        return Question(self.name, f"unit:{fmt_number(v)}:{frm}->{to}", sub,
                        {"v": v, "frm": frm, "to": to}, opts, idx)

    def render(self, q: Question, variant: int, style: str = "plain") -> str:
        p = q.params
        return self._templates[variant % 3].format(v=fmt_number(p["v"], style), frm=p["frm"],
                                                   to=p["to"])


class DayOfWeek(Family):
    name = "day_of_week"
    description = "which weekday it is a number of days after or before a given day"
    _templates = {
        "after": ("If today is {d}, what day of the week will it be in {n} days?",
                  "Today is {d}. What day is it {n} days from now?",
                  "What weekday comes {n} days after a {d}?"),
        "before": ("If today is {d}, what day of the week was it {n} days ago?",
                   "Today is {d}. What day was it {n} days earlier?",
                   "What weekday comes {n} days before a {d}?"),
    }

    def sample(self, rng: random.Random) -> Question:
        d, n = rng.randrange(7), rng.randint(2, 2999)
        sub = rng.choice(("after", "before"))
        ans = (d + n if sub == "after" else d - n) % 7
        wrong = [DAYS[(ans + k) % 7] for k in (1, -1, 2, -2, 3)]
        rng.shuffle(wrong)
        opts, idx = _options(rng, DAYS[ans], wrong)
        return Question(self.name, f"dow:{DAYS[d]}:{sub}:{n}", sub, {"d": d, "n": n}, opts, idx)

    def render(self, q: Question, variant: int, style: str = "plain") -> str:
        p = q.params
        return self._templates[q.subtask][variant % 3].format(d=DAYS[p["d"]],
                                                              n=fmt_number(p["n"], style))


class Compare(Family):
    name = "compare"
    description = "the largest or smallest of four fractions, decimals and percentages"
    _templates = {
        "largest": ("Which of these numbers is the largest?", "Which value is greatest?",
                    "Pick the biggest of the following numbers."),
        "smallest": ("Which of these numbers is the smallest?", "Which value is least?",
                     "Pick the smallest of the following numbers."),
    }

    @staticmethod
    def _show(value: Fraction, form: str) -> str:
        if form == "fraction":
            return f"{value.numerator}/{value.denominator}"
        if form == "percent":
            return fmt_number(round(float(value) * 100, 2)) + "%"
        return fmt_number(round(float(value), 4))

    def sample(self, rng: random.Random) -> Question:
        values: list[Fraction] = []
        while len(values) < 4:
            v = Fraction(rng.randint(1, 11), rng.choice((2, 3, 4, 5, 8, 10, 12)))
            if v < 2 and all(v != w for w in values):
                values.append(v)
        shown = [self._show(v, rng.choice(("fraction", "decimal", "percent"))) for v in values]
        sub = rng.choice(("largest", "smallest"))
        best = (max if sub == "largest" else min)(range(4), key=lambda i: values[i])
        opts, idx = _options(rng, shown[best], [s for i, s in enumerate(shown) if i != best])
        return Question(self.name, f"compare:{sub}:" + "|".join(sorted(shown)), sub, {}, opts, idx)

    def render(self, q: Question, variant: int, style: str = "plain") -> str:
        return self._templates[q.subtask][variant % 3]


class Category(Family):
    name = "category"
    description = "which of four words names a member of a given category (a fruit, a tool, ...)"
    # Unambiguous members only: no word belongs to two categories (no "orange", "turkey", ...).
    _words = {
        "mammal": ("dog", "cat", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf",
                   "fox", "rabbit", "mouse", "deer", "elephant", "monkey", "zebra", "giraffe",
                   "camel", "donkey", "pig", "kangaroo", "squirrel", "leopard"),
        "bird": ("eagle", "sparrow", "owl", "parrot", "pigeon", "crow", "robin", "swan", "duck",
                 "penguin", "ostrich", "hawk", "falcon", "seagull", "peacock", "flamingo",
                 "woodpecker", "pelican", "heron", "canary"),
        "fruit": ("apple", "banana", "pear", "grape", "cherry", "peach", "plum", "mango", "lemon",
                  "melon", "strawberry", "pineapple", "apricot", "kiwi", "coconut", "papaya",
                  "raspberry", "blueberry", "watermelon", "fig"),
        "vegetable": ("carrot", "potato", "onion", "cabbage", "lettuce", "spinach", "broccoli",
                      "cucumber", "celery", "garlic", "radish", "turnip", "cauliflower", "leek",
                      "beetroot", "eggplant", "zucchini", "asparagus", "artichoke", "parsnip"),
        "color": ("red", "blue", "green", "yellow", "purple", "brown", "black", "white", "pink",
                  "grey", "crimson", "scarlet", "turquoise", "beige", "maroon", "magenta",
                  "indigo", "cyan"),
        "country": ("France", "Germany", "Spain", "Italy", "Japan", "China", "India", "Brazil",
                    "Canada", "Mexico", "Egypt", "Kenya", "Norway", "Sweden", "Poland", "Greece",
                    "Peru", "Argentina", "Australia", "Russia", "Portugal", "Ireland", "Vietnam",
                    "Nigeria"),
        "body part": ("arm", "leg", "hand", "foot", "head", "nose", "ear", "eye", "mouth", "knee",
                      "elbow", "shoulder", "finger", "toe", "neck", "chin", "ankle", "wrist",
                      "thumb", "lip"),
        "tool": ("hammer", "saw", "drill", "wrench", "screwdriver", "chisel", "pliers", "shovel",
                 "rake", "axe", "trowel", "crowbar", "mallet", "hoe", "spanner"),
        "vehicle": ("car", "bus", "truck", "train", "bicycle", "motorcycle", "tractor", "van",
                    "taxi", "tram", "scooter", "airplane", "helicopter", "boat", "ship",
                    "submarine", "ferry", "jeep", "ambulance", "yacht"),
        "musical instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello",
                               "harp", "saxophone", "clarinet", "trombone", "banjo", "accordion",
                               "oboe", "tuba", "ukulele", "harmonica", "xylophone", "mandolin"),
        "piece of clothing": ("shirt", "trousers", "jacket", "coat", "hat", "sock", "shoe",
                              "scarf", "glove", "dress", "skirt", "sweater", "belt", "boot",
                              "blouse", "hoodie", "jeans", "pyjamas"),
        "sport": ("football", "tennis", "golf", "basketball", "baseball", "hockey", "rugby",
                  "volleyball", "boxing", "swimming", "cycling", "skiing", "wrestling",
                  "badminton", "archery", "rowing", "surfing", "karate", "judo"),
        "metal": ("iron", "copper", "gold", "silver", "zinc", "tin", "aluminium", "nickel",
                  "platinum", "titanium", "cobalt", "chromium", "magnesium", "tungsten"),
        "job": ("doctor", "teacher", "nurse", "farmer", "pilot", "lawyer", "baker", "plumber",
                "dentist", "chef", "engineer", "carpenter", "electrician", "firefighter",
                "architect", "soldier", "waiter", "pharmacist", "mechanic", "librarian"),
        "piece of furniture": ("chair", "table", "sofa", "bed", "desk", "wardrobe", "shelf",
                               "stool", "bench", "cabinet", "dresser", "armchair", "bookcase",
                               "cupboard", "ottoman"),
    }
    _templates = ("Which of these is {a} {cat}?", "Which word names {a} {cat}?",
                  "One of these words is {a} {cat}. Which one?")

    def sample(self, rng: random.Random) -> Question:
        cat = rng.choice(sorted(self._words))
        ans = rng.choice(self._words[cat])
        others = sorted(c for c in self._words if c != cat)
        wrong = [rng.choice(self._words[c]) for c in rng.sample(others, 3)]
        # Every option capitalised alike, so a country's capital letter is no cue.
        opts, idx = _options(rng, ans.capitalize(), [w.capitalize() for w in wrong])
        return Question(self.name, f"category:{cat}:{ans}:" + "|".join(sorted(wrong)), cat,
                        {"cat": cat}, opts, idx)

    def render(self, q: Question, variant: int, style: str = "plain") -> str:
        cat = q.params["cat"]
        a = "an" if cat[0] in "aeiou" else "a"
        return self._templates[variant % 3].format(a=a, cat=cat)


class Lookup(Family):
    """Questions answered by reading the options, not by computing or knowing facts.

    SmolLM2-135M cannot learn the other families from a few hundred examples (it learns the
    answer format only; ``benchmarks/results/train.json``), so selections of their pools cannot
    differ in test accuracy. This family is what a 135M model does learn: its three subtasks
    test whether the model finds an option by its surface (``word``: the option the question
    quotes; ``even``: the one even number; ``first_letter``: the one word with a given initial),
    and binds it to its letter. Words come from :class:`Category`'s lists.
    """

    name = "lookup"
    description = "find the option the question describes: a quoted word, the even number, " \
                  "the word with a given first letter"
    _templates = {
        "word": ("Which option is the word '{w}'?", "Find '{w}' among the options.",
                 "Which choice says '{w}'?"),
        "even": ("Which number is even?", "Which of these numbers is even?",
                 "One of these numbers is even. Which one?"),
        "first_letter": ("Which word starts with the letter {w}?",
                         "Which word begins with {w}?", "Find the word whose first letter is {w}."),
    }

    def __init__(self) -> None:
        self._vocab = sorted({w.lower() for ws in Category._words.values() for w in ws
                              if " " not in w})

    def sample(self, rng: random.Random) -> Question:
        sub = rng.choice(sorted(self._templates))
        if sub == "even":
            ans = rng.randrange(10, 1000, 2)
            wrong = [rng.randrange(11, 1000, 2) for _ in range(6)]
            opts, idx = _options(rng, str(ans), [str(w) for w in wrong])
            shown = ""
        else:
            words = rng.sample(self._vocab, 12)
            if sub == "first_letter":  # distractors must not share the answer's initial
                words = [words[0]] + [w for w in words[1:] if w[0] != words[0][0]]
            opts, idx = _options(rng, words[0], words[1:])
            shown = words[0] if sub == "word" else words[0][0].upper()
        return Question(self.name, f"lookup:{sub}:{opts[idx]}:" + "|".join(sorted(opts)), sub,
                        {"w": shown}, opts, idx)

    def render(self, q: Question, variant: int, style: str = "plain") -> str:
        return self._templates[q.subtask][variant % 3].format(w=q.params["w"])


FAMILIES: dict[str, Family] = {f.name: f for f in (Arithmetic(), UnitConversion(), DayOfWeek(),
                                                    Compare(), Category(), Lookup())}
