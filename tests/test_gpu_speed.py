"""benchmarks/gpu_speed.py on the CPU: the trainer's step under each precision setting, ratios to fp32."""

from repo_modules import load


def test_settings_are_measured_against_fp32_in_one_process(capsys):
    bench = load("benchmarks/gpu_speed.py")
    summary = bench.main(["--quick", "--device", "cpu", "--cases", "cps_cutmix_r50_512",
                          "--settings", "bf16", "bf16_channels_last"])
    results = summary["cases"]["cps_cutmix_r50_512"]
    assert list(results) == ["fp32", "bf16", "bf16_channels_last"]  # fp32 first: the baseline
    assert results["fp32"]["speed_vs_fp32"] == 1.0 and results["fp32"]["loss_rel_diff_vs_fp32"] == 0.0
    for name in ("bf16", "bf16_channels_last"):
        r = results[name]
        assert r["method"] == "cps_cutmix" and r["images_per_step"] == 3 * r["batch"]  # labeled + two streams
        assert len(r["losses"]) == r["warmup_steps"] + 1 and r["speed_vs_fp32"] > 0
        # bf16 really computes in bf16 (the losses move) and stays close to fp32 over these steps
        assert 0 < r["loss_rel_diff_vs_fp32"] < 1e-2
    assert summary["device"].startswith("CPU") and capsys.readouterr().out.strip().splitlines()[-1].startswith("{")


def test_the_ema_teacher_case_runs_each_setting():
    """UniMatch V2: the case whose teacher goes through the trainer's autocast_follower."""
    bench = load("benchmarks/gpu_speed.py")
    results = bench.main(["--quick", "--device", "cpu", "--cases", "unimatch_v2_dinov2s_518",
                          "--settings", "bf16"])["cases"]["unimatch_v2_dinov2s_518"]
    assert results["bf16"]["method"] == "unimatch_v2" and results["bf16"]["images_per_step"] == 2 * results["bf16"]["batch"]
    assert len(results["bf16"]["pseudo_kept_u"]) == len(results["bf16"]["losses"])  # logged per step
