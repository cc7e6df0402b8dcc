"""Shapes world: determinism, vocabularies, dataset names, caption/factor agreement, pixels."""
import numpy as np
import pytest

from etl.world import shapes
from etl.world.shapes import FACTORS

SIZE = 64


def _color_mask(img: np.ndarray, color: str, tol: float = 30.0) -> np.ndarray:
    """Pixels within `tol` (RGB distance) of a named colour: bool [S, S]."""
    ref = np.array(shapes.COLOR_RGB[color], np.float32)
    return np.linalg.norm(img.astype(np.float32) - ref, axis=2) < tol


# ----------------------------------------------------------------------------- vocabularies

def test_factor_vocabularies_meet_the_spec():
    assert len(FACTORS["shape"]) >= 6
    assert len(FACTORS["color"]) >= 8
    assert FACTORS["size"] == ["small", "large"]
    assert len(FACTORS["position"]) == 9
    assert {"top left", "center", "bottom right"} <= set(FACTORS["position"])
    assert FACTORS["count"] == ["1", "2", "3", "4"]
    assert {"solid", "striped", "dotted"} <= set(FACTORS["pattern"])
    assert len(FACTORS["background"]) >= 5
    assert {"sky", "grass", "water", "striped", "dotted"} <= set(FACTORS["background"])
    for name, values in FACTORS.items():
        assert len(set(values)) == len(values), name


def test_every_factor_value_occurs():
    seen = {k: set() for k in FACTORS}
    for s in shapes.generate(400, seed=3):
        for k, v in s.factors.items():
            seen[k].add(v)
    for k in FACTORS:
        assert seen[k] == set(FACTORS[k]), k


# ----------------------------------------------------------------------------- determinism

def test_same_seed_and_index_give_identical_scenes():
    a = shapes.scene(17, seed=5)
    b = shapes.scene(17, seed=5)
    assert a.image.dtype == np.uint8 and a.image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(a.image, b.image)
    assert a.factors == b.factors and a.caption == b.caption


def test_scene_regenerates_alone_and_in_any_order():
    listed = list(shapes.generate(12, seed=9))
    for i in (11, 0, 6):
        alone = shapes.scene(i, seed=9)
        assert np.array_equal(alone.image, listed[i].image)
        assert alone.factors == listed[i].factors and alone.caption == listed[i].caption
    offset = list(shapes.generate(3, seed=9, start=6))
    assert [s.index for s in offset] == [6, 7, 8]
    assert np.array_equal(offset[0].image, listed[6].image)


