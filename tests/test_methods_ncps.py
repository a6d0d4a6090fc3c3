"""n-CPS (`ncps`, `ncps_cutmix`): N = 2 is CPS exactly, N = 3 matches the pairwise formula, and the
training loop builds, checkpoints, resumes and syncs N networks."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cps_hf.cutmix import box_mask
from cps_hf.losses import cross_entropy
from cps_hf.methods import NCPSMethod, build_method
from test_methods import NUM_CLASSES, TinySegmenter, _batch, _logits
from test_train import _launch_two_cpu_processes, _read_log, demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: F401


def _models(n):
    return [TinySegmenter(k).train() for k in range(n)]


def _run(name, n, batch, step=0, rank=0, micro_step=0, **options):
    models = _models(n)
    out = build_method(name, cross_entropy, generator_seed=5, **options)(
        models, batch, step=step, rank=rank, micro_step=micro_step)
    out.loss.backward()
    return models, out


def _assert_same_step(models_a, out_a, models_b, out_b):
    assert torch.equal(out_a.loss, out_b.loss)
    assert out_a.logs.keys() == out_b.logs.keys()
    for key in out_a.logs:
        a, b = out_a.logs[key], out_b.logs[key]
        assert a == b or (a != a and b != b), key  # equal, or both NaN
    for model_a, model_b in zip(models_a, models_b):
        assert [(c.batch, c.grad) for c in model_a.calls] == [(c.batch, c.grad) for c in model_b.calls]
        for x, y in zip(model_a.calls, model_b.calls):
            assert torch.equal(x.x, y.x)
        for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
            assert torch.equal(p.grad, q.grad), name
        for (name, p), q in zip(model_a.named_buffers(), model_b.buffers()):
            assert torch.equal(p, q), name  # BN running statistics saw the same forwards


# ---- N = 2 is CPS ---------------------------------------------------------------------------


@pytest.mark.parametrize("labeled,unlabeled,cps_on_labeled,average",
                         [(2, 2, True, False), (2, 3, True, True), (2, 3, False, False)])
def test_two_networks_reproduce_cps(labeled, unlabeled, cps_on_labeled, average):
    batch = _batch(1, labeled, unlabeled)
    reference = _run("cps", 2, batch, cps_weight=1.5, cps_on_labeled=cps_on_labeled)
    ours = _run("ncps", 2, batch, cps_weight=1.5, cps_on_labeled=cps_on_labeled, num_networks=2,
                ncps_sum=not average)
    _assert_same_step(*reference, *ours)


@pytest.mark.parametrize("options", [dict(pseudo_label_threshold=0.45), dict(cps_on_unlabeled=False),
                                     dict(pseudo_label_threshold=0.45, cps_on_labeled=False)])
def test_two_networks_reproduce_cps_with_its_options(options):
    streams = 0 if options.get("cps_on_unlabeled") is False else 1
    assert build_method("ncps", cross_entropy, **options).num_unlabeled_streams == streams
    batch = _batch(streams, 2, 3)
    reference = _run("cps", 2, batch, cps_weight=1.5, **options)
    ours = _run("ncps", 2, batch, cps_weight=1.5, num_networks=2, **options)
    _assert_same_step(*reference, *ours)
    if "pseudo_label_threshold" in options:
        assert 0 < ours[1].logs["pseudo_kept_u"] < 1


def test_two_networks_reproduce_cps_in_the_warmup():
    batch = _batch(1)
    _assert_same_step(*_run("cps", 2, batch, step=1, cps_weight=1.5, supervised_warmup_steps=2),
                      *_run("ncps", 2, batch, step=1, cps_weight=1.5, supervised_warmup_steps=2, num_networks=2))


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.45])
def test_two_networks_reproduce_cps_cutmix(average, threshold):
    batch = _batch(2, labeled=2, unlabeled=3)
    key = dict(step=4, rank=1, micro_step=1, pseudo_label_threshold=threshold)
    reference = _run("cps_cutmix", 2, batch, cps_weight=1.0, **key)
    ours = _run("ncps_cutmix", 2, batch, cps_weight=1.0, num_networks=2, ncps_sum=not average, **key)
    _assert_same_step(*reference, *ours)
    assert ("pseudo_kept_u" in ours[1].logs) == (threshold > 0)


# ---- N = 3 against the pairwise formula --------------------------------------------------------


def _cross(students, teachers, average, ignore_index=255, over_all_pixels=False):
    """sum_i w sum_{j != i} CE(students[i], argmax teachers[j]), written out independently; each CE a mean
    over the kept pixels, or (`over_all_pixels`, UniMatch's normalisation) a sum over them / all pixels."""
    n = len(students)
    w = 1.0 / (n - 1) if average else 1.0

    def ce(logits, target):
        if over_all_pixels:
            return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / target.numel()
        return F.cross_entropy(logits, target, ignore_index=ignore_index)

    return sum(w * ce(students[i], teachers[j]) for i in range(n) for j in range(n) if i != j)


def _pairwise_agreement(predictions):
    n = len(predictions)
    ratios = [(predictions[i] == predictions[j]).float().mean() for i in range(n) for j in range(i + 1, n)]
    return torch.stack(ratios).mean().item()


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("cps_on_labeled", [True, False])
def test_three_networks_plain_loss_is_the_pairwise_sum(average, cps_on_labeled):
    labeled, unlabeled = 2, 3
    batch = _batch(1, labeled, unlabeled)
    models, out = _run("ncps", 3, batch, cps_weight=1.5, num_networks=3, ncps_sum=not average,
                       cps_on_labeled=cps_on_labeled)
    for model in models:
        assert [c.batch for c in model.calls] == [labeled, unlabeled]  # cps's order, per network

    fresh = _models(3)
    x_l, y, x_u = batch["labeled"]["pixel_values"], batch["labeled"]["labels"], batch["unlabeled"][0]["pixel_values"]
    logits_l = [_logits(m, x_l) for m in fresh]
    logits_u = [_logits(m, x_u) for m in fresh]
    sup = [F.cross_entropy(lg, y, ignore_index=255) for lg in logits_l]
    cps_u = _cross(logits_u, [lg.detach().argmax(1) for lg in logits_u], average)
    if cps_on_labeled:
        cps_l = _cross(logits_l, [lg.detach().argmax(1) for lg in logits_l], average)
        cps = (labeled * cps_l + unlabeled * cps_u) / (labeled + unlabeled)  # the original's concatenated mean
    else:
        cps = cps_u
    expected = sum(sup) + 1.5 * cps
    assert torch.allclose(out.loss, expected, atol=1e-6)
    expected.backward()
    for model, reference in zip(models, fresh):
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6)

    logs = out.logs
    assert logs["loss_sup"] == pytest.approx(sum(sup).item(), abs=1e-6)
    assert [logs[f"loss_sup_{k}"] for k in (1, 2, 3)] == pytest.approx([s.item() for s in sup], abs=1e-6)
    assert logs["loss_cps"] == pytest.approx(cps.item(), abs=1e-6)
    assert logs["loss_cps_u"] == pytest.approx(cps_u.item(), abs=1e-6)
    assert ("loss_cps_l" in logs) == cps_on_labeled
    assert logs["agreement_u"] == pytest.approx(_pairwise_agreement([lg.argmax(1) for lg in logits_u]), abs=1e-6)
    assert logs["agreement_l"] == pytest.approx(_pairwise_agreement([lg.argmax(1) for lg in logits_l]), abs=1e-6)
    assert 0.0 <= logs["agreement_u_fg"] <= 1.0 or logs["agreement_u_fg"] != logs["agreement_u_fg"]


