"""pytest plugin (-p pytest_timing): appends each test's wall and process CPU seconds to the file
named by GDN_TIMING_LOG as it finishes (used to choose the emulated test selection)."""

import os
import time

_start: dict[str, tuple[float, float]] = {}


def pytest_runtest_logstart(nodeid, location):
    _start[nodeid] = (time.perf_counter(), time.process_time())


def pytest_runtest_logfinish(nodeid, location):
    path = os.environ.get("GDN_TIMING_LOG")
    if path and nodeid in _start:
        wall0, cpu0 = _start.pop(nodeid)
        with open(path, "a") as f:
            f.write(f"{time.perf_counter() - wall0:8.2f} {time.process_time() - cpu0:8.2f} {nodeid}\n")
