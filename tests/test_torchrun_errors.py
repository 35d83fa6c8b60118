"""Under torchrun every rank meets the same bad command line: the user reads its error once (rank
0's), not once per process."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def torchrun(*argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29541", os.path.join(ROOT, "teacher_grpo.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size must be a positive number, got 0"),  # found in main()
    (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice"),  # by argparse
])
def test_bad_input_is_reported_once_under_torchrun(tiny_model, tmp_path, flags, message):
    run = torchrun("--model", tiny_model, "--data-root", str(tmp_path),
                   "--out", str(tmp_path / "out"), *flags)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("teacher_grpo.py: ")]
    # one line, without a rank: rank 0 reports for all (torchrun adds its own summary after it)
    assert len(errors) == 1, run.stderr[-3000:]
    assert errors[0].startswith(f"teacher_grpo.py: error: {message}"), errors[0]
