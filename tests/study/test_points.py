"""lorakit.study.points: the finished points of a study, one JSON file each, read back on a resume."""

import pytest

from lorakit.study.points import PointStore


def test_points_survive_a_new_store_on_the_same_directory(tmp_path):
    store = PointStore(tmp_path / "points")
    assert len(store) == 0 and "full" not in store  # nothing is created until the first write
    store["full"] = {"metric": 0.75}
    store["did-256"] = {"d": 256, "metric": 0.5}
    again = PointStore(tmp_path / "points")
    assert dict(again) == {"did-256": {"d": 256, "metric": 0.5}, "full": {"metric": 0.75}}
    del again["full"]
    assert list(PointStore(tmp_path / "points")) == ["did-256"]


def test_keys_that_are_not_plain_file_names_are_refused(tmp_path):
    store = PointStore(tmp_path)
    for key in ("../escape", "", "a/b", ".hidden"):
        with pytest.raises(KeyError):
            store[key] = {}


def test_a_point_that_is_not_finite_json_is_refused_before_anything_is_written(tmp_path):
    store = PointStore(tmp_path)
    with pytest.raises(ValueError):
        store["bad"] = {"metric": float("nan")}
    assert list(tmp_path.iterdir()) == []