def test_the_default_divides_each_networks_cross_terms_by_n_minus_1_as_the_reference():
    """AI-Clearing/n-cps divides the cross term by n - 1; ncps_sum keeps the plain sum."""
    batch = _batch(1)
    summed = _run("ncps", 4, batch, cps_weight=1.0, num_networks=4, ncps_sum=True)[1].logs
    averaged = _run("ncps", 4, batch, cps_weight=1.0, num_networks=4)[1].logs
    assert averaged["loss_cps"] == pytest.approx(summed["loss_cps"] / 3, rel=1e-5)
    assert averaged["loss_sup"] == summed["loss_sup"]


def test_cps_on_unlabeled_off_keeps_the_labeled_term_and_skips_unlabeled_forwards():
    batch = _batch(0)
    models, out = _run("ncps", 3, batch, cps_weight=1.0, num_networks=3, cps_on_unlabeled=False)
    assert all([c.batch for c in m.calls] == [2] for m in models)
    assert out.logs["loss_cps"] == out.logs["loss_cps_l"] and "loss_cps_u" not in out.logs
    with pytest.raises(ValueError, match="both be off"):
        build_method("ncps", cross_entropy, cps_on_labeled=False, cps_on_unlabeled=False)


@pytest.mark.parametrize("average", [False, True])
def test_three_networks_cutmix_matches_the_pairwise_formula(average):
    batch = _batch(2, labeled=2, unlabeled=3)
    models, out = _run("ncps_cutmix", 3, batch, step=7, rank=1, cps_weight=1.0, num_networks=3,
                       ncps_sum=not average)
    method = build_method("ncps_cutmix", cross_entropy, generator_seed=5, num_networks=3)
    mask = box_mask(3, 12, 12, generator=method.generator(7, rank=1, micro_step=0))
    assert 0 < mask.mean() < 1
    u0, u1 = batch["unlabeled"][0]["pixel_values"], batch["unlabeled"][1]["pixel_values"]
    mixed = u0 * (1 - mask) + u1 * mask
    for model in models:  # teachers on u0 and u1 without gradient, the student on the mix, the labelled batch
        assert [(c.batch, c.grad) for c in model.calls] == [(3, False), (3, False), (3, True), (2, True)]
        assert torch.allclose(model.calls[2].x, mixed)

    fresh = _models(3)
    with torch.no_grad():
        targets = [(_logits(m, u0) * (1 - mask) + _logits(m, u1) * mask).argmax(1) for m in fresh]
    students = [_logits(m, mixed) for m in fresh]
    cps = _cross(students, targets, average)
    x_l, y = batch["labeled"]["pixel_values"], batch["labeled"]["labels"]
    expected = sum(F.cross_entropy(_logits(m, x_l), y, ignore_index=255) for m in fresh) + cps
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.logs["loss_cps"] == pytest.approx(cps.item(), abs=1e-6) and "loss_cps_l" not in out.logs
    assert out.logs["agreement_u"] == pytest.approx(_pairwise_agreement([s.argmax(1) for s in students]), abs=1e-6)
    expected.backward()
    for model, reference in zip(models, fresh):
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6)


