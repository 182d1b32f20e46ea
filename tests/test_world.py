"""Synthetic scenes: determinism, variety, captions and labels consistent with the scene graph."""

import numpy as np
import pytest

from fmrirecon.data import world as W
from fmrirecon.errors import ConfigError


@pytest.fixture(scope="module")
def world():
    return W.make_world(400, image_size=32, seed=11)


def test_vocabulary_sizes_meet_the_spec():
    assert len(W.CATEGORIES) >= 8 and len(W.STUFF) >= 4 and len(W.COLOURS) >= 6
    assert len(set(W.CATEGORIES)) == len(W.CATEGORIES)
    # Distinct palette entries, so colour is recoverable from pixels.
    assert len({W.COLOUR_RGB[c] for c in W.COLOURS}) == len(W.COLOURS)


def test_same_seed_same_world_other_seed_other_world():
    a, b = W.make_world(25, seed=3), W.make_world(25, seed=3)
    c = W.make_world(25, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and a.specs == b.specs
    assert not np.array_equal(a.images, c.images)
    assert a.specs != c.specs


def test_shapes_and_dtypes(world):
    n = len(world)
    assert world.images.shape == (n, 32, 32, 3) and world.images.dtype == np.uint8
    assert world.things.shape == (n, len(W.CATEGORIES)) and world.things.dtype == bool
    assert world.stuff.shape == (n, len(W.STUFF)) and world.stuff.dtype == bool
    assert world.primary_category.shape == (n,)
    assert world.attributes.shape == (n, len(W.ATTRIBUTE_NAMES))
    assert world.image_size == 32


def test_world_uses_all_categories_colours_sizes_and_stuff(world):
    objects = [o for s in world.specs for o in s.objects]
    assert {o.category for o in objects} == set(W.CATEGORIES)
    assert {o.colour for o in objects} == set(W.COLOURS)
    assert {o.size for o in objects} == set(W.SIZES)
    assert {st for s in world.specs for st in s.stuff} == set(W.STUFF)
    counts = np.bincount([len(s.objects) for s in world.specs], minlength=4)
    assert counts[0] == 0 and (counts[1:] > 0).all()


def test_five_captions_with_a_vague_one_in_varying_slots(world):
    vague_slots = set()
    for caps in world.captions:
        assert len(caps) == 5 and all(isinstance(c, str) and c for c in caps)
        vague = [i for i, c in enumerate(caps) if c in W.VAGUE_CAPTIONS]
        assert len(vague) >= 1
        vague_slots.update(vague)
    # Shuffled slots: the caption index must not tell which caption is vague.
    assert vague_slots == set(range(5))


def _category_words(caption: str) -> set[str]:
    words = set()
    for w in caption.split():
        for c in W.CATEGORIES:
            if w in (c, c + "s", c + "es"):
                words.add(c)
    return words


def test_captions_follow_the_scene_graph(world):
    for spec, caps in zip(world.specs, world.captions):
        present = {o.category for o in spec.objects}
        # Informativeness varies: one caption names every object with its size and colour ...
        full = [c for c in caps if all(f"{o.size} {o.colour} {o.category}" in c for o in spec.objects)]
        assert len(full) == 1 and _category_words(full[0]) == present
        # ... the others name fewer details, and never a category that is not in the image.
        for c in caps:
            assert _category_words(c) <= present, (c, spec)
        assert sum(not _category_words(c) for c in caps) >= 2  # background-only and vague captions


def test_labels_match_the_scene_graph(world):
    for i, spec in enumerate(world.specs):
        cats = {o.category for o in spec.objects}
        assert set(np.array(W.CATEGORIES)[world.things[i]]) == cats
        assert set(np.array(W.STUFF)[world.stuff[i]]) == set(spec.stuff)
        largest = max(o.radius for o in spec.objects)
        largest_categories = {o.category for o in spec.objects if o.radius == largest}
        assert W.CATEGORIES[world.primary_category[i]] in largest_categories
        n_cat = len(W.CATEGORIES)
        assert world.attributes[i, :n_cat].sum() == len(spec.objects)
    # Some scenes have two stuff classes (sky above a ground class): stuff is multi-label.
    assert (world.stuff.sum(1) == 2).any() and (world.stuff.sum(1) == 1).any()


def test_render_draws_the_object_colour_at_its_centre():
    obj = W.ObjectSpec("ball", "red", "large", 0.5, 0.5)
    img = W.render_scene(W.SceneSpec("grass", (obj,)), image_size=48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    np.testing.assert_allclose(img[24, 24], W.COLOUR_RGB["red"], atol=2)
    # Far from the object the background is green grass.
    assert img[2, 2, 1] > img[2, 2, 0] and img[2, 2, 1] > img[2, 2, 2]


def test_categories_render_differently_at_the_same_place():
    def render(category):
        obj = W.ObjectSpec(category, "black", "large", 0.5, 0.5)
        return W.render_scene(W.SceneSpec("sky", (obj,)), 64).astype(float)

    renders = {c: render(c) for c in W.CATEGORIES}
    names = list(renders)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(renders[a] - renders[b]).mean() > 1.0, (a, b)


def test_spec_dict_round_trip_renders_identically(world):
    spec = world.specs[5]
    rebuilt = W.SceneSpec.from_dict(spec.to_dict())
    assert rebuilt == spec
    np.testing.assert_array_equal(W.render_scene(rebuilt, 32), world.images[5])


def test_image_size_is_configurable():
    small, large = W.make_world(3, image_size=24, seed=0), W.make_world(3, image_size=80, seed=0)
    assert small.images.shape[1:] == (24, 24, 3) and large.images.shape[1:] == (80, 80, 3)
    assert small.specs == large.specs


def test_bad_inputs_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown object category"):
        W.render_scene(W.SceneSpec("sky", (W.ObjectSpec("dragon", "red", "small", 0.5, 0.5),)))
    with pytest.raises(ConfigError, match="image_size"):
        W.render_scene(W.sample_scene(np.random.default_rng(0)), image_size=4)
    with pytest.raises(ConfigError, match="n_images"):
        W.make_world(-1)
