"""The built-in synthetic visual QA set ("shapes"): coloured shapes on a grid, questions that need the image.

Every scene puts a few shapes (one per cell of a `grid x grid` layout, jittered) on a plain or noisy background.
Questions are short with exact one-word answers, and their evidence is spread over the image:

- `colour`: the colour of the shape at a named position;
- `shape`: the kind of the shape at a named position (one word: circle, square, triangle, diamond);
- `count`: how many shapes of a colour, or of a kind (answers 0-3, balanced within each form);
- `exists`: POPE-style yes/no, balanced, with negatives drawn `random`ly, from the `popular` objects (a fixed third
  of all colour-kind pairs; that split's positives come from them too, so a name alone says nothing), or
  `adversarial`ly (sharing the colour or the kind of an object in the scene);
- `relation`: yes/no, is one object left of / right of / above / below another (balanced);
- `choice`: multiple choice (A-D) on the kind of the shape at a position, the right letter uniformly placed.

Attributes are drawn uniformly, so no answer can be guessed from the question text better than the majority answer
of its type (tested). Everything is drawn from `numpy.random.default_rng(seed)`: the same seed gives the same set.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 50, 180),
    "orange": (245, 130, 20),
}
KINDS = ("circle", "square", "triangle", "diamond")
QUESTION_TYPES = ("colour", "shape", "count", "exists", "relation", "choice")
POPE_SPLITS = ("random", "popular", "adversarial")
LETTERS = "ABCD"
MAX_COUNT_ANSWER = 3
CAPTION_STYLES = ("objects", "places")
CAPTION_REQUEST = "Describe the image."  # the caption rows' question (LLaVA's plain template ignores it)
# how many answers each question type can have: a uniform guess is right once in that many
ANSWERS_PER_TYPE = {
    "colour": len(COLOURS),
    "shape": len(KINDS),
    "count": MAX_COUNT_ANSWER + 1,
    "exists": 2,
    "relation": 2,
    "choice": len(LETTERS),
}


@dataclass(frozen=True)
class Shape:
    row: int
    column: int
    colour: str
    kind: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    shapes: list[Shape]
    noisy: bool
    background: tuple[int, int, int]
    jitter: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class SynthConfig:
    """How to draw the set. Sizes are numbers of questions; each scene carries `questions_per_scene`."""

    n_train: int = 6000
    n_val: int = 500
    n_test: int = 1500
    n_captions: int = 2000
    image_size: int = 64
    grid: int = 3
    min_shapes: int = 2
    max_shapes: int = 6
    questions_per_scene: int = 3
    question_types: tuple[str, ...] = QUESTION_TYPES  # drawn in turn
    multi_turn_train: bool = False  # the train split asks each scene's questions in one conversation
    caption_style: str = "objects"  # objects: "a red circle at the top left, ..."; places: "top left: red circle; ..."
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.question_types if kind not in QUESTION_TYPES]
        if unknown or not self.question_types:
            raise ValueError(
                f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {self.question_types}"
            )
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(f"caption_style must be one of {CAPTION_STYLES}, got {self.caption_style!r}")


def chance_accuracy(question_types: Iterable[str]) -> float | None:
    """Percent a uniform guess among the possible answers scores, averaged over one type per question (so over the
    types' mix); None if a type is not one of the synthesiser's."""
    types = list(question_types)
    if not types or any(kind not in ANSWERS_PER_TYPE for kind in types):
        return None
    return 100.0 * sum(1 / ANSWERS_PER_TYPE[kind] for kind in types) / len(types)


def position_name(row: int, column: int, grid: int) -> str:
    """'top left', 'center', 'bottom', ... for a 3x3 grid; 'row R column C' for other grids."""
    if grid != 3:
        return f"row {row + 1} column {column + 1}"
    vertical = ("top", "", "bottom")[row]
    horizontal = ("left", "", "right")[column]
    return " ".join(part for part in (vertical, horizontal) if part) or "center"


def draw_scene(scene: Scene, size: int, grid: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Render a scene; the noise (if any) is drawn from `rng`."""
    if scene.noisy:
        rng = rng or np.random.default_rng(0)
        noise = rng.integers(-40, 41, size=(size, size, 3))
        pixels = np.clip(np.array(scene.background)[None, None] + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
    else:
        image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    cell = size / grid
    radius = cell * 0.36
    for shape, (dx, dy) in zip(scene.shapes, scene.jitter, strict=True):
        cx = (shape.column + 0.5) * cell + dx
        cy = (shape.row + 0.5) * cell + dy
        colour = COLOURS[shape.colour]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif shape.kind == "square":
            draw.rectangle(
                (cx - radius * 0.85, cy - radius * 0.85, cx + radius * 0.85, cy + radius * 0.85), fill=colour
            )
        elif shape.kind == "triangle":
            draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=colour)
    return image


def random_scene(rng: np.random.Generator, config: SynthConfig) -> Scene:
    cells = config.grid * config.grid
    count = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    chosen = rng.choice(cells, size=count, replace=False)
    shapes = [
        Shape(int(c) // config.grid, int(c) % config.grid, str(rng.choice(list(COLOURS))), str(rng.choice(KINDS)))
        for c in sorted(chosen)
    ]
    jitter_span = max(1, config.image_size // (config.grid * 12))
    jitter = [tuple(int(v) for v in rng.integers(-jitter_span, jitter_span + 1, size=2)) for _ in shapes]
    shade = int(rng.integers(200, 246))
    return Scene(shapes, bool(rng.random() < 0.5), (shade, shade, shade), jitter)


def _unique(scene: Scene) -> list[Shape]:
    names = Counter(shape.name for shape in scene.shapes)
    return [shape for shape in scene.shapes if names[shape.name] == 1]


def ask(
    kind: str,
    scene: Scene,
    rng: np.random.Generator,
    grid: int,
    popular: list[str],
    pope_split: str | None = None,
    counts_asked: Counter | None = None,
) -> tuple[str, str, dict] | None:
    """One question of type `kind` about `scene`: (question, answer, extra fields) or None if it does not apply.

    `counts_asked` tallies the (form, answer) pairs of the count questions of a split, to keep them balanced.
    """
    shapes = scene.shapes
    if kind == "colour":
        shape = shapes[int(rng.integers(len(shapes)))]
        where = position_name(shape.row, shape.column, grid)
        return f"What color is the shape at the {where}? Answer with one word.", shape.colour, {}
    if kind == "shape":
        shape = shapes[int(rng.integers(len(shapes)))]
        where = position_name(shape.row, shape.column, grid)
        return f"What shape is at the {where}? Answer with one word.", shape.kind, {}
    if kind == "count":
        # the form (colour or kind) is a coin; the answer is the least-asked count of that form so far among those
        # this scene offers, so both forms end with the same answer distribution and the words say nothing
        form = "colour" if rng.random() < 0.5 else "kind"
        attributes = list(COLOURS) if form == "colour" else list(KINDS)
        counts = {a: sum((s.colour if form == "colour" else s.kind) == a for s in shapes) for a in attributes}
        offered = sorted({c for c in counts.values() if c <= MAX_COUNT_ANSWER})
        if not offered:
            return None  # a dense scene: every count of this form is above MAX_COUNT_ANSWER
        asked = counts_asked if counts_asked is not None else Counter()
        fewest = min(asked[(form, c)] for c in offered)
        answer = int(rng.choice([c for c in offered if asked[(form, c)] == fewest]))
        asked[(form, answer)] += 1
        attribute = str(rng.choice([a for a in attributes if counts[a] == answer]))
        noun = f"{attribute} shapes" if form == "colour" else f"{attribute}s"
        return f"How many {noun} are there? Answer with a number.", str(answer), {}
    if kind == "exists":
        present = {shape.name for shape in shapes}
        everything = [f"{c} {k}" for c in COLOURS for k in KINDS]
        if pope_split == "popular":
            # positives and negatives both come from the popular objects, so their names carry no answer
            candidates = popular[: len(everything) // 3]
            positives = [name for name in candidates if name in present]
            negatives = [name for name in candidates if name not in present]
        else:
            positives = sorted(present)
            negatives = [name for name in everything if name not in present]
            if pope_split == "adversarial":
                negatives = [
                    name
                    for name in negatives
                    if any(name.split()[0] == s.colour or name.split()[1] == s.kind for s in shapes)
                ]
        if not positives or not negatives:
            return None  # decided before the coin, so skipping never tilts the yes/no balance
        answer = "yes" if rng.random() < 0.5 else "no"
        pool = positives if answer == "yes" else negatives
        name = str(rng.choice(pool))
        return f"Is there a {name} in the image? Answer yes or no.", answer, {"pope_split": pope_split}
    if kind == "relation":
        unique = _unique(scene)
        pairs = [(a, b) for a in unique for b in unique if a is not b]
        if not pairs:
            return None
        first, second = pairs[int(rng.integers(len(pairs)))]
        truths = []
        if first.column < second.column:
            truths.append("to the left of")
        if first.column > second.column:
            truths.append("to the right of")
        if first.row < second.row:
            truths.append("above")
        if first.row > second.row:
            truths.append("below")
        opposite = {
            "to the left of": "to the right of",
            "to the right of": "to the left of",
            "above": "below",
            "below": "above",
        }
        relation = str(rng.choice(truths))
        if rng.random() < 0.5:
            asked, answer = relation, "yes"
        else:
            asked, answer = opposite[relation], "no"
        return f"Is the {first.name} {asked} the {second.name}? Answer yes or no.", answer, {}
    if kind == "choice":
        shape = shapes[int(rng.integers(len(shapes)))]
        where = position_name(shape.row, shape.column, grid)
        options = list(rng.permutation(KINDS))
        lines = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True))
        question = (
            f"What shape is at the {where}?\n{lines}\nAnswer with the option's letter from the given choices directly."
        )
        return question, LETTERS[options.index(shape.kind)], {"options": [str(option) for option in options]}
    raise ValueError(f"unknown question type {kind!r}; choose one of {QUESTION_TYPES}")


def caption(scene: Scene, grid: int, style: str = "objects") -> str:
    """A sentence listing every shape and where it is (the caption set for projector pre-training).

    `objects` names each shape, then its place; `places` names each place, then what it holds ("top left: red
    circle; center: blue square."), so the place is read before the shape, as a question about a place asks.
    """
    if style == "places":
        parts = [f"{position_name(shape.row, shape.column, grid)}: {shape.name}" for shape in scene.shapes]
        return "; ".join(parts) + "."

    def article(word: str) -> str:
        return "an" if word[0] in "aeiou" else "a"

    parts = [
        f"{article(shape.colour)} {shape.name} at the {position_name(shape.row, shape.column, grid)}"
        for shape in scene.shapes
    ]
    return "There is " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] + "."


def _split(
    name: str, n_questions: int, config: SynthConfig, rng: np.random.Generator, out_dir: Path, popular: list[str]
) -> list[dict]:
    rows: list[dict] = []
    counts_asked: Counter = Counter()
    scene_index = 0
    while len(rows) < n_questions:
        scene = random_scene(rng, config)
        relative = f"{name}/{scene_index:06d}.png"
        path = out_dir / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_scene(scene, config.image_size, config.grid, rng).save(path)
        for _ in range(config.questions_per_scene):
            if len(rows) >= n_questions:
                break
            types = config.question_types
            kind = types[len(rows) % len(types)]
            pope_split = POPE_SPLITS[(len(rows) // len(types)) % len(POPE_SPLITS)] if kind == "exists" else None
            asked = ask(kind, scene, rng, config.grid, popular, pope_split, counts_asked)
            if asked is None:
                continue
            question, answer, extra = asked
            rows.append(
                {
                    "id": f"{name}-{len(rows):06d}",
                    "image": relative,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                    "type": kind,
                    "question": question,
                    "answer": answer,
                    **{key: value for key, value in extra.items() if value is not None},
                }
            )
        scene_index += 1
    return rows


def as_conversations(rows: list[dict], rng: np.random.Generator) -> list[dict]:
    """Merge the rows of each image into one multi-turn conversation (LLaVA's own data is multi-turn): the image
    is encoded once for several supervised answers. The turns are shuffled, since question types are drawn in a
    fixed rotation and a model must not learn a type from its turn number; only the first turn carries `<image>`."""
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    merged = []
    for image, group in by_image.items():
        turns = []
        for index in rng.permutation(len(group)):
            question, answer = group[int(index)]["conversations"]
            turns += [{"from": "human", "value": question["value"].replace("<image>\n", "", 1)}, answer]
        turns[0] = {"from": "human", "value": f"<image>\n{turns[0]['value']}"}
        merged.append({"id": group[0]["id"], "image": image, "conversations": turns})
    return merged


def _captions(n: int, config: SynthConfig, rng: np.random.Generator, out_dir: Path) -> list[dict]:
    rows = []
    for index in range(n):
        scene = random_scene(rng, config)
        relative = f"captions/{index:06d}.png"
        path = out_dir / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_scene(scene, config.image_size, config.grid, rng).save(path)
        rows.append(
            {
                "id": f"caption-{index:06d}",
                "image": relative,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{CAPTION_REQUEST}"},
                    {"from": "gpt", "value": caption(scene, config.grid, config.caption_style)},
                ],
            }
        )
    return rows


def write_synthetic(out_dir: Path, config: SynthConfig) -> dict[str, Path]:
    """Draw the set into `out_dir`: `train.json`, `val.json`, `test.json`, `captions.json` and `images/`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    everything = [f"{c} {k}" for c in COLOURS for k in KINDS]
    popular = [str(name) for name in rng.permutation(everything)]  # a fixed "frequency" order for POPE negatives
    files = {}
    for name, size in (("train", config.n_train), ("val", config.n_val), ("test", config.n_test)):
        rows = _split(name, size, config, rng, out_dir, popular)
        if name == "train" and config.multi_turn_train:
            rows = as_conversations(rows, rng)
        files[name] = out_dir / f"{name}.json"
        files[name].write_text(json.dumps(rows, indent=1))
    files["captions"] = out_dir / "captions.json"
    files["captions"].write_text(json.dumps(_captions(config.n_captions, config, rng, out_dir), indent=1))
    (out_dir / "synth_config.json").write_text(json.dumps(asdict(config), indent=1))
    return files


def vocabulary_texts(config: SynthConfig) -> list[str]:
    """Every word the set can use, for fitting a word-level tokenizer."""
    words = [*COLOURS, *KINDS, *[f"{kind}s" for kind in KINDS], *LETTERS, "yes", "no", "center"]
    words += [str(n) for n in range(config.grid * config.grid + 1)]
    words += [position_name(r, c, config.grid) for r in range(config.grid) for c in range(config.grid)]
    phrases = [
        "What color is the shape at the ? Answer with one word.",
        "How many shapes are there? Answer with a number.",
        "Is there a in the image? Answer yes or no.",
        "Is the to the left of right of above below the ? Answer yes or no.",
        "What shape is at the ? Answer with one word.",
        "What shape is at the ? Answer with the option's letter from the given choices directly.",
        "There is a an at the , and .",
        *([": ; ."] if config.caption_style == "places" else []),  # only then: earlier tokenizers stay as they were
        CAPTION_REQUEST,
    ]
    return words + phrases
