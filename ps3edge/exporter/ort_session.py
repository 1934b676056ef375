"""The options every onnxruntime session of ps3edge takes: quiet, as many CPU threads as this
process's share of the machine, and (for a long-lived server) no CPU memory arena.

Here, at the exporter's layer, because the export opens sessions of its own (onnxruntime's
rewrites in ort_optimize.py, the check of its files in validate.py) as the onnxruntime runner
(runtime/runners/onnxruntime.py) and INT8 calibration (calibration/int8.py) do; one copy of the
options serves them all.
"""

from __future__ import annotations

import os

ENV_CPU_THREADS = "OMP_NUM_THREADS"
_CPU_ARENA = {"enabled": True}           # this process's choice; see keep_cpu_arena


def cpu_threads() -> int | None:
    """The threads a session computes with on the CPU: OMP_NUM_THREADS where it starts with a
    positive whole number (torch takes its CPU threads from it too, and Ray sets it to a task's
    share of the cores), else None: onnxruntime's default of one per physical core. Processes
    that share a machine - Ray tasks, test workers, one pipeline per camera - then each use their
    share, rather than each keeping a spinning pool as wide as the machine."""
    first = os.environ.get(ENV_CPU_THREADS, "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def cpu_session_options(threads: int | None = None):
    """onnxruntime SessionOptions as every ps3edge session takes them: quiet (errors only), and
    computing with `threads`, else cpu_threads(), else onnxruntime's default (0)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or cpu_threads() or 0
    options.enable_cpu_mem_arena = _CPU_ARENA["enabled"]
    return options


def keep_cpu_arena(enabled: bool) -> None:
    """Whether the sessions this process opens from now on keep onnxruntime's CPU memory arena.
    The arena keeps, for the session's life, the most memory any one call has needed (a batch of
    8 ps3-tiny images: about 1.9 GB over the 0.8 GB a batch of 1 leaves), so a process that runs
    one job keeps it (the default), and a server whose batch sizes vary with its traffic turns it
    off: each call then returns its memory when it ends (ps3-tiny on a 2-core CPU: 5-10% more time
    per image)."""
    _CPU_ARENA["enabled"] = bool(enabled)
