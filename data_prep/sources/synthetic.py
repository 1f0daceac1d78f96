"""The built-in synthetic image-text set: coloured shapes on a plain background, with compositional captions.

Every image is a :class:`Scene` of 1-3 objects (shape, colour, size, texture, box) laid out on a 3x3 grid (at
most one object per cell, so objects never overlap and every object has its own region name). Captions, VQA
questions, NLVR statements, entailment hypotheses, referring expressions and class labels are all *derived* from
the scene, so they are true by construction and a model that reads the image can learn them.

Everything is deterministic: :func:`iter_records` seeds one ``random.Random`` per image from ``(seed, split,
index)`` (string seeds are hashed with SHA-512 by ``random``, independent of ``PYTHONHASHSEED``), so splits never
share images and any image can be regenerated alone.

Domains (:data:`DOMAINS`) change the palette (the RGB value behind each colour name), the background choices and
the texture distribution, never the meaning of a word or of a class: a "red circle" is a red circle everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_prep.sources.base import Record

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black")
# 3x3 grid cells, row-major; the name is what captions and VQA answers use.
REGIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
CLASSES: tuple[str, ...] = SHAPES
ENTAILMENT_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")

PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# Closed answer vocabulary of vqa_questions (a VQA head classifies over it).
VQA_ANSWERS: tuple[str, ...] = (
    ("0", "1", "2", "3", "yes", "no") + COLOURS + SHAPES + REGIONS + SIZES + TEXTURES + BACKGROUNDS
)

# Side of an object's square box as a fraction of the image side. A grid cell is 1/3, so even the largest object
# fits inside its cell with room to jitter, and small and large never overlap in range.
_SIDE = {"small": (0.13, 0.18), "large": (0.26, 0.32)}
_CELL = 1.0 / 3.0

_PLAIN = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 215),
}
_PASTEL = {
    "red": (240, 150, 150),
    "green": (160, 225, 160),
    "blue": (160, 180, 245),
    "yellow": (250, 240, 160),
    "purple": (205, 170, 235),
    "orange": (250, 200, 150),
    "cyan": (170, 235, 240),
}


@dataclasses.dataclass(frozen=True)
class Domain:
    """A visual domain: RGB per colour name, background choices, texture weights, pattern shade."""

    palette: dict[str, tuple[int, int, int]]
    backgrounds: dict[str, tuple[int, int, int]]
    texture_weights: dict[str, float]
    # Stripes and dots are the object colour scaled by this factor, so the object colour still dominates.
    shade: float


DOMAINS: dict[str, Domain] = {
    "plain": Domain(
        palette=_PLAIN,
        backgrounds={"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)},
        texture_weights={"solid": 0.7, "striped": 0.15, "dotted": 0.15},
        shade=0.5,
    ),
    # Pastel colours are too light for a white background; the class and word meanings do not change.
    "pastel": Domain(
        palette=_PASTEL,
        backgrounds={"gray": (95, 95, 95), "black": (30, 30, 30)},
        texture_weights={"solid": 0.7, "striped": 0.15, "dotted": 0.15},
        shade=0.7,
    ),
    "striped": Domain(
        palette=_PLAIN,
        backgrounds={"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)},
        texture_weights={"solid": 0.1, "striped": 0.6, "dotted": 0.3},
        shade=0.5,
    ),
}

Box = tuple[float, float, float, float]


@dataclasses.dataclass
class SceneObject:
    """One shape; ``box`` is ``(x0, y0, x1, y1)`` normalised to [0, 1] (multiply by the image side for pixels)."""

    shape: str
    colour: str
    size: str
    texture: str
    box: Box

    @property
    def region(self) -> str:
        """The 3x3 grid cell holding the box centre."""
        cx = (self.box[0] + self.box[2]) / 2
        cy = (self.box[1] + self.box[3]) / 2
        col = min(2, int(cx / _CELL))
        row = min(2, int(cy / _CELL))
        return REGIONS[row * 3 + col]

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclasses.dataclass
class Scene:
    objects: list[SceneObject]
    background: str
    domain: str = "plain"


# --------------------------------------------------------------------------------------------------- scenes


def _check_domain(domain: str) -> Domain:
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose one of {sorted(DOMAINS)}")
    return DOMAINS[domain]


def sample_scene(rng: random.Random, domain: str = "plain", num_objects: int | None = None) -> Scene:
    """Draw a scene: 1-3 objects in distinct grid cells on a background of the domain.

    With two or more objects exactly one is large, so the largest object (the class label) is always unambiguous.
    """
    spec = _check_domain(domain)
    n = num_objects if num_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= 3:
        raise ValueError(f"num_objects must be 1..3, got {n}")
    cells = rng.sample(range(9), n)
    if n == 1:
        sizes = [rng.choice(SIZES)]
    else:
        sizes = ["small"] * n
        sizes[rng.randrange(n)] = "large"
    textures = list(spec.texture_weights)
    weights = [spec.texture_weights[t] for t in textures]
    objects = []
    for cell, size in zip(cells, sizes):
        side = rng.uniform(*_SIDE[size])
        row, col = divmod(cell, 3)
        x0 = col * _CELL + rng.uniform(0.0, _CELL - side)
        y0 = row * _CELL + rng.uniform(0.0, _CELL - side)
        box = (round(x0, 4), round(y0, 4), round(x0 + side, 4), round(y0 + side, 4))
        objects.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                colour=rng.choice(COLOURS),
                size=size,
                texture=rng.choices(textures, weights)[0],
                box=box,
            )
        )
    background = rng.choice(sorted(spec.backgrounds))
    return Scene(objects=objects, background=background, domain=domain)


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """A JSON-ready dict of the scene (what the shard json and ``{split}_scenes.jsonl`` hold)."""
    return {
        "background": scene.background,
        "domain": scene.domain,
        "objects": [
            {
                "shape": o.shape,
                "colour": o.colour,
                "size": o.size,
                "texture": o.texture,
                "box": list(o.box),
                "region": o.region,
            }
            for o in scene.objects
        ],
    }


def scene_from_dict(data: dict[str, Any]) -> Scene:
    """Inverse of :func:`scene_to_dict`, checking every field so a bad row names what is wrong."""
    try:
        objects = []
        for i, o in enumerate(data["objects"]):
            for key, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("texture", TEXTURES)):
                if o[key] not in vocab:
                    raise ValueError(f"objects[{i}].{key}: {o[key]!r} is not one of {list(vocab)}")
            box = tuple(float(v) for v in o["box"])
            if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise ValueError(f"objects[{i}].box: {o['box']!r} is not a normalised (x0, y0, x1, y1) box")
            objects.append(SceneObject(o["shape"], o["colour"], o["size"], o["texture"], box))  # type: ignore[arg-type]
        scene = Scene(objects=objects, background=data["background"], domain=data.get("domain", "plain"))
    except KeyError as exc:
        raise ValueError(f"scene dict lacks key {exc}") from exc
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"background: {scene.background!r} is not one of {list(BACKGROUNDS)}")
    _check_domain(scene.domain)
    if not scene.objects:
        raise ValueError("scene has no objects")
    return scene


def class_label(scene: Scene) -> str:
    """The shape of the largest object (ties, which sampled scenes never have, go to the first listed)."""
    best = max(range(len(scene.objects)), key=lambda i: (scene.objects[i].area, -i))
    return scene.objects[best].shape


# --------------------------------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, w: int, h: int) -> Image.Image:
    """A binary ``L`` mask of the shape filling a ``w`` x ``h`` box (no anti-aliasing: exact colours)."""
    mask = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mask)
    x1, y1 = w - 1, h - 1
    if shape == "circle":
        d.ellipse((0, 0, x1, y1), fill=255)
    elif shape == "square":
        d.rectangle((0, 0, x1, y1), fill=255)
    elif shape == "triangle":
        d.polygon([(x1 / 2, 0), (x1, y1), (0, y1)], fill=255)
    elif shape == "diamond":
        d.polygon([(x1 / 2, 0), (x1, y1 / 2), (x1 / 2, y1), (0, y1 / 2)], fill=255)
    elif shape == "cross":
        tx, ty = w / 3, h / 3
        d.rectangle((round(tx), 0, round(x1 - tx), y1), fill=255)
        d.rectangle((0, round(ty), x1, round(y1 - ty)), fill=255)
    elif shape == "star":
        r_out = x1 / 2
        r_in = r_out * 0.45
        # A 5-point star spans r_out*(1 + cos 36deg) vertically; centre it in the box.
        cy = (y1 - r_out * (1 + math.cos(math.pi / 5))) / 2 + r_out
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_in
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x1 / 2 + r * math.cos(a), cy + r * math.sin(a)))
        d.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture(texture: str, colour: tuple[int, int, int], shade: float, w: int, h: int, period: int) -> np.ndarray:
    """The fill of an object's box: its colour, with darker stripes or dots in the pattern textures."""
    fill = np.empty((h, w, 3), dtype=np.uint8)
    fill[:] = colour
    if texture == "solid":
        return fill
    dark = tuple(int(c * shade) for c in colour)
    yy, xx = np.mgrid[0:h, 0:w]
    if texture == "striped":
        # Diagonal stripes, a quarter of the period wide, so most of the shape keeps its colour.
        pattern = (xx + yy) % period < max(1, period // 4)
    elif texture == "dotted":
        half = period / 2
        r = max(0.75, period / 5)
        pattern = ((xx % period) + 0.5 - half) ** 2 + ((yy % period) + 0.5 - half) ** 2 <= r * r
    else:
        raise ValueError(f"unknown texture {texture!r}")
    fill[pattern] = dark
    return fill


def pixel_box(box: Box, size: int) -> tuple[int, int, int, int]:
    """The pixel box ``(x0, y0, x1, y1)`` (exclusive end) an object occupies in a ``size`` x ``size`` render."""
    x0, y0 = round(box[0] * size), round(box[1] * size)
    x1, y1 = max(x0 + 1, round(box[2] * size)), max(y0 + 1, round(box[3] * size))
    return x0, y0, min(x1, size), min(y1, size)


def render(scene: Scene, size: int = 128) -> Image.Image:
    """Draw the scene as a ``size`` x ``size`` RGB image; every object's pixels lie inside its pixel box."""
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    spec = _check_domain(scene.domain)
    if scene.background not in spec.backgrounds:
        raise ValueError(f"background {scene.background!r} is not offered by domain {scene.domain!r}")
    canvas = Image.new("RGB", (size, size), spec.backgrounds[scene.background])
    period = max(3, size // 16)
    for obj in scene.objects:
        x0, y0, x1, y1 = pixel_box(obj.box, size)
        w, h = x1 - x0, y1 - y0
        mask = _shape_mask(obj.shape, w, h)
        fill = _texture(obj.texture, spec.palette[obj.colour], spec.shade, w, h, period)
        canvas.paste(Image.fromarray(fill, "RGB"), (x0, y0), mask)
    return canvas


# --------------------------------------------------------------------------------------------------- language


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: SceneObject, attrs: Sequence[str]) -> str:
    """Words for ``obj`` in canonical order (size, texture, colour, shape), without article."""
    words = [getattr(obj, a) for a in ("size", "texture", "colour") if a in attrs]
    return " ".join(words + [obj.shape])


def _describe(obj: SceneObject, rng: random.Random) -> str:
    """A random but true description with article: colour and shape always, size/texture sometimes."""
    attrs = ["colour"]
    if rng.random() < 0.5:
        attrs.append("size")
    if obj.texture != "solid" and rng.random() < 0.6:
        attrs.append("texture")
    return _article(_noun_phrase(obj, attrs))


def _where(region: str) -> str:
    if region == "center":
        return "in the center"
    if " " in region:
        return f"in the {region} corner"
    return {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}[region]


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis that separates them most."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _count_phrase(scene: Scene) -> str:
    counts = Counter(o.shape for o in scene.objects)
    parts = []
    for shape in sorted(counts, key=lambda s: (-counts[s], s)):
        c = counts[shape]
        parts.append(f"{NUMBER_WORDS[c]} {PLURALS[shape]}" if c > 1 else f"one {shape}")
    return _join(parts)


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _t_list(scene: Scene, rng: random.Random) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    text = _join([_describe(o, rng) for o in objs])
    return text + (f" on a {scene.background} background" if rng.random() < 0.5 else "")


def _t_relation(scene: Scene, rng: random.Random) -> str | None:
    if len(scene.objects) < 2:
        return None
    a, b = rng.sample(scene.objects, 2)
    rel = _relation(a, b)
    if rel in ("left of", "right of") and rng.random() < 0.5:
        rel = "to the " + rel
    return f"{_describe(a, rng)} {rel} {_describe(b, rng)}"


def _t_background(scene: Scene, rng: random.Random) -> str:
    obj = rng.choice(scene.objects)
    return f"{_describe(obj, rng)} on a {scene.background} background"


def _t_count(scene: Scene, rng: random.Random) -> str:
    n = len(scene.objects)
    if n == 1:
        return f"a single {scene.objects[0].colour} {scene.objects[0].shape}"
    lead = rng.choice(["", f"{NUMBER_WORDS[n]} shapes: "])
    return lead + _count_phrase(scene)


def _t_position(scene: Scene, rng: random.Random) -> str:
    objs = rng.sample(scene.objects, min(2, len(scene.objects)))
    return _join([f"{_describe(o, rng)} {_where(o.region)}" for o in objs])


def _t_main(scene: Scene, rng: random.Random) -> str:
    largest = max(scene.objects, key=lambda o: o.area)
    lead = rng.choice(["a picture of", "an image showing", "a drawing of"])
    return f"{lead} {_article(_noun_phrase(largest, ['size', 'colour']))}"


def _t_colours(scene: Scene, rng: random.Random) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    noun = rng.choice(["shape", "object"])
    return _join([_article(f"{o.colour} {noun}") for o in objs]) + f" on {scene.background}"


_TEMPLATES = (_t_list, _t_relation, _t_background, _t_count, _t_position, _t_main, _t_colours)


def captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct true captions from different templates (list, relation, background, count, position, ...).

    Every caption names at least one colour or shape of the scene, so image and text always share signal.
    """
    order = list(_TEMPLATES)
    rng.shuffle(order)
    out: list[str] = []
    # Templates first (diverse), then repeat with fresh random wording until there are n distinct captions.
    for attempt in range(20 * n):
        text = order[attempt % len(order)](scene, rng)
        if text is not None and text not in out:
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not write {n} distinct captions for scene {scene_to_dict(scene)}")


# --------------------------------------------------------------------------------------------------- web regime

# Words that web alt-texts carry and no image shows (they say nothing about shapes, colours or places).
DISTRACTOR_WORDS: tuple[str, ...] = (
    "photo", "stock", "image", "free", "hd", "wallpaper", "vector", "illustration", "beautiful", "vintage",
    "design", "art", "download", "closeup", "pattern", "my", "new", "best", "abstract", "style",
)  # fmt: skip
_BOILERPLATE: tuple[str, ...] = (
    "stock photo", "free download", "hd wallpaper", "vector illustration", "royalty free image",
    "for sale online", "high resolution picture", "clip art", "modern design", "seamless pattern",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class WebCaptions:
    """Knobs that turn the exhaustive captions into web-like alt-text (the CC/SBU regime), all rates in [0, 1].

    ``partial``: per caption, the probability it names only one of the objects (a 2-3 object scene loses the rest).
    ``distractor``: per caption, the probability of 1-3 inserted words no image shows ("stock", "hd", ...).
    ``mismatch``: per image, the probability that all its captions describe another, unrelated scene (wrong pairs).
    ``length_spread``: per caption, the probability its length is changed: cut to its first 2+ words or padded
    with boilerplate ("free download hd wallpaper"), so lengths spread the way web captions do.
    """

    partial: float = 0.0
    distractor: float = 0.0
    mismatch: float = 0.0
    length_spread: float = 0.0

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name}: must be in [0, 1], got {value}")

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) > 0 for f in dataclasses.fields(self))


def web_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of image ``index``'s web noise, apart from :func:`image_rng`: the same image and clean
    captions come out whatever the knobs, so two regimes differ only in their captions."""
    return random.Random(f"synthetic/{seed}/{split}/{index}/web")


def _partial_caption(scene: Scene, rng: random.Random) -> str:
    """A true caption that names one object of the scene (web captions rarely list everything)."""
    obj = rng.choice(scene.objects)
    form = rng.randrange(3)
    if form == 0:
        return _describe(obj, rng)
    if form == 1:
        return f"{_describe(obj, rng)} {_where(obj.region)}"
    return f"{rng.choice(['a picture of', 'an image showing', 'a drawing of'])} {_describe(obj, rng)}"


def _with_distractors(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randint(0, len(words)), rng.choice(DISTRACTOR_WORDS))
    return " ".join(words)


def _spread_length(text: str, rng: random.Random) -> str:
    words = text.split()
    if rng.random() < 0.5 and len(words) > 2:
        return " ".join(words[: rng.randint(2, len(words) - 1)])
    return " ".join([text, *rng.sample(_BOILERPLATE, rng.randint(1, 3))])


def web_captions(scene: Scene, clean: Sequence[str], rng: random.Random, web: WebCaptions) -> list[str]:
    """``clean`` captions of ``scene`` turned web-like by ``web``'s rates, drawing only from ``rng``.

    A mismatched image gets the captions of a freshly drawn scene (wrong, but fluent), which then go through the
    same partial/distractor/length noise. Captions stay non-empty; duplicates are allowed (as on the web).
    """
    texts = list(clean)
    if rng.random() < web.mismatch:
        other = sample_scene(rng, domain=scene.domain)
        scene, texts = other, captions(other, rng, n=len(texts))
    out = []
    for text in texts:
        if len(scene.objects) > 1 and rng.random() < web.partial:
            text = _partial_caption(scene, rng)
        if rng.random() < web.distractor:
            text = _with_distractors(text, rng)
        if rng.random() < web.length_spread:
            text = _spread_length(text, rng)
        out.append(text)
    return out


# --------------------------------------------------------------------------------------------------- derivations


def _matches(obj: SceneObject, ref: SceneObject, attrs: Sequence[str]) -> bool:
    return all(getattr(obj, a) == getattr(ref, a) for a in attrs)


_REF_ATTRS: tuple[tuple[str, ...], ...] = (
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
    ("texture", "colour", "shape"),
    ("size", "texture", "colour", "shape"),
)


def referring_expressions(scene: Scene) -> list[tuple[str, Box]]:
    """One expression per object (scene order) that matches no other object, with its normalised box.

    Attribute-only expressions come first (like RefCOCO+); the region is added only when attributes cannot tell
    two objects apart (every object has its own grid cell, so the region always can).
    """
    out = []
    for obj in scene.objects:
        others = [o for o in scene.objects if o is not obj]
        for attrs in _REF_ATTRS:
            if not any(_matches(o, obj, attrs) for o in others):
                out.append(("the " + _noun_phrase(obj, attrs), obj.box))
                break
        else:
            out.append((f"the {_noun_phrase(obj, ('size', 'colour'))} {_where(obj.region)}", obj.box))
    return out


def _unique_by(scene: Scene, attr: str) -> list[SceneObject]:
    counts = Counter(getattr(o, attr) for o in scene.objects)
    return [o for o in scene.objects if counts[getattr(o, attr)] == 1]


def vqa_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Question-answer pairs whose answers are in :data:`VQA_ANSWERS`; yes/no and count-0 questions balanced."""
    qa: list[tuple[str, str]] = []
    shapes = Counter(o.shape for o in scene.objects)
    qa.append(
        (rng.choice(["how many objects are there?", "how many shapes are in the image?"]), str(len(scene.objects)))
    )
    present = rng.choice(sorted(shapes))
    absent = rng.choice([s for s in SHAPES if s not in shapes])
    qa.append((f"how many {PLURALS[present]} are there?", str(shapes[present])))
    qa.append((f"how many {PLURALS[absent]} are there?", "0"))
    for obj in _unique_by(scene, "shape"):
        qa.append((f"what colour is the {obj.shape}?", obj.colour))
        qa.append((f"what size is the {obj.shape}?", obj.size))
    for obj in _unique_by(scene, "colour"):
        qa.append((f"what shape is the {obj.colour} object?", obj.shape))
    # One yes and one no question about a colour+shape pair; the "no" pair changes one attribute of a real object.
    obj = rng.choice(scene.objects)
    qa.append((f"is there a {obj.colour} {obj.shape}?", "yes"))
    pairs = {(o.colour, o.shape) for o in scene.objects}
    while True:
        fake = (rng.choice(COLOURS), obj.shape) if rng.random() < 0.5 else (obj.colour, rng.choice(SHAPES))
        if fake not in pairs:
            break
    qa.append((f"is there a {fake[0]} {fake[1]}?", "no"))
    obj = rng.choice(scene.objects)
    other_texture = rng.choice([t for t in TEXTURES if t != obj.texture])
    ref = dict(referring_expressions(scene))
    expr = next(e for e, b in ref.items() if b == obj.box)
    qa.append((f"is {expr} {obj.texture}?", "yes"))
    qa.append((f"is {expr} {other_texture}?", "no"))
    for expr, box in ref.items():
        region = next(o.region for o in scene.objects if o.box == box)
        qa.append((f"where is {expr}?", region))
    qa.append(("what colour is the background?", scene.background))
    return qa


def _count_word(n: int, shape: str) -> str:
    return f"{NUMBER_WORDS[n]} {shape if n == 1 else PLURALS.get(shape, shape + 's')}"


def nlvr_statements(scene_a: Scene, scene_b: Scene, rng: random.Random, n: int = 4) -> list[tuple[str, bool]]:
    """Statements about the pair (``scene_a`` is the left image), half true and half false, shuffled.

    Candidates mention shapes and colours present in at least one image, so false statements are hard negatives.
    """
    sa = Counter(o.shape for o in scene_a.objects)
    sb = Counter(o.shape for o in scene_b.objects)
    ca = {o.colour for o in scene_a.objects}
    cb = {o.colour for o in scene_b.objects}
    na, nb = len(scene_a.objects), len(scene_b.objects)
    cands: list[tuple[str, bool]] = []
    for s in sorted(set(sa) | set(sb)):
        p = PLURALS[s]
        cands.append((f"the left image has more {p} than the right image", sa[s] > sb[s]))
        cands.append((f"the right image has more {p} than the left image", sb[s] > sa[s]))
        cands.append((f"both images contain a {s}", sa[s] > 0 and sb[s] > 0))
        cands.append((f"only the left image contains a {s}", sa[s] > 0 and sb[s] == 0))
        total = sa[s] + sb[s]
        for k in {total, total + 1, max(1, total - 1)}:
            cands.append((f"the two images contain exactly {_count_word(k, s)} in total", k == total))
    for c in sorted(ca | cb):
        cands.append((f"both images contain a {c} object", c in ca and c in cb))
        cands.append((f"neither image contains a {c} object", c not in ca and c not in cb))
        cands.append((f"only the right image contains a {c} object", c in cb and c not in ca))
    cands.append(("the left image has more objects than the right image", na > nb))
    cands.append(("the right image has more objects than the left image", nb > na))
    cands.append(("both images contain the same number of objects", na == nb))
    for k in (1, 2, 3):
        cands.append((f"the right image contains exactly {_count_word(k, 'object')}", nb == k))
        cands.append((f"the left image contains exactly {_count_word(k, 'object')}", na == k))
    cands.append((f"both images have a {scene_a.background} background", scene_a.background == scene_b.background))
    true = sorted({c for c in cands if c[1]})
    false = sorted({c for c in cands if not c[1]})
    k = min(n // 2, len(true), len(false))
    out = rng.sample(true, k) + rng.sample(false, k)
    rng.shuffle(out)
    return out


_MATERIALS = ("wood", "paper", "metal", "plastic", "glass")
_NEUTRAL = (
    "{e} is made of {m}",
    "{e} was drawn first",
    "{e} is about to move",
    "someone is holding {e}",
    "{e} is heavier than it looks",
)


def entailment(scene: Scene, rng: random.Random, per_label: int = 2) -> list[tuple[str, str]]:
    """Hypotheses about the image labelled entailment / neutral / contradiction, ``per_label`` of each, shuffled.

    Neutral hypotheses give a present object a property no image can show (material, history, intent). The same
    sentences about an object that is *not* in the image are contradictions (its existence is presupposed), so
    telling neutral from contradiction needs the image, not only the wording.
    """
    n = len(scene.objects)
    refs = referring_expressions(scene)
    pairs = {(o.colour, o.shape) for o in scene.objects}
    ent: list[str] = [f"there is {_article(f'{o.colour} {o.shape}')}" for o in scene.objects]
    ent.append(f"there {'is' if n == 1 else 'are'} {_count_word(n, 'shape')} in the image")
    ent.append(f"the background is {scene.background}")
    for a, b in zip(scene.objects, scene.objects[1:]):
        ea, eb = (e for e, box in refs if box in (a.box, b.box))
        ent.append(f"{ea} is {_relation(a, b)} {eb}")
    con: list[str] = []
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
    for c, s in rng.sample(absent, 3):
        con.append(f"there is {_article(f'{c} {s}')}")
        con.append(rng.choice(_NEUTRAL).format(e=f"the {c} {s}", m=rng.choice(_MATERIALS)))
    wrong_n = rng.choice([k for k in (1, 2, 3) if k != n])
    con.append(f"there {'is' if wrong_n == 1 else 'are'} {_count_word(wrong_n, 'shape')} in the image")
    con.append(f"the background is {rng.choice([b for b in BACKGROUNDS if b != scene.background])}")
    for a, b in zip(scene.objects, scene.objects[1:]):
        ea, eb = (e for e, box in refs if box in (a.box, b.box))
        con.append(f"{ea} is {_OPPOSITE[_relation(a, b)]} {eb}")
    neu = [t.format(e=e, m=rng.choice(_MATERIALS)) for e, _ in refs for t in _NEUTRAL]
    out: list[tuple[str, str]] = []
    for label, pool in (("entailment", ent), ("neutral", neu), ("contradiction", con)):
        pool = sorted(set(pool))
        out += [(h, label) for h in rng.sample(pool, min(per_label, len(pool)))]
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------------------------------- records


def image_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of image ``index`` of ``split``: independent per image, different across splits."""
    return random.Random(f"synthetic/{seed}/{split}/{index}")


def make_example(
    seed: int,
    split: str,
    index: int,
    image_size: int = 128,
    domain: str | None = None,
    num_captions: int = 5,
    web: WebCaptions | None = None,
) -> tuple[Scene, list[str], Image.Image]:
    """Scene, captions and rendering of one image; ``domain=None`` draws the domain per image; ``web`` makes the
    captions web-like (:func:`web_captions`) without changing the scene or the image."""
    rng = image_rng(seed, split, index)
    dom = domain if domain is not None else rng.choice(sorted(DOMAINS))
    scene = sample_scene(rng, domain=dom)
    caps = captions(scene, rng, n=num_captions)
    if web is not None and web.active:
        caps = web_captions(scene, caps, web_rng(seed, split, index), web)
    return scene, caps, render(scene, image_size)


def iter_records(
    num_images: int,
    seed: int,
    split: str = "train",
    image_size: int = 128,
    domain: str | None = None,
    num_captions: int = 5,
    web: WebCaptions | None = None,
) -> Iterator[Record]:
    """Yield ``num_images`` records (``data`` is a PIL image) of ``split``, deterministic from ``(seed, split)``;
    ``web`` turns the captions web-like (the images stay the same)."""
    if domain is not None:
        _check_domain(domain)
    if web is not None:
        web.validate()
    for i in range(num_images):
        scene, caps, image = make_example(seed, split, i, image_size, domain, num_captions, web)
        yield Record(
            orig_id=f"synthetic-{split}-{i:07d}",
            captions=caps,
            data=image,
            extra={"scene": scene_to_dict(scene), "split": split, "domain": scene.domain, "label": class_label(scene)},
        )
