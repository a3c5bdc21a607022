"""Sampling profiles of the service's workers under load (py-spy, when installed).

`py-spy record --format raw --function` writes collapsed stacks ("f1 (file);f2 (file) N");
the summary gives each function's share of the samples: self (it was the innermost frame)
and inclusive (it was anywhere on the stack), which is where the time goes per request.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 200
# Where a sample's time goes: the innermost frame (leaf outwards) matching a pattern decides,
# so torch under the tower counts as `encode: tower`, pydantic under FastAPI as `pydantic`.
CATEGORIES = (
    # uvloop runs the loop in C: time in its I/O and callbacks shows as this leaf.
    ("Runner.run (asyncio/runners.py", "event loop: uvloop (C: I/O, callbacks)"),
    ("(torch/", "encode: torch tower"),
    ("(models/features.py", "encode: feature encoder"),
    ("encode (app/model/serving_model.py", "encode: other"),  # ServingModel.encode
    ("(faiss/", "search: faiss"),
    ("(numpy/", "numpy"),
    ("(app/retrieval.py", "search: python (exclusion, results)"),
    ("(redis/", "redis client"),
    ("(prometheus_client/", "metrics (prometheus_client)"),
    ("(pydantic/", "pydantic (validate / serialise)"),
    ("(fastapi/", "fastapi"),
    ("(starlette/", "starlette"),
    ("(uvicorn/", "uvicorn (http protocol)"),
    ("(app/", "app: other"),
    ("(anyio/", "event loop / threads"),
    ("(asyncio/", "event loop / threads"),
    ("(threading.py", "event loop / threads"),
)
# Leaves of a thread that waits for work (the thread pool); py-spy may count them as active.
IDLE_LEAVES = ("Condition.wait (threading.py", "Event.wait (threading.py", "Queue.get (queue.py")


def py_spy_path() -> str | None:
    beside_python = Path(sys.executable).parent / "py-spy"
    return str(beside_python) if beside_python.exists() else shutil.which("py-spy")


def start_recording(
    pids: list[int], duration_s: float, out_dir: Path, native: bool
) -> list[tuple[int, Path, subprocess.Popen[bytes]]]:
    """One `py-spy record` per worker, running for `duration_s` in the background."""
    exe = py_spy_path()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy into the venv)")
    out_dir.mkdir(parents=True, exist_ok=True)
    running = []
    for pid in pids:
        out = out_dir / f"worker-{pid}.txt"
        command = [exe, "record", "--pid", str(pid), "--duration", str(round(duration_s))]
        command += ["--rate", str(RATE_HZ), "--format", "raw", "--function", "--nonblocking"]
        command += ["--output", str(out)]
        if native:
            command.append("--native")
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        running.append((pid, out, proc))
    return running


def _frame_name(frame: str) -> str:
    """`encode (app/model/serving_model.py)` stays as it is, with site-packages
    paths shortened to the package: `dump_json (pydantic/type_adapter.py)`."""
    frame = frame.strip()
    marker = "site-packages/"
    if marker in frame:
        name, _, path = frame.partition(" (")
        return f"{name} ({path.split(marker, 1)[1]}"
    return frame


def category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for pattern, name in CATEGORIES:
            if pattern in frame:
                return name
    return "other"


def _own_code(frame: str) -> bool:
    return "(app/" in frame or "(models/" in frame


def summarise(path: Path, duration_s: float, top: int = 25) -> dict[str, Any]:
    """Shares of the samples: by category (see CATEGORIES), by innermost function (`self`),
    and for the project's own functions, anywhere on the stack (`inclusive`)."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        # Skip the thread label py-spy puts first ("process 1:\"python\"" / "thread (0x..)").
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        total += count
        self_counts[frames[-1]] += count
        categories[category(frames)] += count
        for frame in set(frames):
            if _own_code(frame):
                incl_counts[frame] += count
    if total == 0:
        return {"samples": 0, "idle_samples": idle}

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(n / total, 4)] for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "idle_samples": idle,  # threads waiting for work, left out of the shares
        # Busy samples per second of wall time over the rate: ~ cores kept busy by Python
        # threads of this worker (native threads inside FAISS/torch are not sampled).
        "active_fraction": round(total / (RATE_HZ * duration_s), 3),
        "categories": share(categories),
        "self": share(self_counts),
        "inclusive": share(incl_counts),
    }


def finish_recording(
    running: list[tuple[int, Path, subprocess.Popen[bytes]]], duration_s: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pid, path, proc in running:
        _, err = proc.communicate(timeout=duration_s + 60)
        if proc.returncode != 0 or not path.exists():
            out[str(pid)] = {"error": err.decode(errors="replace")[-500:]}
            continue
        out[str(pid)] = {"file": str(path)} | summarise(path, duration_s)
    return out
