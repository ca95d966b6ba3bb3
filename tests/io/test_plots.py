"""PNG plots (lorakit.io.plots): figures are closed even when saving fails, and the training plot draws a
metrics log whose last line a kill left torn."""

import json

import matplotlib.pyplot as plt
import pytest
import torch

from lorakit.io.plots import layer_kinds, save_figure, spectrum_figure, training_plot
from lorakit.training.metrics import read_metrics


def test_a_figure_whose_save_fails_is_closed_and_leaves_no_file(tmp_path):
    plt.close("all")
    fig, _ = plt.subplots()

    def failing_savefig(*args, **kwargs):
        raise OSError("disk full")

    fig.savefig = failing_savefig
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "plot.png")
    assert plt.get_fignums() == []
    assert list(tmp_path.iterdir()) == []


def test_training_plot_drops_a_torn_last_line(tmp_path):
    records = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo')
    training_plot(read_metrics(log), tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_the_suffix_names_the_format_and_an_unknown_one_is_refused(tmp_path):
    save_figure(plt.figure(), tmp_path / "plot.svg")
    assert (tmp_path / "plot.svg").read_text().startswith("<?xml")
    save_figure(plt.figure(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=r"plot.xyz: matplotlib writes no .xyz files"):
        save_figure(plt.figure(), tmp_path / "plot.xyz")
    assert plt.get_fignums() == [] and not (tmp_path / "plot.xyz").exists()


def test_drawing_a_plot_leaves_the_processs_matplotlib_backend_alone(tmp_path):
    import subprocess
    import sys

    script = (
        "import matplotlib; matplotlib.use('svg')\n"  # as a notebook's inline backend would be chosen
        "import torch; from lorakit.io.plots import spectrum_plot\n"
        f"spectrum_plot({{'W': torch.tensor([3.0, 1.0])}}, {str(tmp_path / 'spectrum.png')!r})\n"
        "print(matplotlib.get_backend())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "svg"
    assert (tmp_path / "spectrum.png").read_bytes().startswith(b"\x89PNG")


def test_layer_kinds_group_the_blocks_layers_by_name_and_label_them_by_what_tells_kinds_apart():
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")]
    assert layer_kinds(names) == {
        "self_attn.q_proj (×3)": [f"model.layers.{i}.self_attn.q_proj" for i in range(3)],
        "self_attn.k_proj (×3)": [f"model.layers.{i}.self_attn.k_proj" for i in range(3)],
        "mlp.up_proj (×3)": [f"model.layers.{i}.mlp.up_proj" for i in range(3)],
    }
    assert layer_kinds(["linear1", "linear2"]) == {"linear1": ["linear1"], "linear2": ["linear2"]}
    assert list(layer_kinds(["a.b", "a.x.b"])) == ["b", "x.b"]  # a part of each is left, however much they share


def test_a_spectrum_plot_of_dozens_of_layers_has_a_legend_with_one_coloured_entry_per_kind():
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    modules += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = [f"model.layers.{i}.{m}" for i in range(6) for m in modules]  # 42 lines
    spectra = {name: torch.linspace(2.0, 0.1, 8) * (n + 1) for n, name in enumerate(names)}
    fig = spectrum_figure(spectra, energy_fraction=0.9)
    (legend,) = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == [f"{m} (×6)" for m in modules] + ["0.9 of the energy"]
    colours = [line.get_color() for line in fig.axes[0].get_lines()]  # drawn kind by kind, 6 lines each
    kinds = [set(colours[k : k + 6]) for k in range(0, len(names), 6)]
    assert all(len(colour) == 1 for colour in kinds)  # a kind has one colour
    assert len(set.union(*kinds)) == len(modules)  # and no two kinds share it
    plt.close(fig)
