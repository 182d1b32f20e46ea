"""Synthetic scenes: the embedded default stimulus set (DESIGN.md, "The synthetic world").

A scene is a small scene graph (:class:`SceneSpec`): one background "stuff" class (optionally a second
one below a horizon, e.g. sky above grass) and 1-3 objects ("things", :class:`ObjectSpec`) with a category,
colour, size and position. From the graph we render an RGB image with numpy (supersampled for anti-aliased
edges), write 5 captions of deliberately varying informativeness (full, partial, category-only,
background-only and vague, in shuffled slots so the caption index carries no information) and derive
labels: multi-label ``things`` / ``stuff``, one primary category (the largest object) and a numeric
attribute vector.

Everything is deterministic given a seed: ``make_world(n, seed=s)`` always returns the same images and
captions.

Geometry conventions: object positions ``x`` (left to right) and ``y`` (top to bottom) are in ``[0, 1]``
image units; object size is a radius in image units (``SIZE_RADIUS``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from fmrirecon.errors import ConfigError

# Object categories ("things"). Some are tied to category-selective cortex in the simulated subjects
# (fmrirecon.data.brain): face -> floc-faces, person -> floc-bodies, house/tent -> floc-places,
# sign -> floc-words.
CATEGORIES: tuple[str, ...] = (
    "ball",
    "box",
    "tent",
    "star",
    "cross",
    "donut",
    "pole",
    "bench",
    "face",
    "person",
    "house",
    "sign",
)
# Background classes ("stuff"). Only "sky" sits above a horizon, with a ground class below.
STUFF: tuple[str, ...] = ("sky", "grass", "sand", "water", "wall")
GROUND_STUFF: tuple[str, ...] = ("grass", "sand", "water")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Object radius as a fraction of the image side.
SIZE_RADIUS: dict[str, float] = {"small": 0.10, "medium": 0.15, "large": 0.21}
HORIZON = 0.5  # y of the horizon in two-stuff scenes (sky above, ground below)
SUPERSAMPLE = 3  # sub-pixels per pixel side when rasterising objects

# Attribute vector (scene_attributes): per-category counts, colour presence, size presence, stuff presence,
# number of objects / 3.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    tuple(f"count_{c}" for c in CATEGORIES)
    + tuple(f"colour_{c}" for c in COLOURS)
    + tuple(f"size_{s}" for s in SIZES)
    + tuple(f"stuff_{s}" for s in STUFF)
    + ("n_objects",)
)

VAGUE_CAPTIONS = ("a picture of something", "an image", "a photo", "something", "a blurry picture of a scene")
_STUFF_PHRASE = {
    "sky": ("the sky", "a clear blue sky", "the open sky"),
    "grass": ("grass", "a grassy field", "green grass"),
    "sand": ("sand", "a sandy beach", "the sand"),
    "water": ("water", "calm water", "a lake"),
    "wall": ("a wall", "a brick wall", "an old wall"),
}
_STUFF_PREP = {"sky": "in", "grass": "on", "sand": "on", "water": "on", "wall": "in front of"}
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: category, colour and size names, centre ``(x, y)`` in ``[0, 1]`` image units."""

    category: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[self.size]


@dataclass(frozen=True)
class SceneSpec:
    """Scene graph: ``background`` stuff (whole image, or above the horizon if ``ground`` is set), objects.

    Objects are stored in drawing order (largest first, so small objects stay visible). ``texture_seed``
    picks one of 8 noise variants of the background textures; it changes no label or caption.
    """

    background: str
    objects: tuple[ObjectSpec, ...]
    ground: str | None = None
    texture_seed: int = field(default=0)

    @property
    def stuff(self) -> tuple[str, ...]:
        return (self.background,) if self.ground is None else (self.background, self.ground)

    @property
    def primary_category(self) -> str:
        """Category of the largest object (the first one on ties)."""
        order = sorted(range(len(self.objects)), key=lambda i: -self.objects[i].radius)
        return self.objects[order[0]].category

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SceneSpec:
        objects = tuple(ObjectSpec(**o) for o in d["objects"])
        return cls(d["background"], objects, d.get("ground"), int(d.get("texture_seed", 0)))


