"""The kernel tests must run where vLLM is absent (e.g. the AMX host: torch only): every test module
that needs vLLM has to skip, with its reason, instead of failing to import. Checked by collecting
the suite in a child interpreter in which ``import vllm`` fails."""

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_suite_collects_without_vllm():
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # any `import vllm...` now raises ImportError
        "import pytest\n"
        f"sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-rs', {str(TESTS)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "SKIPPED" in result.stdout and "need" in result.stdout  # the skips state their reasons
