"""PNG plots (lorakit.io.plots): figures are closed even when saving fails, and the training plot draws a
metrics log whose last line a kill left torn."""

import json

import matplotlib.pyplot as plt
import pytest

from lorakit.io.plots import save_figure, training_plot
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
