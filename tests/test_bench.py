"""bench.py --quick: every configuration runs in its own process, the JSON has the README's keys, and the
counts that the speed claims rest on are right."""
import json
import math

import bench


def test_quick_bench_reports_ratios_and_counts(tmp_path):
    bench.main(bench.parse_args(["--quick", "--out", str(tmp_path)]))
    with open(tmp_path / "bench.json") as f:
        out = json.load(f)
    for key in ("memory_ratio_shared", "memory_ratio_copies", "time_ratio_shared_vs_copies", "overhead_fraction",
                "sampler_vs_diffusers", "fast_speedup"):
        assert math.isfinite(out[key]) and out[key] > 0, key
    assert (tmp_path / "table.md").read_text().startswith("| measure")
    # the released layout holds K + 1 more transformers than the shared base
    assert out["memory_ratio_copies"] > out["memory_ratio_shared"]
    # both layouts compute the same step (same rollouts, teachers and losses)
    shared, copies = out["configs"]["shared"], out["configs"]["copies"]
    assert out["loss_shared_minus_copies"] <= 1e-4 * abs(shared["loss"])
    # one teacher forward per distinct routed teacher and supervised state (3 tasks, 2 samples each),
    # where one per prompt would be 6; the anchor once per state; every trained step supervised
    trained = list(range(4))  # 5 sampling steps x 0.99
    assert shared["supervised_steps"] == shared["teacher_steps"] == trained
    assert out["teacher_forwards"] == copies["teacher_forwards"] == 3 * len(trained)
    assert out["teacher_forwards_per_prompt"] == 6 * len(trained)
    assert shared["anchor_forwards"] == len(trained)
    # --states 2: the teachers are called on exactly the 2 drawn low-noise steps
    fast = shared["fast"]
    assert len(fast["teacher_steps"]) == 2 and fast["teacher_steps"] == fast["supervised_steps"]
    assert set(fast["teacher_steps"]) <= {2, 3} and out["fast_teacher_forwards"] == 3 * 2
    # our ODE sampler is diffusers' StableDiffusion3Pipeline
    assert shared["sampler"]["max_abs_diff"] < 1e-5
