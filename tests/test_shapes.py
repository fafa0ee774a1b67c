import numpy as np
import pytest

from tclab.shapes import CLASSES, ShapesConfig, make_shape_image, write_shapes_dataset


def test_deterministic_and_distinct():
    cfg = ShapesConfig()
    a = np.asarray(make_shape_image(cfg, 2, 7))
    assert np.array_equal(a, np.asarray(make_shape_image(cfg, 2, 7)))
    assert not np.array_equal(a, np.asarray(make_shape_image(cfg, 2, 8)))
    assert not np.array_equal(a, np.asarray(make_shape_image(ShapesConfig(seed=2), 2, 7)))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8


def test_object_differs_from_background():
    # The object must be visible: a real fraction of pixels far from the median (background) colour.
    for c in range(len(CLASSES)):
        a = np.asarray(make_shape_image(ShapesConfig(gradient_prob=0.0), c, 0)).astype(float)  # flat background
        far = np.abs(a - np.median(a.reshape(-1, 3), 0)).sum(-1) > 60
        assert 0.03 < far.mean() < 0.6


def test_writes_class_folders_and_refuses_nonempty(tmp_path):
    out = write_shapes_dataset(tmp_path / "s", ShapesConfig(per_class=2), progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(CLASSES)
    assert len(list(out.rglob("*.png"))) == 2 * len(CLASSES)
    with pytest.raises(FileExistsError, match="not empty"):
        write_shapes_dataset(out, ShapesConfig(per_class=2), progress=False)


def test_committed_copy_matches_generator():
    from PIL import Image

    a = np.asarray(Image.open("data/shapes/star/star_0003.png"))
    assert np.array_equal(a, np.asarray(make_shape_image(ShapesConfig(seed=1), CLASSES.index("star"), 3)))
