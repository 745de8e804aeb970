"""The shapes benchmark's prompt grammar: GenEval's six categories over simple shapes and colours.

single_object  "a circle"                            one object of that shape (any colour)
two_object     "a circle and a square"               both shapes present (unordered pairs only)
counting       "three triangles"                     exactly n objects of that shape, n in 1..4
colors         "a red square"                        an object of that shape and colour
position       "a circle left of a square"           both present, the first left of / right of / above / below the second
color_attr     "a red circle and a blue square"      an object of each (shape, colour); shape1 before shape2 in SHAPES

A prompt is a phrasing (TEMPLATES: "a photo of {x}", "{x} on a dark background", ...) of a scene; the bare
phrasing "{x}" is always one of them. Categories with few scenes get more phrasings (TEMPLATES_PER_SCENE), so every
category has enough prompts for a balanced held-out split (1,480 prompts in all). Splits are per prompt, stratified
by category: `make_splits(seed)` shuffles each category and takes TEST_PER_CATEGORY test and VALIDATION_PER_CATEGORY
validation prompts; the rest is train. Test and validation files list the categories round-robin, so any prefix
(`eval.max_prompts`) holds every category equally often. Every prompt carries the structured `spec` the verifier
checks. The files in assets/shapes/ were written by `densegrpo prompts --seed 0`.
"""
from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Optional

SHAPES = ["circle", "square", "triangle", "rectangle", "diamond"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]
NUMBERS = ["one", "two", "three", "four"]
RELATIONS = ["left of", "right of", "above", "below"]
CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
SPLITS = ("train", "validation", "test")
TEMPLATES = ["{x}", "a photo of {x}", "an image of {x}", "a picture of {x}", "a drawing of {x}", "a render of {x}",
             "an illustration of {x}", "a sketch of {x}", "a painting of {x}", "a scene with {x}", "a view of {x}",
             "a frame with {x}", "a canvas with {x}", "a diagram of {x}", "a poster of {x}", "a photograph of {x}",
             "a snapshot of {x}", "a graphic of {x}", "{x} on a dark background", "a plain image of {x}"]
# phrasings per scene: 5 / 10 / 20 / 35 / 80 / 420 scenes -> 100 / 200 / 240 / 280 / 240 / 420 prompts
TEMPLATES_PER_SCENE = {"single_object": 20, "two_object": 20, "counting": 12, "colors": 8, "position": 3,
                       "color_attr": 1}
TEST_PER_CATEGORY = 48
VALIDATION_PER_CATEGORY = 24
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


def a(word: str) -> str:
    """The indefinite article and the word: "a red", "an orange"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def scenes() -> list[ShapesPrompt]:
    """Every scene once, in its bare phrasing."""
    out = [ShapesPrompt(f"a {s}", "single_object", [Obj(s)]) for s in SHAPES]
    for s1, s2 in itertools.combinations(SHAPES, 2):
        out.append(ShapesPrompt(f"a {s1} and a {s2}", "two_object", [Obj(s1), Obj(s2)]))
    for n, s in itertools.product(range(1, 5), SHAPES):
        out.append(ShapesPrompt(f"{NUMBERS[n - 1]} {s if n == 1 else plural(s)}", "counting", [Obj(s)], count=n))
    for c, s in itertools.product(COLORS, SHAPES):
        out.append(ShapesPrompt(f"{a(c)} {s}", "colors", [Obj(s, c)]))
    for (s1, s2), rel in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
        out.append(ShapesPrompt(f"a {s1} {rel} a {s2}", "position", [Obj(s1), Obj(s2)], relation=rel))
    for (s1, s2), (c1, c2) in itertools.product(itertools.combinations(SHAPES, 2),
                                                 itertools.permutations(COLORS, 2)):
        out.append(ShapesPrompt(f"{a(c1)} {s1} and {a(c2)} {s2}", "color_attr", [Obj(s1, c1), Obj(s2, c2)]))
    return out


def all_prompts() -> list[ShapesPrompt]:
    """Every prompt: each scene in its bare phrasing plus TEMPLATES_PER_SCENE - 1 others (a fixed rotation)."""
    out = []
    for i, sc in enumerate(scenes()):
        k = TEMPLATES_PER_SCENE[sc.category]
        picks = [0] + [1 + (i * (k - 1) + j) % (len(TEMPLATES) - 1) for j in range(k - 1)]
        for t in picks:
            out.append(ShapesPrompt(TEMPLATES[t].format(x=sc.text), sc.category, sc.objects, sc.count, sc.relation))
    return out


def make_splits(seed: int = 0, n_test: int = TEST_PER_CATEGORY,
                n_validation: int = VALIDATION_PER_CATEGORY) -> dict[str, list[ShapesPrompt]]:
    """Per category: shuffle with `seed`; the first n_test -> test, the next n_validation -> validation, rest train."""
    rng = random.Random(seed)
    splits = {s: [] for s in SPLITS}
    everything = all_prompts()
    for cat in CATEGORIES:
        ps = [p for p in everything if p.category == cat]
        rng.shuffle(ps)
        if len(ps) < n_test + n_validation + 1:
            raise ValueError(f"category {cat} has {len(ps)} prompts, too few for {n_test} test + {n_validation} "
                             f"validation + train")
        splits["test"].append(ps[:n_test])
        splits["validation"].append(ps[n_test:n_test + n_validation])
        splits["train"] += ps[n_test + n_validation:]
    for s in ("test", "validation"):  # round-robin over categories: every prefix is balanced to within one prompt
        splits[s] = [p for row in zip(*splits[s]) for p in row]
    return splits


def write_splits(folder: str = ASSET_DIR, seed: int = 0) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, ps in make_splits(seed).items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            for p in ps:
                f.write(json.dumps(asdict(p)) + "\n")
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"seed": seed, "test_per_category": TEST_PER_CATEGORY,
                   "validation_per_category": VALIDATION_PER_CATEGORY,
                   "command": f"densegrpo prompts --seed {seed}"}, f, indent=1)


def load_split(split: str, folder: Optional[str] = None) -> list[ShapesPrompt]:
    path = os.path.join(folder or ASSET_DIR, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts.path: shapes split file '{path}' not found (write it with "
                                f"`densegrpo prompts`)")
    with open(path) as f:
        return [ShapesPrompt(**json.loads(line)) for line in f if line.strip()]


def by_text(folder: Optional[str] = None) -> dict[str, ShapesPrompt]:
    """Every prompt of every split by its text (the verifier looks specs up by prompt)."""
    out = {}
    for split in SPLITS:
        path = os.path.join(folder or ASSET_DIR, f"{split}.jsonl")
        if split == "validation" and not os.path.isfile(path):
            continue  # folders written before the validation split existed
        for p in load_split(split, folder):
            out[p.text] = p
    return out
