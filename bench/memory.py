"""Peak memory of training, one library per process: `python -m bench.memory LIB SETTING`.

Prints one JSON line: resident memory (CPU) or allocated CUDA memory once the model is built ("before"),
and its peak during three training steps ("peak"); the difference is what training took.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import threading
import time

import torch

from bench.models import SETTINGS, adamw, device_and_dtype, lorakit_model, peft_model


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakSampler:
    """Samples resident memory every millisecond in a thread; ru_maxrss alone would report the peak of the
    whole process, model construction included, not that of training."""

    def __init__(self) -> None:
        self.peak = resident_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())


def main() -> None:
    library, setting_name = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    setting = SETTINGS[setting_name]
    device, dtype = device_and_dtype()
    base = setting.build(dtype, device)
    model = (lorakit_model if library == "lorakit" else peft_model)(setting, base, copy_base=False)
    model.train()
    x = torch.randint(0, setting.vocab, setting.batch, generator=torch.Generator().manual_seed(1)).to(device)
    optimizer = adamw(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
    with PeakSampler() as sampler:
        for _ in range(3):
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else sampler.peak
    print(json.dumps({"library": library, "before": before, "peak": peak}))


if __name__ == "__main__":
    main()