def test_different_seeds_and_indices_differ():
    a = np.stack([s.image for s in shapes.generate(20, seed=0)])
    b = np.stack([s.image for s in shapes.generate(20, seed=1)])
    assert not any(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({s.image.tobytes() for s in shapes.generate(50, seed=0)}) == 50


def test_other_sizes_and_batch():
    s = shapes.scene(0, 0, size=128)
    assert s.image.shape == (128, 128, 3)
    imgs, facts, caps = shapes.batch(range(4), seed=2)
    assert imgs.shape == (4, SIZE, SIZE, 3) and len(facts) == 4 and len(caps) == 4
    assert np.array_equal(imgs[3], shapes.scene(3, 2).image)


def test_fixed_factors_and_bad_input():
    for s in shapes.generate(30, seed=4, count="1", color="blue"):
        assert s.factors["count"] == "1" and s.factors["color"] == "blue"
    with pytest.raises(ValueError, match="expected one of"):
        shapes.scene(0, 0, color="magenta")
    with pytest.raises(ValueError, match="unknown factor"):
        shapes.scene(0, 0, mood="happy")
    with pytest.raises(ValueError):
        shapes.scene(-1, 0)
    with pytest.raises(ValueError):
        shapes.scene(0, 0, size=8)


# ----------------------------------------------------------------------------- dataset names

def test_parse_dataset_name():
    assert shapes.parse_dataset_name("shapes:2000:seed=0") == (2000, 0)
    assert shapes.parse_dataset_name("shapes:5:seed=42") == (5, 42)
    assert shapes.parse_dataset_name("shapes:300") == (300, 0)
    assert shapes.parse_dataset_name(shapes.dataset_name(77, 3)) == (77, 3)
    for bad in ["shapes", "shapes:", "shapes:abc", "shapes:0:seed=1", "shapes:10:seed=x",
                "imagenet:10", "shapes:10:sed=1", "", None]:
        with pytest.raises(ValueError, match="shapes"):
            shapes.parse_dataset_name(bad)


# ----------------------------------------------------------------------------- captions

_NUM = {"two": "2", "three": "3", "four": "4"}


def _mentions(caption: str) -> dict[str, set]:
    """Which value(s) of each factor a caption names."""
    c = " " + caption.lower().replace(",", " ") + " "
    out = {k: set() for k in FACTORS}
    for bg, phrases in shapes._BG_PHRASES.items():
        for ph in sorted(phrases, key=len, reverse=True):
            if ph in c:
                out["background"].add(bg)
                c = c.replace(ph, " ")
    for pos in sorted(FACTORS["position"], key=len, reverse=True):
        if f" the {pos} " in c or f" the {pos} corner" in c:
            out["position"].add(pos)
            c = c.replace(pos, " ")
    words = c.split()
    for shape, plural in shapes._PLURAL.items():
        if shape in words or plural in words:
            out["shape"].add(shape)
    for k in ("color", "size"):
        out[k] = {v for v in FACTORS[k] if v in words}
    for pat, ws in shapes._PATTERN_WORDS.items():
        if any(w in words for w in ws):
            out["pattern"].add(pat)
    for w, n in _NUM.items():
        if w in words:
            out["count"].add(n)
    if "one" in words or "single" in words:
        out["count"].add("1")
    return out


def test_full_captions_name_every_factor_correctly():
    for s in shapes.generate(300, seed=11, partial_prob=0.0):
        m = _mentions(s.caption)
        for k, v in s.factors.items():
            if k == "count" and v == "1" and not m["count"]:
                # "a small red circle": the article names the count; no number word at all
                assert not (m["count"] - {"1"}), s.caption
                continue
            assert m[k] == {v}, (k, v, s.caption)


def test_partial_captions_never_name_a_wrong_value():
    n_partial = 0
    for s in shapes.generate(400, seed=12, partial_prob=1.0):
        m = _mentions(s.caption)
        named = [k for k in FACTORS if m[k]]
        assert named or " shape" in s.caption or " object" in s.caption, s.caption
        for k in named:
            assert m[k] == {s.factors[k]}, (k, s.factors[k], s.caption)
        n_partial += len(named) < len(FACTORS)
        if s.factors["count"] != "1" and m["count"]:      # a plural noun after "two" ...
            plural = shapes._PLURAL[s.factors["shape"]] if m["shape"] else None
            assert (plural in s.caption.split()) if plural else (
                "shapes" in s.caption.split() or "objects" in s.caption.split()), s.caption
    assert n_partial > 300     # partial captions really leave factors out


def test_captions_vary():
    caps = [s.caption for s in shapes.generate(200, seed=13)]
    assert len(set(caps)) > 190
    starts = {c.split()[0] for c in caps}
    assert len(starts) >= 5       # several templates, not one


def test_example_caption_from_the_issue():
    f = dict(shape="circle", color="red", size="small", position="top left", count="2",
             pattern="solid", background="striped")
    np_ = shapes.noun_phrase({**f, "pattern": None}, 0)
    assert np_ == "two small red circles"
    assert shapes.position_phrase("top left", 0) == "in the top left"


# ----------------------------------------------------------------------------- pixels

def test_object_colour_is_in_the_named_cell():
    for s in shapes.generate(300, seed=21):
        mask = _color_mask(s.image, s.factors["color"])
        assert mask.sum() >= 8, s.factors
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = shapes._cell_bounds(s.factors["position"], SIZE)
        # the fill colour appears inside the named cell ...
        assert mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))].sum() > 0, s.factors
        # ... and the centre of the coloured pixels lies in it
        assert shapes.cell_of(ys.mean() + 0.5, xs.mean() + 0.5, SIZE) == s.factors["position"], s.factors
        # the recorded object centres agree with the factor record
        cy = np.mean([c[0] for c in s.centers])
        cx = np.mean([c[1] for c in s.centers])
        assert shapes.cell_of(cy, cx, SIZE) == s.factors["position"]
        assert len(s.centers) == int(s.factors["count"])