@pytest.mark.parametrize("normalize", ["valid", "kept"])
@pytest.mark.parametrize("name", ["ncps", "ncps_cutmix"])
def test_pseudo_label_threshold_ignores_unconfident_pixels(name, normalize):
    threshold = 0.45
    streams = 1 if name == "ncps" else 2
    batch = _batch(streams, labeled=2, unlabeled=3)
    models, out = _run(name, 3, batch, cps_weight=1.0, num_networks=3, pseudo_label_threshold=threshold,
                       cps_on_labeled=False if name == "ncps" else None, pseudo_label_normalize=normalize)
    fresh = _models(3)
    u0 = batch["unlabeled"][0]["pixel_values"]
    if name == "ncps":
        teachers = [_logits(m, u0).detach() for m in fresh]
        students = [_logits(m, u0) for m in fresh]
    else:
        mask = box_mask(3, 12, 12, generator=build_method(name, cross_entropy, generator_seed=5).generator(0))
        u1 = batch["unlabeled"][1]["pixel_values"]
        with torch.no_grad():
            teachers = [_logits(m, u0) * (1 - mask) + _logits(m, u1) * mask for m in fresh]
        students = [_logits(m, u0 * (1 - mask) + u1 * mask) for m in fresh]
    confident = [t.softmax(1).amax(1) >= threshold for t in teachers]
    kept = [c.float().mean().item() for c in confident]
    assert all(0 < k < 1 for k in kept)  # the threshold really drops some pixels and keeps others
    targets = [t.argmax(1).masked_fill(~c, 255) for t, c in zip(teachers, confident)]
    cps = _cross(students, targets, average=True, over_all_pixels=normalize == "valid")
    assert out.logs["loss_cps"] == pytest.approx(cps.item(), abs=1e-6)
    assert [out.logs[f"pseudo_kept_u_{k}"] for k in (1, 2, 3)] == pytest.approx(kept, abs=1e-6)
    assert out.logs["pseudo_kept_u"] == pytest.approx(sum(kept) / 3, abs=1e-6)
    plain = _run(name, 3, batch, cps_weight=1.0, num_networks=3, cps_on_labeled=False if name == "ncps" else None)
    assert not any(key.startswith("pseudo_kept") for key in plain[1].logs)
    assert plain[1].logs["loss_cps"] != pytest.approx(out.logs["loss_cps"])


# ---- the contract the loop relies on ------------------------------------------------------------


