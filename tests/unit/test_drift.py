"""The drift gate's statistics against closed forms, and its decision rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from imagegen.config import DriftConfig
from imagegen.data import drift


def test_psi_of_two_two_bin_histograms_is_a_quarter_of_ln3():
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5 = 0.25 ln 3
    assert drift.psi(np.array([50, 50]), np.array([25, 75])) == pytest.approx(0.25 * math.log(3))
    assert drift.psi(np.array([25, 75]), np.array([50, 50])) == pytest.approx(0.25 * math.log(3))  # symmetric
    assert drift.psi(np.array([3, 7, 0]), np.array([30, 70, 0])) == 0.0  # counts or shares alike


def test_psi_stays_finite_when_a_bin_empties():
    value = drift.psi(np.array([100, 0]), np.array([0, 100]), eps=1e-4)
    # shares clipped to 1e-4: 2 * (1 - 1e-4) ln(1 / 1e-4)
    assert value == pytest.approx(2 * (1 - 1e-4) * math.log(1e4))


def test_ks_is_the_largest_cdf_gap():
    uniform_low = np.r_[np.ones(10), np.zeros(5)]  # uniform on bins 0..9
    uniform_high = np.r_[np.zeros(5), np.ones(10)]  # uniform on bins 5..14
    assert drift.ks(uniform_low, uniform_high) == pytest.approx(0.5)
    assert drift.ks(np.array([1, 0, 0]), np.array([0, 0, 1])) == 1.0
    assert drift.ks(np.array([2, 2]), np.array([5, 5])) == 0.0


def test_total_variation_of_one_class_dropped_from_ten_balanced():
    assert drift.total_variation(np.full(10, 100), np.r_[np.full(9, 100), 0]) == pytest.approx(0.1)
    assert drift.total_variation(np.array([1, 0]), np.array([0, 1])) == 1.0


def test_relative_frechet_of_isotropic_gaussians():
    d, m, s = 8, 0.5, 2.0
    mu1, mu2 = np.zeros(d), np.full(d, m)
    # ||mu1 - mu2||^2 + tr(I + s^2 I - 2 s I) = d m^2 + d (1 - s)^2, divided by tr(I) = d
    assert drift.relative_frechet(mu1, np.eye(d), mu2, s**2 * np.eye(d)) == pytest.approx(m**2 + (1 - s) ** 2)
    assert drift.relative_frechet(mu1, np.eye(d), mu1, np.eye(d)) == pytest.approx(0, abs=1e-9)


def test_histograms_count_pixels_per_channel_in_32_bins():
    images = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    images[:, 1] = 255
    images[0, 2, 0, 0] = 8  # 8 // 8 = bin 1
    hist = drift.histograms(images)
    assert hist.shape == (3, drift.BINS)
    assert hist[0, 0] == 32 and hist[1, -1] == 32 and hist[2, 1] == 1 and hist[2, 0] == 31


def test_embedding_is_fixed_and_sees_inversion():
    a, b = drift.embedding_net(1), drift.embedding_net(1)
    assert all((a.state_dict()[k] == b.state_dict()[k]).all() for k in a.state_dict())
    rng = np.random.default_rng(0)
    images = np.zeros((400, 1, 28, 28), dtype=np.uint8)
    images[:, :, 6:22, 8:20] = rng.integers(100, 256, size=(400, 1, 16, 12))  # bright objects on black
    other = images.copy()
    other[:, :, 6:22, 8:20] = rng.integers(100, 256, size=(400, 1, 16, 12))  # a new sample of the same kind
    f, g, inverted = (drift.embed(a, x) for x in (images, other, 255 - images))
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (f, g, inverted)]
    same = drift.relative_frechet(*stats[0], *stats[1])
    shifted = drift.relative_frechet(*stats[0], *stats[2])
    assert same < 0.2 < 100 < shifted, (same, shifted)  # 400 samples in 256 dimensions: some sampling noise


def check(value: float, fail: float = 0.25) -> dict:
    return {"name": "intensity_psi", "param": "intensity_psi", "value": value, "warn": 0.1, "fail": fail,
            "status": "fail" if value >= fail else "warn" if value >= 0.1 else "ok"}


def test_gate_fails_with_one_line_naming_the_check_and_value():
    from imagegen.errors import ImagegenError

    gate = drift.Gate([check(3.21)], {"previous_data_version": "abc123", "previous_data_version_number": 7}, None, None)
    assert not gate.passed
    with pytest.raises(ImagegenError) as raised:
        gate.raise_if_failed()
    message = str(raised.value)
    assert "\n" not in message
    assert "intensity_psi 3.21 >= fail level 0.25 (validate.drift.intensity_psi_fail)" in message
    assert "data version 7 (abc123)" in message and "reports/validation/drift.html" in message
    assert drift.Gate([check(0.2)], {}, None, None).passed  # a warning does not fail


def test_warning_level_above_failure_level_is_refused():
    with pytest.raises(ValueError, match="frechet_warn must not exceed frechet_fail"):
        DriftConfig(frechet_warn=0.5, frechet_fail=0.2)


# --- class indices, acceptance, the batch, the data version number, a profile read back from the store

def profile(classes: list[str], number: int = 1, content: str = "a", hashes=None) -> drift.Profile:
    counts = {split: {c: 10 for c in classes} for split in ("train", "test")}
    info = {"dataset": "wardrobe", "shape": [1, 28, 28], "classes": classes, "data_version": "md5", "content_sha256":
            content, "images": {"train": 10 * len(classes), "test": 10 * len(classes)}, "images_per_class": counts,
            "histograms": [[1] * drift.BINS], "mix": {}, "sample": 100, "data_version_number": number}
    net = drift.embedding_net(1)
    return drift.Profile(info, np.zeros(drift.FEATURES), np.eye(drift.FEATURES), net.state_dict(),
                         np.array([], dtype=np.uint64) if hashes is None else hashes)


def test_numbering_keeps_accepted_indices_and_appends_new_classes():
    from imagegen.data.accepted import ClassOrder, numbering

    order = ClassOrder(("zero", "one", "two", "three"), ())
    assert numbering(["one", "three", "two", "zero"], order) == ("zero", "one", "two", "three")
    # `ten` sorts between three and two, yet goes last: no accepted class changes index
    assert numbering(["one", "ten", "three", "two", "zero", "eleven"], order) == (
        "zero", "one", "two", "three", "eleven", "ten")
    assert numbering(["b", "a"], ClassOrder((), ())) == ("a", "b")  # nothing accepted yet: by name


def test_accept_classes_appends_with_who_and_when_and_refuses_a_removed_class(tmp_path):
    from imagegen.data.accepted import CLASS_ORDER, accept_classes, read_order
    from imagegen.errors import ImagegenError

    (tmp_path / CLASS_ORDER).parent.mkdir(parents=True)
    (tmp_path / CLASS_ORDER).write_text("{}\n")
    record = accept_classes(tmp_path, "wardrobe", ["zero", "one", "two"], ["one", "ten", "two", "zero"], "ana", 3)
    assert record["added"] == ["ten"] and record["by"] == "ana" and record["after_data_version_number"] == 3
    assert record["at"].endswith("+00:00")
    order = read_order(tmp_path, "wardrobe")
    assert order.classes == ("zero", "one", "two", "ten") and order.accepted == (record,)
    assert read_order(tmp_path, "other").classes == ()
    with pytest.raises(ImagegenError, match=r"class\(es\) two of data version 3 are missing .* cannot be accepted"):
        accept_classes(tmp_path, "wardrobe", ["zero", "one", "two"], ["zero", "one", "ten"], "ana", 3)
    with pytest.raises(ImagegenError, match="nothing to accept"):
        accept_classes(tmp_path, "wardrobe", ["zero", "one"], ["one", "zero"], "ana", 3)
    (tmp_path / CLASS_ORDER).write_text('{"wardrobe": {"classes": "zero", "accepted": []}}')
    with pytest.raises(ImagegenError, match="expected classes"):
        read_order(tmp_path, "wardrobe")


def test_a_changed_class_list_fails_unless_accepted_and_a_removal_always_fails():
    from imagegen.data.accepted import ClassOrder

    old = profile(["zero", "one", "two"])
    renumbered = profile(["one", "ten", "two", "zero"])  # sorted names: `ten` would shift two and zero
    change = drift.class_list_change(old, renumbered, ClassOrder((), ()))
    assert change["added"] == ["ten"] and change["shared"] == ["zero", "one", "two"]
    assert change["failure"].startswith("class list changed since data version 1: added [ten], removed []")
    appended = profile(["zero", "one", "two", "ten"])
    assert "accept-classes" in drift.class_list_change(old, appended, ClassOrder((), ()))["failure"]
    accepted = ClassOrder(("zero", "one", "two", "ten"), ({"added": ["ten"], "by": "ana", "at": "t"},))
    change = drift.class_list_change(old, appended, accepted)
    assert change["failure"] is None and change["accepted"] and change["record"] == {"added": ["ten"], "by": "ana",
                                                                                      "at": "t"}
    removed = drift.class_list_change(old, profile(["zero", "two"]), ClassOrder(("zero", "two"), ()))
    assert "removed [one]; a removed class is refused" in removed["failure"]
    assert drift.class_list_change(old, profile(["zero", "one", "two"]), ClassOrder((), ()))["failure"] is None


def test_the_batch_is_the_images_whose_content_the_accepted_version_lacks():
    hashes = [f"{i:016x}" + "f" * 16 for i in range(10)]  # 64-bit prefixes are what count
    accepted = np.unique(drift.hash_values(hashes[:6]))
    assert drift.added_images(hashes, accepted).tolist() == [6, 7, 8, 9]
    assert drift.added_images(hashes[::-1], accepted).tolist() == [0, 1, 2, 3]  # by content, not position
    assert drift.added_images(hashes, np.array([], dtype=np.uint64)).tolist() == list(range(10))


def test_data_version_number_starts_at_one_and_grows_only_with_new_content(tmp_path):
    first = profile(["a", "b"], number=0, content="x")
    assert drift.version_number(None, first, tmp_path) == 1
    assert drift.version_number(profile(["a", "b"], 4, "x"), profile(["a", "b"], 0, "x"), tmp_path) == 4
    assert drift.version_number(profile(["a", "b"], 4, "x"), profile(["a", "b"], 0, "y"), tmp_path) == 5
    drift.save_profile(tmp_path / drift.PROFILE_DIR, profile(["a", "b"], 9, "z"))  # accepted here, not champion
    assert drift.version_number(profile(["a", "b"], 4, "x"), profile(["a", "b"], 0, "y"), tmp_path) == 10


@pytest.mark.parametrize("tamper", ["pickle", "cov", "json", "histograms", "hashes"])
def test_a_tampered_profile_is_refused_in_one_line(tmp_path, tamper):
    import torch

    from imagegen.errors import ImagegenError

    folder = tmp_path / "profile"
    drift.save_profile(folder, profile(["a", "b"]))
    assert drift.load_profile(folder).info["classes"] == ["a", "b"]  # intact: loads
    if tamper == "pickle":
        torch.save({"0.weight": object()}, folder / drift.EMBEDDING)  # needs unpickling: weights_only refuses
    elif tamper == "cov":
        np.save(folder / drift.COV, np.eye(3))
    elif tamper == "json":
        (folder / drift.PROFILE).write_text('{"dataset": 1}')
    elif tamper == "histograms":
        info = profile(["a", "b"]).info
        (folder / drift.PROFILE).write_text(json.dumps({**info, "histograms": [[-1] * drift.BINS]}))
    else:
        np.save(folder / drift.HASHES, np.array(["x"]))
    with pytest.raises(ImagegenError) as refused:
        drift.load_profile(folder)
    assert "damaged drift profile" in str(refused.value) and "\n" not in str(refused.value)


def test_order_changed_without_new_classes_fails_naming_the_order():
    from imagegen.data.accepted import ClassOrder

    swapped = drift.class_list_change(profile(["zero", "one"]), profile(["one", "zero"]), ClassOrder((), ()))
    assert swapped["added"] == [] and swapped["removed"] == []
    assert swapped["failure"].endswith("the accepted classes changed order (labels would change meaning): "
                                       "restore data/classes.json")