def test_solid_objects_count_as_connected_components():
    from skimage.measure import label
    ok = total = 0
    for s in shapes.generate(300, seed=22, pattern="solid"):
        mask = _color_mask(s.image, s.factors["color"])
        n = label(mask, connectivity=2).max()   # 8-connected: star tips join diagonally
        total += 1
        ok += int(n == int(s.factors["count"]))
    assert ok / total >= 0.98, (ok, total)   # large diamonds may touch tip to tip


def test_large_objects_are_larger_than_small_ones():
    area = {}
    for s in shapes.generate(300, seed=23, count="1", pattern="solid"):
        a = int(_color_mask(s.image, s.factors["color"]).sum())
        area.setdefault((s.factors["shape"], s.factors["size"]), []).append(a)
    for shape in FACTORS["shape"]:
        assert max(area[(shape, "small")]) < min(area[(shape, "large")]), shape


def test_backgrounds_are_distinct():
    mean = {}
    for bg in FACTORS["background"]:
        imgs = np.stack([s.image for s in shapes.generate(10, seed=24, background=bg)])
        mean[bg] = (imgs.reshape(-1, 3).mean(0), imgs.std())
    assert mean["white"][0].min() > 200 and mean["black"][0].max() < 60
    assert mean["sky"][0][2] > mean["sky"][0][0] + 50          # blue dominates the sky
    assert mean["grass"][0][1] > mean["grass"][0][0] + 30      # green dominates the grass
    assert mean["water"][0][2] > mean["water"][0][1]           # water is blue
    # the textured ones are textured
    for bg in ("striped", "dotted", "grass", "water"):
        img = shapes.scene(0, 24, background=bg, count="1", fix={"size": "small"}).image.astype(float)
        assert img[:, :, 1].std() > 10, bg


def test_generator_speed():
    # one core (CPU time, so other work on a shared machine does not count), training size;
    # the product target (make bench) is >= 2,000 images/s, asserted with slack for slow CI
    assert shapes.bench_shapes(n=400) > 1000
    with pytest.raises(ValueError):
        shapes.bench_shapes(n=1, clock="sundial")


def test_fix_dict_fixes_the_size_factor():
    for i in range(10):
        s = shapes.scene(i, 25, size=SIZE, fix={"size": "large", "count": "2"})
        assert s.factors["size"] == "large" and s.factors["count"] == "2"
        assert s.image.shape == (SIZE, SIZE, 3)


def test_factor_captions_name_one_factor_only():
    for factor, values in FACTORS.items():
        for v in values:
            for variant in range(12):
                cap = shapes.factor_caption(factor, v, variant)
                m = _mentions(cap)
                assert m[factor] == {v} or (factor == "count" and v == "1" and not m["count"]), cap
                assert not any(m[k] for k in FACTORS if k != factor), cap
    with pytest.raises(ValueError):
        shapes.factor_caption("color", "plaid")


def test_named_factors_match_the_caption():
    for s in shapes.generate(300, seed=14):
        m = _mentions(s.caption)
        stated = {k for k in FACTORS if m[k]}
        # count "1" may be stated by the article alone ("a red circle")
        assert stated - {"count"} == set(s.named) - {"count"}, (s.caption, s.named)


def test_single_objects_sit_on_the_patch_lattice_inside_their_cell():
    pitch = SIZE / shapes.SNAP
    for s in shapes.generate(200, seed=26, count="1"):
        (cy, cx), = s.centers
        assert (cy / pitch - 0.5) % 1 == 0 and (cx / pitch - 0.5) % 1 == 0, s.centers
        assert shapes.cell_of(cy, cx, SIZE) == s.factors["position"]
    # groups keep their continuous jitter
    ys = {round(s.centers[0][0] % pitch, 3) for s in shapes.generate(100, seed=26, count="3")}
    assert len(ys) > 5