def test_network_count_names_and_options():
    trainer_options = dict(cps_weight=1.5, cps_weight_rampup_steps=0, supervised_warmup_steps=0, cps_on_labeled=None,
                           cps_on_unlabeled=None, pseudo_label_threshold=0.0, ema_decay=0.99, num_networks=4,
                           ncps_sum=False, generator_seed=0, background_index=None)
    method = build_method("ncps", cross_entropy, **trainer_options)
    assert isinstance(method, NCPSMethod) and method.cps_on_labeled and method.cps_on_unlabeled
    assert method.num_models == 4 and method.trained_count == 4 and NCPSMethod.num_models == 3  # class default kept
    assert method.names() == ("network_1", "network_2", "network_3", "network_4")
    assert method.export_index(None) == 0 and method.export_index("network_4") == 3
    assert build_method("ncps", cross_entropy, **{**trainer_options, "num_networks": None}).num_models == 3
    cutmix = build_method("ncps_cutmix", cross_entropy, **{**trainer_options, "num_networks": 2})
    assert cutmix.num_models == 2 and cutmix.num_unlabeled_streams == 2
    with pytest.raises(ValueError, match="needs 4 model"):
        method(_models(3), _batch(1), step=0)
    with pytest.raises(ValueError, match="num_networks"):
        build_method("ncps", cross_entropy, num_networks=1)
    with pytest.raises(ValueError, match="unlabeled"):
        build_method("ncps_cutmix", cross_entropy, cps_on_labeled=True)


def test_three_networks_warmup_skips_unlabeled_work():
    models, out = _run("ncps_cutmix", 3, _batch(2), step=0, cps_weight=1.0, num_networks=3, supervised_warmup_steps=1)
    assert all([c.batch for c in m.calls] == [2] for m in models)
    assert not any(key.startswith(("loss_cps", "agreement_u", "pseudo_kept")) for key in out.logs)


# ---- end to end through scripts/train_cps.py ----------------------------------------------------


@pytest.mark.parametrize("ours,reference", [("ncps", "cps"), ("ncps_cutmix", "cps_cutmix")])
def test_two_network_run_ends_with_the_weights_of_the_cps_run(demo_root, tmp_path, ours, reference):
    common = ("--max_train_steps", "2", "--seed", "3")
    expected = train_cps.main(tiny_args(demo_root, tmp_path / reference, "--method", reference, *common))
    got = train_cps.main(tiny_args(demo_root, tmp_path / ours, "--method", ours, "--num_networks", "2", *common))
    assert got["parameter_fingerprint"] == expected["parameter_fingerprint"]
    saved = json.loads((tmp_path / ours / "all_results.json").read_text())
    assert saved["parameter_fingerprint"] == expected["parameter_fingerprint"]
    logs = [{k: v for k, v in r.items() if k.startswith(("loss", "agreement"))} for r in _read_log(tmp_path / ours)]
    reference_logs = [{k: v for k, v in r.items() if k.startswith(("loss", "agreement"))}
                      for r in _read_log(tmp_path / reference)]
    assert logs == reference_logs


def test_three_networks_train_checkpoint_resume_and_export_network_1(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    out = tmp_path / "ncps3"
    common = ("--method", "ncps", "--num_networks", "3", "--max_train_steps", "2", "--checkpointing_steps", "1")
    straight = train_cps.main(tiny_args(demo_root, out, *common))
    assert straight["final_step"] == 2
    step_dir = out / "step_2"
    for name in ("model.safetensors", "model_1.safetensors", "model_2.safetensors"):
        assert (step_dir / name).is_file(), name
    assert not (step_dir / "model_3.safetensors").exists()
    records = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert all(f"loss_sup_{k}" in record for k in (1, 2, 3))
        assert record["loss"] == pytest.approx(record["loss_sup"] + record["cps_weight"] * record["loss_cps"], rel=1e-5)
    # model/ is network_1: the first network's checkpointed weights (the loop saves model.safetensors first).
    exported = load_file(out / "model" / "model.safetensors")
    first = load_file(step_dir / "model.safetensors")
    assert exported.keys() == first.keys() and all(torch.equal(exported[k], first[k]) for k in exported)
    assert "network_1 (network 1 of 3)" in (out / "model" / "README.md").read_text()

    shutil.rmtree(out / "step_2")
    shutil.rmtree(out / "model")
    (out / "all_results.json").unlink()
    resumed = train_cps.main(tiny_args(demo_root, out, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["final_step"] == 2
    assert resumed["parameter_fingerprint"] == straight["parameter_fingerprint"]
    assert [r["step"] for r in _read_log(out) if "loss" in r] == [1, 2]


def test_three_networks_two_cpu_processes_stay_in_sync(demo_root, tmp_path):
    out = tmp_path / "ddp"
    _launch_two_cpu_processes(tiny_args(demo_root, out, "--method", "ncps", "--num_networks", "3",
                                        "--max_train_steps", "2"))
    results = json.loads((out / "all_results.json").read_text())  # the script checks fingerprints across ranks
    assert results["num_processes"] == 2 and results["final_step"] == 2
    assert [r["step"] for r in _read_log(out) if "loss" in r] == [1, 2]
