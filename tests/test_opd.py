"""opd.py on the tiny model, and the (OPD) objectives against the reverse-KL gradient they estimate."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import opd
from conftest import ROOT, write_distill_world


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """A data root with two tasks, two random teacher LoRAs and a random anchor LoRA."""
    root = tmp_path_factory.mktemp("opd")
    write_distill_world(tiny_model, root)
    return root


def _argv(tiny_model, world, out, *extra):
    return ["--model", tiny_model, "--data-root", str(world / "data"), "--out", str(out),
            "--teachers", f"ocr={world / 'ocr'},pickscore={world / 'pickscore'}", "--mar-teacher", str(world / "anchor"),
            "--init", "none", "--batch-size", "2", "--group-size", "2", "--steps", "3", "--micro-batch", "4",
            "--max-steps", "2", "--eval-every", "0", "--save-every", "1", *extra]


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("loss", ["pg", "kl", "mse"])
def test_each_loss_trains_the_student_only(tiny_model, world, tmp_path, loss):
    # pg with MAR's kl form (the default --mar 0.1) is lopsided by ~D: the run says so
    with pytest.warns(UserWarning, match="1/D") if loss == "pg" else contextlib.nullcontext():
        opd.main(opd.parse_args(_argv(tiny_model, world, tmp_path, "--loss", loss)))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(k in rows[0] for k in ("loss", "mar_kl", "step_time")) and any(k.startswith("kl/") for k in rows[0])
    assert all(r["mar_kl"] > 0 for r in rows)
    student, _ = common.read_lora(str(tmp_path / "final"))
    assert any(v.abs().max() > 0 for k, v in student.items() if "lora_B" in k)  # a fresh LoRA's B starts at 0


def test_teachers_stay_frozen_while_the_student_learns(tiny_model, world, tmp_path):
    """Switching adapters for teacher forwards must not make the teachers trainable (peft's set_adapters would)."""
    import opd as stage
    captured = {}
    original = common.save_lora

    def spy(transformer, name, out_dir):
        from peft.utils import get_peft_model_state_dict
        captured.update({n: get_peft_model_state_dict(transformer, adapter_name=n) for n in transformer.peft_config})
        return original(transformer, name, out_dir)

    common.save_lora = spy
    try:
        stage.main(stage.parse_args(_argv(tiny_model, world, tmp_path, "--max-steps", "1")))
    finally:
        common.save_lora = original
    for name, folder in (("teacher_ocr", "ocr"), ("anchor", "anchor")):
        saved, _ = common.read_lora(str(world / folder))
        assert all(torch.equal(captured[name][k], saved[k]) for k in saved), name


def test_torchrun_two_processes_match_one(tiny_model, world, tmp_path):
    opd.main(opd.parse_args(_argv(tiny_model, world, tmp_path / "one")))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29518", os.path.join(ROOT, "opd.py"), *_argv(tiny_model, world, tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for a, b in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    la, _ = common.read_lora(str(tmp_path / "one" / "final"))
    lb, _ = common.read_lora(str(tmp_path / "two" / "final"))
    assert all(torch.allclose(la[k], lb[k], atol=1e-5) for k in la)


def test_pg_estimator_is_the_reverse_kl_gradient_in_expectation():
    """E over x_next ~ pi_s of grad(pg loss) = grad KL_t / D (D = elements; (LOGP) is a per-element mean)."""
    g = torch.Generator().manual_seed(0)
    shape, n = (1, 2, 2, 2), 20000
    x, v_t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    v_s = v_t + 0.5 * torch.randn(shape, generator=g)
    t = common.timesteps(10)
    leaf = v_s.repeat(n, 1, 1, 1).requires_grad_()  # one leaf per sample: per-sample gradients
    x_rep = x.expand(n, -1, -1, -1)
    step = common.sde_step(leaf.detach(), x_rep, t[3], t[4], 0.7, generator=g)
    loss = common.opd_loss("pg", leaf, v_t.expand(n, -1, -1, -1), x_rep, step.x_next, t[3], t[4], 0.7,
                           old_log_prob=step.log_prob, clip_range=1e-4)
    loss.sum().backward()
    per_sample = leaf.grad.flatten(1) * n / n  # d loss_i / d v
    mc, se = per_sample.mean(0), per_sample.std(0) / n**0.5
    v = v_s.clone().requires_grad_()
    common.step_kl(v, v_t, t[3], t[4], 0.7).sum().backward()
    exact = v.grad.flatten() / x.numel()
    assert torch.all((mc - exact).abs() < 4 * se + 1e-7), (mc, exact, se)
    assert exact.abs().max() > 10 * se.max()  # the check has power


def test_kl_loss_gradient_is_dt_times_the_kl_gradient():
    x, v_t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    v = (v_t + 0.3).requires_grad_()
    t = common.timesteps(10)
    common.opd_loss("kl", v, v_t, x, None, t[2], t[3], 0.7).sum().backward()
    w = v.clone().detach().requires_grad_()
    ((t[2] - t[3]) * common.step_kl(w, v_t, t[2], t[3], 0.7)).sum().backward()
    assert torch.allclose(v.grad, w.grad)


@pytest.mark.parametrize("extra,error,message", [
    (["--teachers", "ocr=PLACEHOLDER"], ValueError, "no teacher for task.*pickscore"),
    (["--states", "5"], ValueError, "--states 5 must be between 1 and the 2 trained steps"),
    (["--mar-teacher", "/nope/anchor"], FileNotFoundError, "does not exist"),
    (["--route", "single"], ValueError, "--single-teacher"),
    (["--group-size", "0"], ValueError, "group-size must be a positive"),
])
def test_bad_input_fails_with_a_clear_message(tiny_model, world, tmp_path, extra, error, message):
    extra = [e.replace("PLACEHOLDER", str(world / "ocr")) for e in extra]
    with pytest.raises(error, match=message):
        opd.main(opd.parse_args(_argv(tiny_model, world, tmp_path / "bad", *extra)))
    assert not (tmp_path / "bad").exists()