# ------------------------------------------------------------------------------------------- sampling
def sample_scene(rng: np.random.Generator) -> SceneSpec:
    """Draw a random scene graph: a background (35 % of scenes: sky over a ground class) and 1–3 objects."""
    if rng.random() < 0.35:
        background, ground = "sky", str(rng.choice(GROUND_STUFF))
    else:
        background, ground = str(rng.choice(STUFF)), None
    n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    objects: list[ObjectSpec] = []
    for _ in range(n_objects):
        size = str(rng.choice(SIZES))
        r = SIZE_RADIUS[size]
        # Rejection sampling keeps objects mostly apart, so every object stays recognisable.
        for _attempt in range(20):
            x, y = rng.uniform(r, 1 - r, size=2)
            if all(np.hypot(x - o.x, y - o.y) > 0.8 * (r + o.radius) for o in objects):
                break
        objects.append(
            ObjectSpec(
                str(rng.choice(CATEGORIES)),
                str(rng.choice(COLOURS)),
                size,
                round(float(x), 4),
                round(float(y), 4),
            )
        )
    objects.sort(key=lambda o: -o.radius)
    return SceneSpec(background, tuple(objects), ground, int(rng.integers(0, 2**31 - 1)))


# ------------------------------------------------------------------------------------------- shapes
def _shape(category: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Silhouette and dark-detail masks of a category in object-local units (radius 1, ``v`` pointing down).

    Returns ``(fill, detail)`` boolean arrays shaped like ``u``; detail pixels (eyes, doors, letters) are
    drawn in a contrasting colour on top of the fill.
    """
    r = np.hypot(u, v)
    none = np.zeros_like(u, dtype=bool)
    if category == "ball":
        return r <= 1.0, none
    if category == "box":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8), none
    if category == "tent":
        return (v <= 0.85) & (np.abs(u) <= (v + 0.95) * 0.55), none
    if category == "star":
        theta = np.arctan2(u, -v)
        return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3, none
    if category == "cross":
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.95)), none
    if category == "donut":
        return (r <= 1.0) & (r >= 0.5), none
    if category == "pole":
        return (np.abs(u) <= 0.2) & (np.abs(v) <= 1.0), none
    if category == "bench":
        seat = (np.abs(u) <= 1.0) & (np.abs(v + 0.1) <= 0.18)
        legs = (np.abs(np.abs(u) - 0.75) <= 0.1) & (v >= -0.1) & (v <= 0.55)
        return seat | legs, none
    if category == "face":
        eyes = np.hypot(np.abs(u) - 0.35, v + 0.25) <= 0.16
        mouth = (np.abs(u) <= 0.45) & (np.abs(v - 0.4) <= 0.09)
        return r <= 1.0, eyes | mouth
    if category == "person":
        head = np.hypot(u, v + 0.7) <= 0.26
        torso = (np.abs(u) <= 0.16) & (v >= -0.45) & (v <= 0.3)
        arms = (np.abs(u) <= 0.65) & (np.abs(v + 0.25) <= 0.1)
        legs = (np.abs(np.abs(u) - (v - 0.3) * 0.6) <= 0.12) & (v >= 0.3) & (v <= 1.0)
        return head | torso | arms | legs, none
    if category == "house":
        body = (np.abs(u) <= 0.7) & (v >= -0.1) & (v <= 0.9)
        roof = (v < -0.1) & (v >= -0.95) & (np.abs(u) <= (v + 0.95) * 1.05)
        door = (np.abs(u) <= 0.17) & (v >= 0.4) & (v <= 0.9)
        return body | roof, door
    if category == "sign":
        plate = (np.abs(u) <= 0.95) & (np.abs(v) <= 0.6)
        letters = (np.abs(u) <= 0.75) & (
            (np.abs(v + 0.28) <= 0.09) | (np.abs(v) <= 0.09) | ((np.abs(v - 0.28) <= 0.09) & (u <= 0.2))
        )
        return plate, letters
    raise ConfigError(f"unknown object category {category!r}; expected one of {CATEGORIES}")


def shape_coverage(category: str, radius_px: float, canvas: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased silhouette of ``category`` centred in a ``(canvas, canvas)`` float32 image in ``[0, 1]``.

    Used by the simulated subjects' category matched filters (fmrirecon.data.brain).
    """
    n = canvas * supersample
    coords = (np.arange(n) + 0.5) / supersample - canvas / 2
    v, u = np.meshgrid(coords / radius_px, coords / radius_px, indexing="ij")
    fill, _ = _shape(category, u, v)
    return fill.reshape(canvas, supersample, canvas, supersample).mean(axis=(1, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=64)
def _stuff_texture(stuff: str, image_size: int, variant: int) -> np.ndarray:
    """Texture of one stuff class, float32 ``(S, S, 3)`` in [0, 255]; ``variant`` picks one of 8 noises."""
    s = image_size
    rng = np.random.default_rng([STUFF.index(stuff), variant, s])
    yy, xx = np.meshgrid(np.linspace(0, 1, s), np.linspace(0, 1, s), indexing="ij")
    noise = rng.standard_normal((s, s))
    if stuff == "sky":
        top, bottom = np.array([90, 150, 235]), np.array([190, 220, 250])
        img = top + (bottom - top) * yy[..., None] + 4 * noise[..., None]
    elif stuff == "grass":
        streaks = np.repeat(rng.standard_normal((1, s)), s, axis=0) * 0.6 + noise * 0.5
        img = np.array([70, 140, 50]) + 25 * streaks[..., None] * np.array([0.6, 1.0, 0.4])
    elif stuff == "sand":
        img = np.array([215, 190, 135]) + 14 * noise[..., None]
    elif stuff == "water":
        waves = np.sin(2 * np.pi * (yy * s / 6.0 + 0.15 * np.sin(2 * np.pi * xx * 2)) + rng.uniform(0, 6.3))
        img = np.array([30, 90, 150]) + 22 * waves[..., None] * np.array([0.5, 0.8, 1.0])
        img = img + 4 * noise[..., None]
    elif stuff == "wall":
        brick_h = max(2, s // 8)
        row = (np.arange(s) // brick_h)[:, None]
        col = (np.arange(s)[None, :] + (row % 2) * brick_h) // (2 * brick_h)
        mortar = (np.arange(s)[:, None] % brick_h == 0) | (
            (np.arange(s)[None, :] + (row % 2) * brick_h) % (2 * brick_h) == 0
        )
        n_bricks = s // brick_h + 2
        shade = np.random.default_rng([9, variant, s]).normal(0, 12, size=(n_bricks, n_bricks))
        img = np.array([160, 75, 55]) + shade[row, col][..., None]
        img = np.where(mortar[..., None], np.array([200, 195, 185]), img)
    else:
        raise ConfigError(f"unknown stuff class {stuff!r}; expected one of {STUFF}")
    return np.clip(img, 0, 255).astype(np.float32)


def _detail_rgb(colour: str) -> np.ndarray:
    rgb = np.array(COLOUR_RGB[colour], dtype=np.float32)
    # Dark details on light objects, light details on dark ones, so eyes/doors/letters are always visible.
    return np.full(3, 20.0 if rgb @ [0.299, 0.587, 0.114] > 90 else 230.0, dtype=np.float32)


def render_scene(spec: SceneSpec, image_size: int = 64) -> np.ndarray:
    """Rasterise a scene graph. Returns ``uint8 (image_size, image_size, 3)``.

    Objects are drawn in spec order with anti-aliased edges (``SUPERSAMPLE``² sub-pixels per pixel).
    """
    if image_size < 8:
        raise ConfigError(f"image_size must be >= 8 pixels, got {image_size}")
    s = image_size
    variant = spec.texture_seed % 8
    img = _stuff_texture(spec.background, s, variant).copy()
    if spec.ground is not None:
        h = int(round(HORIZON * s))
        img[h:] = _stuff_texture(spec.ground, s, variant)[h:]
    ss = SUPERSAMPLE
    for obj in spec.objects:
        r_px = obj.radius * s
        x0, x1 = max(0, int(np.floor(obj.x * s - r_px - 1))), min(s, int(np.ceil(obj.x * s + r_px + 1)))
        y0, y1 = max(0, int(np.floor(obj.y * s - r_px - 1))), min(s, int(np.ceil(obj.y * s + r_px + 1)))
        if x1 <= x0 or y1 <= y0:
            continue
        ys = (np.arange(y0 * ss, y1 * ss) + 0.5) / ss
        xs = (np.arange(x0 * ss, x1 * ss) + 0.5) / ss
        v, u = np.meshgrid((ys - obj.y * s) / r_px, (xs - obj.x * s) / r_px, indexing="ij")
        fill, detail = _shape(obj.category, u, v)
        hh, ww = y1 - y0, x1 - x0
        a_fill = fill.reshape(hh, ss, ww, ss).mean(axis=(1, 3))[..., None]
        a_detail = (fill & detail).reshape(hh, ss, ww, ss).mean(axis=(1, 3))[..., None]
        patch = img[y0:y1, x0:x1]
        colour = np.array(COLOUR_RGB[obj.colour], dtype=np.float32)
        patch = patch * (1 - a_fill) + colour * a_fill
        patch = patch * (1 - a_detail) + _detail_rgb(obj.colour) * a_detail
        img[y0:y1, x0:x1] = patch
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- captions
def _object_phrase(obj: ObjectSpec, with_size: bool = True, with_colour: bool = True) -> str:
    words = ([obj.size] if with_size else []) + ([obj.colour] if with_colour else []) + [obj.category]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _relation(a: ObjectSpec, b: ObjectSpec) -> str:
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def _plural(category: str) -> str:
    return category + ("es" if category.endswith(("x", "ch")) else "s")


def _stuff_phrase(spec: SceneSpec, rng: np.random.Generator) -> str:
    if spec.ground is None:
        return str(rng.choice(_STUFF_PHRASE[spec.background]))
    return f"{rng.choice(_STUFF_PHRASE[spec.ground])} under {rng.choice(_STUFF_PHRASE['sky'])}"


def _place_phrase(spec: SceneSpec, rng: np.random.Generator) -> str:
    stuff = spec.ground or spec.background
    return f"{_STUFF_PREP[stuff]} {_stuff_phrase(spec, rng)}"


def caption_scene(spec: SceneSpec, rng: np.random.Generator) -> list[str]:
    """Five captions of decreasing informativeness, in shuffled order.

    Kinds: full (every object with size/colour, a spatial relation, the background), partial (one object
    with its colour), category-only (object categories and counts), background-only, and vague
    ("a picture of something").
    """
    objs = spec.objects
    # full: relation between the two first-drawn objects, the third one appended.
    if len(objs) == 1:
        full = f"{_object_phrase(objs[0])} {_place_phrase(spec, rng)}"
    else:
        full = f"{_object_phrase(objs[1])} {_relation(objs[1], objs[0])} {_object_phrase(objs[0])}"
        if len(objs) == 3:
            full += f" and {_object_phrase(objs[2])}"
        full += f" {_place_phrase(spec, rng)}"
    partial = _object_phrase(objs[int(rng.integers(len(objs)))], with_size=False)
    counts: dict[str, int] = {}
    for o in objs:
        counts[o.category] = counts.get(o.category, 0) + 1
    parts = [
        f"{_NUMBER_WORDS[n]} {_plural(c)}" if n > 1 else ("an " if c[0] in "aeiou" else "a ") + c
        for c, n in sorted(counts.items())
    ]
    category_only = " and ".join(parts)
    lead = str(rng.choice(["a view of ", "a scene with ", "", "a photo of "]))
    background_only = lead + _stuff_phrase(spec, rng)
    vague = str(rng.choice(VAGUE_CAPTIONS))
    captions = [full, partial, category_only, background_only, vague]
    rng.shuffle(captions)
    return captions


# ------------------------------------------------------------------------------------------- labels
def scene_attributes(spec: SceneSpec) -> np.ndarray:
    """Numeric attribute vector of a scene, float32 ``(A,)`` with names ``ATTRIBUTE_NAMES``."""
    counts = np.zeros(len(CATEGORIES), np.float32)
    colours = np.zeros(len(COLOURS), np.float32)
    sizes = np.zeros(len(SIZES), np.float32)
    stuff = np.zeros(len(STUFF), np.float32)
    for o in spec.objects:
        counts[CATEGORIES.index(o.category)] += 1
        colours[COLOURS.index(o.colour)] = 1
        sizes[SIZES.index(o.size)] = 1
    for s in spec.stuff:
        stuff[STUFF.index(s)] = 1
    return np.concatenate([counts, colours, sizes, stuff, [len(spec.objects) / 3]]).astype(np.float32)


@dataclass
class World:
    """A generated set of scenes.

    Attributes:
        images: uint8 ``(N, H, W, 3)``.
        specs: the N scene graphs.
        captions: N lists of 5 captions.
        things: bool ``(N, len(CATEGORIES))`` — category present in the image.
        stuff: bool ``(N, len(STUFF))`` — background class present.
        primary_category: int ``(N,)`` — index into ``CATEGORIES`` of the largest object.
        attributes: float32 ``(N, len(ATTRIBUTE_NAMES))``.
    """

    images: np.ndarray
    specs: list[SceneSpec]
    captions: list[list[str]]
    things: np.ndarray
    stuff: np.ndarray
    primary_category: np.ndarray
    attributes: np.ndarray
    seed: int = 0

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])


def labels_from_specs(specs: list[SceneSpec]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(things bool (N,C), stuff bool (N,S), primary_category int (N,), attributes float32 (N,A))``."""
    if not specs:
        attributes = np.zeros((0, len(ATTRIBUTE_NAMES)), np.float32)
    else:
        attributes = np.stack([scene_attributes(s) for s in specs])
    nc, ncol, ns = len(CATEGORIES), len(COLOURS), len(SIZES)
    things = attributes[:, :nc] > 0
    stuff = attributes[:, nc + ncol + ns : nc + ncol + ns + len(STUFF)] > 0
    primary = np.array([CATEGORIES.index(s.primary_category) for s in specs], dtype=np.int64)
    return things, stuff, primary, attributes.astype(np.float32)


def make_world(n_images: int, image_size: int = 64, seed: int = 0, progress: bool = False) -> World:
    """Generate ``n_images`` scenes deterministically from ``seed``."""
    if n_images < 0:
        raise ConfigError(f"n_images must be >= 0, got {n_images}")
    rng = np.random.default_rng(seed)
    specs = [sample_scene(rng) for _ in range(n_images)]
    caption_rng = np.random.default_rng([seed, 1])
    captions = [caption_scene(s, caption_rng) for s in specs]
    images = np.empty((n_images, image_size, image_size, 3), np.uint8)
    for i, spec in enumerate(tqdm(specs, desc="rendering scenes", disable=not progress)):
        images[i] = render_scene(spec, image_size)
    things, stuff, primary, attributes = labels_from_specs(specs)
    return World(images, specs, captions, things, stuff, primary, attributes, seed)
