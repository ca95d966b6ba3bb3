"""Reading what comes from outside in bounded time and memory (lorakit.io.untrusted): deep or huge JSON, long
numbers, backtracking patterns and forged .npy headers are each one ValueError, before the work or allocation."""

import io
import json

import numpy as np
import pytest

from lorakit.io import untrusted
from lorakit.io.untrusted import MAX_JSON_DEPTH, check_npy, check_pattern, fullmatch, loads_json, read_json

BACKTRACKING = r"(?:.|..)+\d"  # exponentially many ways to split a long name, none ending in a digit
LONG_NAME = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000, "nested deeper than 64 levels"),  # Python's parser recurses: RecursionError without the bound
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nested deeper than 64 levels"),
        ('{"a": ' * 70 + "1" + "}" * 70, "nested deeper than 64 levels"),
        ('{"r": ' + "1" * 5000 + "}", "a number of 5000 digits"),  # past Python's own limit, with its sys hint
        ('{"r": -' + "9" * 101 + "}", "a number of 101 digits"),
    ],
    ids=["unclosed-100000", "closed-65", "objects-70", "5000-digits", "negative-101-digits"],
)
def test_json_nested_too_deeply_or_with_too_long_a_number_is_one_value_error(text, message):
    with pytest.raises(ValueError, match=message) as caught:
        loads_json(text)
    assert not isinstance(caught.value, json.JSONDecodeError)  # valid JSON, refused for its size


def test_json_within_the_bounds_reads_as_json_does():
    text = json.dumps({"a": [[[1, 2.5, -3]]], "b": "x" * 1000, "n": 10**99, "d": [[]] * 3})
    assert loads_json(text) == json.loads(text)
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_json(nested) == json.loads(nested)


def test_a_json_file_past_the_size_bound_is_refused_naming_its_size(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"pad": "x" * 2000}))
    with pytest.raises(ValueError, match=f"{path} is 2,011 bytes, more than the 1,000 a JSON file"):
        read_json(path, max_bytes=1000)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"{", "is not valid JSON: Expecting property name"),
        (b'{"a": "\xff"}', "is not valid JSON: not UTF-8"),
        (b"[" * 5000, "nested deeper than 64 levels"),
    ],
    ids=["truncated", "not-utf8", "deep"],
)
def test_a_bad_json_file_is_one_value_error_naming_it(tmp_path, data, message):
    path = tmp_path / "trainer_state.json"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as caught:
        read_json(path)
    assert str(path) in str(caught.value)


def test_a_backtracking_pattern_is_refused_in_bounded_time_naming_its_key():
    with pytest.raises(ValueError, match=r"target_modules: the regular expression .* takes more than 0.2 s to match"):
        fullmatch(BACKTRACKING, LONG_NAME, "target_modules")
    assert not fullmatch(BACKTRACKING, "mlp", "target_modules")  # on a short name it is merely slow: answered


@pytest.mark.parametrize(
    "pattern, message",
    [("(", "invalid regular expression '\\('"), (3, "a pattern must be text, got 3"), ("a{1,99999999999}", "invalid")],
    ids=["unbalanced", "not-text", "huge-repeat"],
)
def test_an_invalid_pattern_is_one_value_error_naming_its_key(pattern, message):
    with pytest.raises(ValueError, match=message) as caught:
        check_pattern(pattern, "exclude_modules")
    assert str(caught.value).startswith("exclude_modules: ")


def test_a_global_flag_inside_a_pattern_applies_to_all_of_it():
    # re refuses "(?i)" anywhere but at the start, and lorakit wraps rank_pattern keys in a suffix pattern
    assert fullmatch(r"(?:.*\.)?(?:(?i)Q_PROJ)", "model.q_proj", "rank_pattern")


def npy_bytes(shape: tuple, stored: np.ndarray) -> bytes:
    """A .npy file whose header announces `shape` (float64) and whose data is `stored`."""
    handle = io.BytesIO()
    np.lib.format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return handle.getvalue() + stored.astype("<f8").tobytes()


def test_a_npy_header_announcing_more_than_the_file_holds_is_refused_before_reading(tmp_path):
    path = tmp_path / "forged.npy"
    path.write_bytes(npy_bytes((10**9, 10**6), np.zeros(4)))
    with path.open("rb") as handle, pytest.raises(ValueError, match=r"announces shape \(1000000000, 1000000\)"):
        check_npy(handle, path, copies=3)


def test_a_npy_array_past_the_memory_available_is_refused_with_both_figures(tmp_path, monkeypatch):
    path = tmp_path / "m.npy"
    np.save(path, np.zeros((100, 100)))
    monkeypatch.setattr(untrusted, "available_memory", lambda: 100_000)
    with (
        path.open("rb") as handle,
        pytest.raises(ValueError, match=r"needs about 0\.2 MB of memory, and 0\.1 MB are available"),
    ):
        check_npy(handle, path, copies=3)  # 3 × 10,000 × 8 bytes


def test_a_sound_npy_header_leaves_the_file_where_it_was(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.arange(6.0).reshape(2, 3))
    with path.open("rb") as handle:
        check_npy(handle, path, copies=3)
        assert handle.tell() == 0
        assert np.lib.format.read_array(handle).tolist() == [[0, 1, 2], [3, 4, 5]]
