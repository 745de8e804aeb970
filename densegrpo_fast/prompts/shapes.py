"""The shapes benchmark's prompt grammar: GenEval's six categories over simple shapes and colours.

single_object  "a circle"                            one object of that shape (any colour)
two_object     "a circle and a square"               both shapes present (unordered pairs only)
counting       "three triangles"                     exactly n objects of that shape, n in 1..4
colors         "a red square"                        an object of that shape and colour
position       "a circle left of a square"           both present, the first left of / right of / above / below the second
color_attr     "a red circle and a blue square"      an object of each (shape, colour); shape1 before shape2 in SHAPES

Every prompt has a structured `spec` the verifier checks. `make_splits(seed)` shuffles each category and holds out
a fixed fraction as the test split; the files in assets/shapes/ were written by `densegrpo prompts --seed 0`.
"""
from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Optional

SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow", "purple"]
NUMBERS = ["one", "two", "three", "four"]
RELATIONS = ["left of", "right of", "above", "below"]
CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes")


@dataclass
class Obj:
    shape: str
    color: Optional[str] = None  # None: any colour


@dataclass
class ShapesPrompt:
    text: str
    category: str
    objects: list = field(default_factory=list)   # list[Obj] (as dicts once loaded from JSON)
    count: int = 0                                 # counting: exact number of objects[0].shape
    relation: Optional[str] = None                 # position: objects[0] <relation> objects[1]

    def objs(self) -> list[Obj]:
        return [o if isinstance(o, Obj) else Obj(**o) for o in self.objects]


def plural(shape: str) -> str:
    return shape + "s"


def all_prompts() -> list[ShapesPrompt]:
    out = [ShapesPrompt(f"a {s}", "single_object", [Obj(s)]) for s in SHAPES]
    for s1, s2 in itertools.combinations(SHAPES, 2):
        out.append(ShapesPrompt(f"a {s1} and a {s2}", "two_object", [Obj(s1), Obj(s2)]))
    for n, s in itertools.product(range(1, 5), SHAPES):
        out.append(ShapesPrompt(f"{NUMBERS[n - 1]} {s if n == 1 else plural(s)}", "counting", [Obj(s)], count=n))
    for c, s in itertools.product(COLORS, SHAPES):
        out.append(ShapesPrompt(f"a {c} {s}", "colors", [Obj(s, c)]))
    for (s1, s2), rel in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
        out.append(ShapesPrompt(f"a {s1} {rel} a {s2}", "position", [Obj(s1), Obj(s2)], relation=rel))
    for (s1, s2), (c1, c2) in itertools.product(itertools.combinations(SHAPES, 2),
                                                 itertools.permutations(COLORS, 2)):
        out.append(ShapesPrompt(f"a {c1} {s1} and a {c2} {s2}", "color_attr", [Obj(s1, c1), Obj(s2, c2)]))
    return out


def make_splits(seed: int = 0, test_fraction: float = 0.25) -> dict[str, list[ShapesPrompt]]:
    """Per category: shuffle with `seed`, the first max(1, round(f * n)) go to test, the rest to train."""
    rng = random.Random(seed)
    splits = {"train": [], "test": []}
    for cat in CATEGORIES:
        ps = [p for p in all_prompts() if p.category == cat]
        rng.shuffle(ps)
        n_test = max(1, round(test_fraction * len(ps)))
        splits["test"] += ps[:n_test]
        splits["train"] += ps[n_test:]
    return splits


def write_splits(folder: str = ASSET_DIR, seed: int = 0) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, ps in make_splits(seed).items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            for p in ps:
                f.write(json.dumps(asdict(p)) + "\n")
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"seed": seed, "test_fraction": 0.25, "command": f"densegrpo prompts --seed {seed}"}, f, indent=1)


def load_split(split: str, folder: Optional[str] = None) -> list[ShapesPrompt]:
    path = os.path.join(folder or ASSET_DIR, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts.path: shapes split file '{path}' not found (write it with "
                                f"`densegrpo prompts`)")
    with open(path) as f:
        return [ShapesPrompt(**json.loads(line)) for line in f if line.strip()]


def by_text(folder: Optional[str] = None) -> dict[str, ShapesPrompt]:
    """Every prompt of both splits by its text (the verifier looks specs up by prompt)."""
    out = {}
    for split in ("train", "test"):
        for p in load_split(split, folder):
            out[p.text] = p
    return out
