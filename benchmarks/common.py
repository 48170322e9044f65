"""What the benchmarks share: the models, the device's name, timing, and the results files.

Models have random weights (speed does not depend on them): ``small`` is a four-layer CNN
with batch norm on CIFAR-10 shapes, ``resnet110`` is ``ancer.models``' CIFAR ResNet-110
(3×32×32, 10 classes), ``resnet50`` its ImageNet ResNet-50 (3×224×224, 1000 classes).
"""
from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def small_cnn() -> nn.Module:
    """A small CIFAR-10 CNN with batch norm (about 0.8 million multiply-adds per image)."""
    def block(c_in: int, c_out: int, stride: int) -> List[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(3, 8, 1), *block(8, 16, 2), *block(16, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def build_model(name: str) -> Tuple[nn.Module, Tuple[int, ...], int]:
    """(model in eval mode, input shape, number of classes) for ``name``."""
    if name == "small":
        return small_cnn().eval(), (3, 32, 32), 10
    from ancer.models import create_model

    if name == "resnet110":
        return create_model("cifar_resnet110").eval(), (3, 32, 32), 10
    if name == "resnet50":
        return create_model("resnet50").eval(), (3, 224, 224), 1000
    raise SystemExit(f"unknown model {name!r}: small, resnet110 or resnet50")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_label(device: torch.device) -> str:
    """``cpu-<processor>`` or ``cuda-<gpu>``, reduced to [a-z0-9-] for a file name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"{name} {torch.get_num_threads()}threads"
    return f"{device.type}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The shortest of ``repeats`` timings of ``run`` (seconds): on a shared machine the
    minimum is the least disturbed measurement."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def environment(device: torch.device) -> Dict[str, object]:
    return {"device": device_label(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(stem: str, payload: Dict[str, object], markdown: str) -> Tuple[Path, Path]:
    """Write ``results/<stem>.json`` and ``results/<stem>.md``; return their paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def markdown_table(header: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
