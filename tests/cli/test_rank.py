"""`lorakit rank` (lorakit.cli.rank): file formats, the worked examples, the plot, and one clear error for bad
input."""

import io
import json

import numpy as np
import pytest
import torch
from helpers import cli_error, run_cli
from safetensors.torch import save_file


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_rank_reads_npy_and_reports_numpy_rank(tmp_path, capsys):
    rng = np.random.default_rng(0)
    M = rng.standard_normal((30, 5)) @ rng.standard_normal((5, 40))
    np.save(tmp_path / "m.npy", M)
    code, out, _ = run_cli(capsys, "rank", str(tmp_path / "m.npy"), "--json", "--energy", "1.0")
    assert code == 0
    (row,) = json_rows(out)
    assert row["shape"] == [30, 40]
    assert row["rank"] == np.linalg.matrix_rank(M) == 5
    assert row["rank_for_energy"] == 5
    assert row["top_singular_values"][0] == pytest.approx(np.linalg.svd(M, compute_uv=False)[0], rel=1e-5)


@pytest.mark.parametrize("text", ["1,2,3\n2,4,6\n1,3,5\n", "1 2 3\n2  4 6\n\n1\t3 5\n"])
def test_rank_reads_comma_and_whitespace_separated_text(tmp_path, capsys, text):
    (tmp_path / "m.csv").write_text(text)
    code, out, _ = run_cli(capsys, "rank", str(tmp_path / "m.csv"), "--json")
    assert code == 0
    (row,) = json_rows(out)
    assert row["rank"] == 2
    assert row["top_singular_values"][:2] == pytest.approx([10.2330, 0.5353], abs=1e-4)


def test_rank_reads_every_2d_tensor_of_a_safetensors_file_or_one_key(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.eye(4), "b": torch.ones(3, 5), "bias": torch.ones(4)}, path)
    code, out, _ = run_cli(capsys, "rank", str(path), "--json")
    assert code == 0
    rows = {row["matrix"]: row for row in json_rows(out)}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["rank"] == 4 and rows["b"]["rank"] == 1
    code, out, _ = run_cli(capsys, "rank", str(path), "--key", "b", "--json")
    assert [row["matrix"] for row in json_rows(out)] == ["b"]


def test_rank_lists_a_models_floating_point_weights_not_its_integer_buffers(tmp_path, capsys):
    path = tmp_path / "model.safetensors"  # as BERT-like checkpoints hold them: position_ids (1, 512), int64
    weights = {"query.weight": torch.eye(4), "dense.weight": torch.ones(4, 4, dtype=torch.bfloat16)}
    save_file({**weights, "position_ids": torch.arange(4).view(1, 4), "mask": torch.ones(2, 2, dtype=torch.bool)}, path)
    code, out, _ = run_cli(capsys, "rank", str(path), "--json")
    assert code == 0
    assert {row["matrix"]: row["rank"] for row in json_rows(out)} == {"query.weight": 4, "dense.weight": 1}
    code, out, _ = run_cli(capsys, "rank", str(path), "--key", "position_ids", "--json")  # named: read as asked
    assert [row["matrix"] for row in json_rows(out)] == ["position_ids"]


def test_rank_prints_a_table_and_writes_a_png_plot(tmp_path, capsys):
    np.save(tmp_path / "m.npy", np.eye(6))
    plot = tmp_path / "plots" / "spectrum.png"
    code, out, _ = run_cli(capsys, "rank", str(tmp_path / "m.npy"), "--plot", str(plot))
    assert code == 0
    assert "eff. rank" in out and "6 × 6" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_example_walks_through_the_notes(capsys):
    code, out, _ = run_cli(capsys, "rank", "--example")
    assert code == 0
    assert "rank 2" in out
    assert "10.2330, 0.5353, 0.0000" in out


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        save_file(content, path)
    return str(path)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_bytes(directory) -> bytes:
    """An .npz archive (a zip), which np.load would open lazily rather than refuse."""
    np.savez(directory / "archive.npz", m=np.eye(2))
    return (directory / "archive.npz").read_bytes()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: ["rank", str(d / "missing.npy")], "no such file"),
        (lambda d: ["rank", write(d, "bad.csv", "1,2\nthree,4\n")], "non-numeric value 'three' on data line 2"),
        (lambda d: ["rank", write(d, "ragged.csv", "1,2\n3\n")], "different lengths"),
        (lambda d: ["rank", write(d, "v.npy", np.ones(3))], "must be 2-D"),
        (lambda d: ["rank", write(d, "t.npy", np.ones((2, 2, 2)))], "must be 2-D"),
        (lambda d: ["rank", write(d, "n.npy", np.array([[1.0, np.nan]]))], "NaN or inf"),
        (lambda d: ["rank", write(d, "empty.npy", b"")], "empty.npy is not a readable .npy array"),
        (lambda d: ["rank", write(d, "cut.npy", npy_bytes(np.eye(3))[:-10])], "cut.npy is not a readable .npy array"),
        (lambda d: ["rank", write(d, "zip.npy", npz_bytes(d))], "zip.npy is not a readable .npy array"),
        (lambda d: ["rank", write(d, "o.npy", np.array([[{}]], dtype=object))], "o.npy is not a readable .npy array"),
        (lambda d: ["rank", write(d, "i.csv", "1,inf\n0,1\n")], "NaN or inf"),
        (lambda d: ["rank", write(d, "w.safetensors", {"a": torch.eye(2)}), "--key", "nope"], "no tensor named 'nope'"),
        (lambda d: ["rank", write(d, "v.safetensors", {"v": torch.ones(3)})], "no 2-D floating-point tensor"),
        (
            lambda d: ["rank", write(d, "ids.safetensors", {"position_ids": torch.arange(8).view(1, 8)})],
            "no 2-D floating-point tensor in the file (use --key to name one)",
        ),
        (lambda d: ["rank", write(d, "bad.safetensors", b"not a safetensors file")], "not a readable safetensors"),
        (lambda d: ["rank", write(d, "m.json", "[]")], "unknown file type"),
        (lambda d: ["rank", write(d, "m.npy", np.eye(2)), "--energy", "1.5"], "--energy must be in"),
        (lambda d: ["rank", write(d, "m.npy", np.eye(2)), "--top", "-1"], "--top must be >= 0"),
        (lambda d: ["rank"], "give a FILE"),
        (lambda d: ["rank", "--example", write(d, "m.npy", np.eye(2))], "give a FILE or --example, not both"),
        (lambda d: ["rank", "--example", "--json"], "--json, --plot and --key apply to a FILE, not to --example"),
    ],
)
def test_bad_input_gets_one_error_line_and_exit_code_2(tmp_path, capsys, make_args, message):
    lines = cli_error(make_args(tmp_path), capsys).strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
