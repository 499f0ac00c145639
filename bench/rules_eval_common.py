"""Bookkeeping of bench/rules_eval.py: the keep rules and kinds of run, the time budget, the JSON document (rewritten
after every change, so a timeout keeps what was done) and the timestamped log."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import time
import traceback
from typing import Optional

RULES = ("max", "mass")
KINDS = ("fixed", "calibrated", "calibrated+refresh")  # fixed thresholds; calibrated targets (without, with re-admission)


# -- bookkeeping ------------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock seconds for the whole evaluation; 0 = no limit. ``allows(estimate)`` says whether a piece of work
    of about ``estimate`` seconds still fits (unknown estimates always do)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate: Optional[float]) -> bool:
        return not self.seconds or estimate is None or self.elapsed() + estimate <= self.seconds


class Results:
    """The JSON document, rewritten after every change."""

    def __init__(self, path: pathlib.Path, meta: dict):
        self.path = path
        self.data = dict(meta=meta, dense={}, demo=[], calibration=dict(available=None, note="", timing=[]),
                         synthetic=dict(config={}, rows=[]), skipped=[], errors=[])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_jsonable(self.data), indent=1))
        tmp.replace(self.path)

    def skip(self, what: str, why: str) -> None:
        log(f"skipped {what}: {why}")
        self.data["skipped"].append(f"{what}: {why}")
        self.save()

    @contextlib.contextmanager
    def stage(self, name: str):
        """A failure inside is recorded and printed; the evaluation goes on with the next piece."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 -- one failed run must not lose the others
            log(f"FAILED {name}: {type(exc).__name__}: {exc}")
            self.data["errors"].append(dict(stage=name, error=f"{type(exc).__name__}: {exc}",
                                            traceback=traceback.format_exc()))
        finally:
            self.save()


def _jsonable(x):
    """JSON has no inf or nan: they become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {message}", flush=True)
