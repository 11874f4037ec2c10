"""Runs the hypothesis property suite (tests/properties/props_ops.py) in a child pytest process:
a crash (segfault, abort) in any example then fails this test with the child's output, instead of
taking the whole test session down. >= 500 examples per property in CI (GDN_PROPERTY_EXAMPLES).
GDN_PROPERTY_SELECT, a pytest -m expression, narrows the properties run (ci/kernel_host_check.sh:
"not error_path" on hosts where raising argument errors crashes, see README)."""

import os
import subprocess
import sys
from pathlib import Path

PROPS = Path(__file__).parent / "properties" / "props_ops.py"


def test_op_properties_under_hypothesis():
    env = dict(os.environ, GDN_PROPERTY_EXAMPLES=os.environ.get("GDN_PROPERTY_EXAMPLES", "500"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
         "-m", os.environ.get("GDN_PROPERTY_SELECT", ""), str(PROPS)],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode >= 0, f"property run crashed (signal {-proc.returncode}):\n{tail}"
    assert proc.returncode == 0, f"property run failed:\n{tail}"
    print(tail.strip().splitlines()[-1])
