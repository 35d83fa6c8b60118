"""Under torchrun every rank meets the same bad command line: the user reads its error once (rank 0's),
not once per process."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def torchrun(*argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29541", os.path.join(ROOT, "teacher_grpo.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "teacher_grpo.py: error: --batch-size must be a positive number, got 0"),  # in main()
    (["--mixed-precision", "fp8"], "teacher_grpo.py: error: argument --mixed-precision: invalid choice"),  # argparse
])
def test_bad_input_is_reported_once_under_torchrun(tiny_model, tmp_path, flags, message):
    run = torchrun("--model", tiny_model, "--data-root", str(tmp_path), "--out", str(tmp_path / "out"), *flags)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if "teacher_grpo.py: " in line and "error: " in line]
    assert len(errors) == 1 and message in errors[0], run.stderr[-3000:]  # torchrun adds its own summary
