"""Domain shifts: determinism, the pixel changes each one promises, spec validation and hashing.

.venv/bin/python -m pytest tests/data/test_shifts.py -q -p no:cacheprovider
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from pydantic import ValidationError

from kdray.core.errors import DataError, KdrayError, SpecError
from kdray.data.shifts import SHIFTS, ShiftSpec, build_shift, compose, parse_shifts, rotate, shift_hash

# One valid parameter set per registered shift; a new shift without an entry fails the test below.
EXAMPLES = {
    "rotation": {"degrees": 30},
    "gaussian_noise": {"sigma": 0.2},
    "invert": {},
    "contrast": {"factor": 0.5, "background": 0.2},
    "class_subset": {"classes": [0, 2]},
}
RANDOM = [("gaussian_noise", {"sigma": 0.2}), ("rotation", {"degrees": 45, "random": True})]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(12, 1, 8, 8, generator=g), torch.arange(12) % 3


def blob_centroid(img: torch.Tensor) -> tuple[float, float]:
    """(row, col) centre of mass of a [H, W] image."""
    h, w = img.shape
    rows, cols = torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype)
    total = img.sum()
    return float((img.sum(1) * rows).sum() / total), float((img.sum(0) * cols).sum() / total)


def test_every_shift_has_an_example():
    assert sorted(EXAMPLES) == SHIFTS.names()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_shift_is_deterministic_under_a_seed(name, data):
    x, y = data
    shift = build_shift(name, **EXAMPLES[name])
    (x1, y1), (x2, y2) = shift(x, y, seed=3), shift(x.clone(), y.clone(), seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.min() >= 0 and x1.max() <= 1
    assert not torch.equal(x1, x[: len(x1)]) or name == "class_subset"


@pytest.mark.parametrize("name,params", RANDOM)
def test_random_shifts_depend_on_the_seed(name, params, data):
    x, y = data
    shift = build_shift(name, **params)
    assert not torch.allclose(shift(x, y, seed=0)[0], shift(x, y, seed=1)[0])


@pytest.mark.parametrize("k", [1, 2, -1])
def test_rotation_by_multiples_of_90_matches_rot90(k, data):
    x, y = data
    out, y_out = build_shift("rotation", degrees=90 * k)(x, y, seed=0)
    torch.testing.assert_close(out, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(y_out, y)


def test_rotation_zero_is_identity(data):
    x, y = data
    torch.testing.assert_close(build_shift("rotation", degrees=0)(x, y, 0)[0], x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("h,w", [(16, 16), (16, 24)])
def test_rotation_turns_counter_clockwise_and_rigidly(h, w):
    # A 2x2 blob 5 px right of the centre: a 30° counter-clockwise turn (y up on screen) moves it
    # to (dx, dy_up) = (5 cos 30°, 5 sin 30°); on a non-square image the distance must not change.
    x = torch.zeros(1, 1, h, w)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    x[0, 0, int(cy) : int(cy) + 2, int(cx) + 5 : int(cx) + 7] = 1.0
    r0, c0 = blob_centroid(x[0, 0])
    assert (r0, c0) == pytest.approx((cy, cx + 5))
    out, _ = build_shift("rotation", degrees=30)(x, None, 0)
    r, c = blob_centroid(out[0, 0])
    assert c - cx == pytest.approx(5 * math.cos(math.radians(30)), abs=0.15)
    assert cy - r == pytest.approx(5 * math.sin(math.radians(30)), abs=0.15)


def test_random_rotation_draws_angles_within_the_range():
    x = torch.zeros(32, 1, 16, 16)
    x[:, 0, 7:9, 12:14] = 1.0  # blob at angle 0, radius 5
    out, _ = build_shift("rotation", degrees=60, random=True)(x, None, seed=5)
    angles = []
    for img in out[:, 0]:
        r, c = blob_centroid(img)
        angles.append(math.degrees(math.atan2(7.5 - r, c - 7.5)))
    assert max(abs(a) for a in angles) <= 60 + 2
    assert max(angles) > 20 and min(angles) < -20  # spread over the range, both directions


def test_rotation_fill_sets_the_uncovered_corners():
    x = torch.full((1, 1, 8, 8), 0.5)
    out, _ = build_shift("rotation", degrees=45, fill=1.0)(x, None, 0)
    assert out[0, 0, 0, 0] == pytest.approx(1.0)  # a corner comes from outside the image
    assert out[0, 0, 4, 4] == pytest.approx(0.5)  # the centre stays


def test_rotate_function_on_batch_of_angles():
    x = torch.rand(2, 3, 6, 6)
    out = rotate(x, torch.tensor([90.0, 180.0]))
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(x[1], 2, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_invert_is_exact(data):
    x, y = data
    out, y_out = build_shift("invert")(x, y, 0)
    assert torch.equal(out, 1.0 - x) and torch.equal(y_out, y)
    assert torch.equal(build_shift("invert")(out, y, 0)[0], 1.0 - (1.0 - x))


def test_noise_std_is_sigma_before_clipping():
    x = torch.full((64, 1, 16, 16), 0.5)
    out, _ = build_shift("gaussian_noise", sigma=0.2, clip=False)(x, None, seed=0)
    noise = out - x
    assert noise.std().item() == pytest.approx(0.2, rel=0.03)
    assert abs(noise.mean().item()) < 0.01
    assert out.min() < 0 and out.max() > 1  # not clipped
    clipped, _ = build_shift("gaussian_noise", sigma=0.2)(x, None, seed=0)
    assert clipped.min() == 0 and clipped.max() == 1
    assert torch.equal(clipped, out.clamp(0, 1))  # same noise, then clipped


def test_contrast_blends_toward_the_background():
    x = torch.tensor([0.0, 0.4, 1.0]).view(1, 1, 1, 3)
    out, _ = build_shift("contrast", factor=0.5, background=0.2)(x, None, 0)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.1, 0.3, 0.6]))
    flat, _ = build_shift("contrast", factor=0.0, background=0.7)(x, None, 0)
    torch.testing.assert_close(flat.flatten(), torch.full((3,), 0.7))
    high, _ = build_shift("contrast", factor=2.0, background=0.5)(x, None, 0)
    torch.testing.assert_close(high.flatten(), torch.tensor([0.0, 0.3, 1.0]))  # clamped at both ends


def test_class_subset_filters_rows_and_keeps_labels(data):
    x, y = data
    out, y_out = build_shift("class_subset", classes=[2, 0])(x, y, 0)
    keep = (y == 0) | (y == 2)
    assert torch.equal(out, x[keep]) and torch.equal(y_out, y[keep])
    assert set(y_out.tolist()) == {0, 2}


def test_class_subset_errors(data):
    x, y = data
    with pytest.raises(DataError, match="kept no rows"):
        build_shift("class_subset", classes=[7])(x, y, 0)
    with pytest.raises(DataError, match="needs labels"):
        build_shift("class_subset", classes=[0])(x, None, 0)
    with pytest.raises(SpecError, match=r"'classes' has ids \[12\] outside 0\.\.9"):
        compose([{"name": "class_subset", "classes": [3, 12]}], num_classes=10)


@pytest.mark.parametrize(
    "entry,match",
    [
        ({"name": "rotation", "degree": 30}, r"no parameter 'degree'; did you mean 'degrees'\?"),
        ({"name": "rotation", "degrees": 181}, r"parameter 'degrees' = 181 is invalid: .*less than or equal to 180"),
        ({"name": "rotation", "degrees": -200}, r"parameter 'degrees' = -200"),
        (
            {"name": "gaussian_noise", "sigma": -0.1},
            r"parameter 'sigma' = -0.1 is invalid: .*greater than or equal to 0",
        ),
        ({"name": "contrast", "background": 1.5}, r"parameter 'background' = 1.5"),
        ({"name": "class_subset", "classes": []}, r"parameter 'classes' = \[\] is invalid: .*at least 1 item"),
        ({"name": "class_subset", "classes": [1, 1]}, r"'classes' .* must not repeat"),
        ({"name": "class_subset", "classes": [-1]}, r"parameter 'classes\[0\]' = -1"),
        ({"name": "class_subset"}, r"needs parameter 'classes'"),
        ({"name": "invert", "amount": 1}, r"no parameter 'amount'; it takes no parameters"),
        ({"name": "rotaton"}, r"unknown shift 'rotaton'; did you mean 'rotation'\?"),
    ],
)
def test_bad_params_raise_kdray_error_naming_them(entry, match):
    with pytest.raises(KdrayError, match=match):
        build_shift(entry)


def test_error_lists_the_valid_parameters():
    with pytest.raises(SpecError) as e:
        build_shift({"name": "rotation", "angle": 3})
    assert "degrees=30.0, random=False, fill=0.0" in str(e.value)


def test_shift_spec_accepts_the_flat_yaml_form():
    spec = ShiftSpec.model_validate({"name": "rotation", "degrees": 30})
    assert spec.params == {"degrees": 30.0, "random": False, "fill": 0.0}
    assert spec.model_dump() == {"name": "rotation", "degrees": 30.0, "random": False, "fill": 0.0}
    assert spec.build().degrees == 30.0


def test_shift_spec_reports_errors_through_pydantic():
    with pytest.raises(ValidationError, match="no parameter 'degree'"):
        ShiftSpec.model_validate({"name": "rotation", "degree": 30})
    with pytest.raises(ValidationError, match="outside 0..4"):
        ShiftSpec.model_validate({"name": "class_subset", "classes": [5]}, context={"num_classes": 5})
    ShiftSpec.model_validate({"name": "class_subset", "classes": [4]}, context={"num_classes": 5})


def test_parse_shifts_names_the_failing_entry():
    with pytest.raises(SpecError, match=r"^stages\[1\]\.shifts\[1\]: shift 'gaussian_noise': parameter 'sigma'"):
        parse_shifts([{"name": "invert"}, {"name": "gaussian_noise", "sigma": -1}], where="stages[1].shifts")
    assert [s.name for s in parse_shifts([{"name": "invert"}])] == ["invert"]


def test_compose_applies_in_order_with_independent_seeds(data):
    x, y = data
    a = compose([{"name": "invert"}, {"name": "contrast", "factor": 0.5}])
    b = compose([{"name": "contrast", "factor": 0.5}, {"name": "invert"}])
    torch.testing.assert_close(a(x, y, 0)[0], (1 - x) * 0.5)
    torch.testing.assert_close(b(x, y, 0)[0], 1 - x * 0.5)
    # Two noise steps draw independent noise: the sum has std sigma*sqrt(2), not 2*sigma.
    flat = torch.full((64, 1, 16, 16), 0.5)
    twice = compose([{"name": "gaussian_noise", "sigma": 0.1, "clip": False}] * 2)
    assert (twice(flat, None, 0)[0] - flat).std().item() == pytest.approx(0.1 * math.sqrt(2), rel=0.03)
    assert torch.equal(twice(flat, None, 7)[0], twice(flat, None, 7)[0])
    assert torch.equal(compose([])(x, y, 0)[0], x)


def test_compose_with_subset_then_rotation(data):
    x, y = data
    fn = compose([ShiftSpec(name="class_subset", classes=[1]), {"name": "rotation", "degrees": 90}], num_classes=3)
    out, y_out = fn(x, y, 0)
    assert y_out.tolist() == [1] * 4
    torch.testing.assert_close(out, torch.rot90(x[y == 1], 1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_inputs_must_be_pixel_scale_images(data):
    x, y = data
    with pytest.raises(DataError, match="before normalising"):
        compose([{"name": "invert"}])((x - 0.5) / 0.25, y, 0)
    with pytest.raises(DataError, match="expected float images"):
        build_shift("invert")((x * 255).to(torch.uint8), y, 0)
    with pytest.raises(DataError, match=r"labels have shape \(5,\) but images have 12 rows"):
        build_shift("invert")(x, y[:5], 0)


def test_shift_hash_is_stable_across_spellings_and_changes_with_content():
    h = shift_hash([{"name": "rotation", "degrees": 30}])
    assert h == shift_hash([ShiftSpec(name="rotation", degrees=30.0, random=False)])
    assert h == shift_hash([build_shift("rotation", degrees=30)])
    assert h != shift_hash([{"name": "rotation", "degrees": 31}])
    subset = shift_hash([{"name": "class_subset", "classes": [2, 0]}])
    assert subset == shift_hash([{"name": "class_subset", "classes": [0, 2]}])
    pair = [{"name": "invert"}, {"name": "rotation"}]
    assert shift_hash(pair) != shift_hash(pair[::-1])
    assert len(h) == 64 and int(h, 16) >= 0
    # Pinned canonical form: a change here means cached shifted data would silently change
    # meaning. If it changed on purpose, bump SHIFTS_VERSION and update this literal.
    canonical = b'{"shifts":[{"degrees":30.0,"fill":0.0,"name":"rotation","random":false}],"version":1}'
    assert h == hashlib.sha256(canonical).hexdigest()
