"""scripts/train_cps.py end to end on a tiny generated VOC tree: CPS, CPS+CutMix, supervised,
resume, two CPU processes under `accelerate launch`, and the config/flag contract."""

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cps_hf.data import DEMO_CLASSES, make_demo_voc
from cps_hf.errors import ConfigError
from repo_modules import load

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_cps.py"


train_cps = load("scripts/train_cps.py")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator (mixed precision differs between tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # also undo tests elsewhere that built an Accelerator in this process
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_voc(root, num_train=40, num_val=6, size=(40, 52), seed=0)
    return root


def tiny_args(demo_root, output_dir, *extra):
    return [
        "--dataset", "voc", "--data_root", str(demo_root), "--labeled", "8", "--backbone", "mobilenetv3_small_100",
        "--pretrained_backbone", "none", "--crop_size", "32", "--scales", "0.75", "1.0",
        "--per_device_train_batch_size", "2", "--aspp_channels", "16", "--decoder_channels", "16",
        "--low_level_channels", "8", "--learning_rate", "0.01", "--num_workers", "0", "--report_to", "none",
        "--logging_steps", "1", "--output_dir", str(output_dir), *extra,
    ]


def _read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["cps", "cps_cutmix"])
def test_tiny_run_end_to_end(demo_root, tmp_path, method):
    out = tmp_path / method
    results = train_cps.main(tiny_args(demo_root, out, "--method", method, "--max_train_steps", "3",
                                       "--eval_steps", "2"))
    # Outputs: pipeline-ready model, evaluate-style results, the config used, the step log.
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "README.md", "config.json", "configuration_cps.py", "image_processing_cps.py", "model.safetensors",
        "modeling_cps.py", "preprocessor_config.json"]
    saved = json.loads((out / "all_results.json").read_text())
    for key in ("eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_per_category_iou"):
        assert key in saved
    assert saved["final_step"] == 3 and results["final_step"] == 3
    assert 0.0 <= saved["eval_mean_iou"] <= 1.0
    assert len(saved["eval_per_category_iou"]) == len(DEMO_CLASSES)  # demo classes.json, not VOC's 21
    used = yaml.safe_load((out / "training_config.yaml").read_text())
    assert used["method"] == method and used["max_train_steps"] == 3

    records = _read_log(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:  # each loss term separately, the LR, throughput and the two networks' agreement
        for key in ("loss", "loss_sup", "loss_sup_1", "loss_sup_2", "loss_cps", "loss_cps_u", "lr",
                    "images_per_second", "agreement_u"):
            assert key in record, key
        expected = record["loss_sup"] + record["cps_weight"] * record["loss_cps"]
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
    assert steps[0]["lr"] > steps[1]["lr"] > steps[2]["lr"] > 0  # poly decay per iteration
    evals = [r for r in records if "eval_mean_iou" in r]
    assert [r["step"] for r in evals] == [2, 3]
    per_class = {k: v for k, v in evals[-1].items() if k.startswith("eval_iou/")}
    assert per_class and set(per_class) <= {f"eval_iou/{name}" for name in DEMO_CLASSES}

    # The exported branch is what the pipeline serves, with the dataset's class names.
    from transformers import pipeline
    from PIL import Image

    segmenter = pipeline("image-segmentation", model=str(out / "model"), subtask="semantic")
    image = Image.new("RGB", (45, 33), (120, 30, 200))
    masks = segmenter(image)
    assert masks and all(m["mask"].size == image.size for m in masks)
    assert {m["label"] for m in masks} <= set(DEMO_CLASSES)


def test_save_best_model_exports_the_best_evaluated_network(demo_root, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "best"
    results = train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "4",
                                       "--eval_steps", "1", "--save_best_model"))
    evals = {r["step"]: r["eval_mean_iou"] for r in _read_log(out) if "eval_mean_iou" in r}
    best_step = max(evals, key=lambda step: (evals[step], -step))  # the first of equal bests
    assert results["best_step"] == best_step and results["best_eval_mean_iou"] == pytest.approx(evals[best_step])
    card = ModelCard.load(out / "model_best" / "README.md")
    mean_iou = next(r.metric_value for r in card.data.eval_results if r.metric_type == "mean_iou")
    assert mean_iou == pytest.approx(evals[best_step])
    final_card = ModelCard.load(out / "model" / "README.md")
    assert next(r.metric_value for r in final_card.data.eval_results if r.metric_type == "mean_iou") == pytest.approx(
        evals[4])


def test_supervised_baseline_trains_one_network(demo_root, tmp_path):
    out = tmp_path / "sup"
    train_cps.main(tiny_args(demo_root, out, "--method", "supervised", "--max_train_steps", "2",
                             "--checkpointing_steps", "2"))
    step_dir = out / "step_2"
    assert (step_dir / "model.safetensors").exists() and not (step_dir / "model_1.safetensors").exists()
    record = _read_log(out)[0]
    assert "loss_cps" not in record and record["loss"] == pytest.approx(record["loss_sup"])


def test_bf16_and_gradient_accumulation(demo_root, tmp_path):
    """Mixed precision (bf16 autocast works on CPU) with two micro-batches per optimizer step."""
    out = tmp_path / "bf16"
    results = train_cps.main(tiny_args(demo_root, out, "--method", "cps_cutmix", "--max_train_steps", "2",
                                       "--mixed_precision", "bf16", "--gradient_accumulation_steps", "2"))
    assert results["final_step"] == 2
    records = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[0]["lr"] > records[1]["lr"]  # the scheduler stepped once per optimizer step, not per micro-batch


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_cuda_run_in_each_precision(demo_root, tmp_path, precision):
    """On a GPU: a CPS+CutMix run in fp32, fp16 (grad scaler) and bf16 trains on CUDA, keeps its
    losses finite, logs its peak memory and exports a model whose weights are float32."""
    out = tmp_path / precision
    results = train_cps.main(tiny_args(demo_root, out, "--method", "cps_cutmix", "--max_train_steps", "6",
                                       "--mixed_precision", precision, "--learning_rate", "0.001"))
    assert results["final_step"] == 6 and 0.0 <= results["eval_mean_iou"] <= 1.0
    records = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_sup"], r["loss_cps"]])).all() for r in records)
    assert all(r["max_memory_allocated_gib"] > 0 for r in records)
    weights = load_file(out / "model" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()} == {torch.float32}


def test_resume_mid_run_matches_an_uninterrupted_run(demo_root, tmp_path, monkeypatch):
    """Stop at step 2 and resume: same weights at step 4 as a run that never stopped
    (models, optimizer, scheduler, RNG and the data streams all come back). Runs on the CPU even on a
    GPU machine: on an H200 two uninterrupted 4-step runs already differed (CUDA kernels that add
    with atomics, amplified by argmax pseudo labels)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    common = ("--method", "cps_cutmix", "--max_train_steps", "4", "--checkpointing_steps", "2")
    straight = train_cps.main(tiny_args(demo_root, tmp_path / "straight", *common))

    interrupted = tmp_path / "interrupted"
    train_cps.main(tiny_args(demo_root, interrupted, *common[:-2], "--checkpointing_steps", "2"))
    # Simulate a crash after step 2: drop what came later, then resume from the latest checkpoint.
    assert (interrupted / "step_2" / "checkpoint_complete.json").is_file()
    shutil.rmtree(interrupted / "step_4")
    shutil.rmtree(interrupted / "model")
    resumed = train_cps.main(tiny_args(demo_root, interrupted, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["final_step"] == 4
    assert resumed["parameter_fingerprint"] == straight["parameter_fingerprint"]
    steps = [r["step"] for r in _read_log(interrupted) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the log tells one story, without the lost steps twice
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(interrupted / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_compiled_run_trains_exports_and_resumes_like_an_uncompiled_one(demo_root, tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend ...`: the prepared networks are torch.compile wrappers (state-dict keys
    with `_orig_mod.`). Export, evaluation, the checkpoint check and resume take the bare networks. Dynamo's eager
    backend runs the captured graphs op by op, so on the CPU the weights match an uncompiled run's exactly."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    common = ("--method", "cps_cutmix", "--max_train_steps", "4", "--checkpointing_steps", "2")
    plain = train_cps.main(tiny_args(demo_root, tmp_path / "plain", *common))
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the state of the plain run would keep dynamo off
    compile_calls = []
    original_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_calls.append(kw) or original_compile(model, **kw))
    compiled = tmp_path / "compiled"
    straight = train_cps.main(tiny_args(demo_root, compiled, *common))
    assert len(compile_calls) == 2 and compile_calls[0]["backend"] == "eager"  # both networks really compiled
    assert straight["parameter_fingerprint"] == plain["parameter_fingerprint"]
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(compiled / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # no _orig_mod. in the export
    shutil.rmtree(compiled / "step_4")
    shutil.rmtree(compiled / "model")
    resumed = train_cps.main(tiny_args(demo_root, compiled, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["final_step"] == 4 and resumed["parameter_fingerprint"] == plain["parameter_fingerprint"]


def _launch_two_cpu_processes(args, timeout=300):
    """Two gloo processes on the CPU (GPU machines too); fails with each rank's error lines."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    rank_lines = [line for line in completed.stderr.splitlines() if line.startswith("[rank")]
    assert completed.returncode == 0, "\n".join(rank_lines[-60:]) or completed.stderr[-3000:]


def test_two_cpu_processes_stay_in_sync(demo_root, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): both ranks end with identical
    weights (the script checks parameter fingerprints across ranks), and the step count is right."""
    out = tmp_path / "ddp"
    _launch_two_cpu_processes(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "3"))
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["final_step"] == 3
    assert [r["step"] for r in _read_log(out) if "loss" in r] == [1, 2, 3]


def test_unfinished_checkpoint_saves_are_passed_over(tmp_path):
    """A crash while saving leaves step_N without its completion marker: resume takes the newest
    complete folder (and says which it skipped), pruning never counts or keeps unfinished ones."""
    from cps_hf.training import COMPLETE_MARKER, find_checkpoint, mark_checkpoint_complete, prune_checkpoints

    for step in (2, 4, 6, 8):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "model.safetensors").write_bytes(b"weights")
    for step in (2, 4, 6):
        mark_checkpoint_complete(tmp_path / f"step_{step}", step)
    (tmp_path / "step_3").mkdir()  # an older crash, never marked
    with pytest.warns(UserWarning, match=r"step_8.*resuming from step_6"):
        assert find_checkpoint(tmp_path, "latest") == tmp_path / "step_6"
    with pytest.raises(ValueError, match="did not finish"):
        find_checkpoint(tmp_path, str(tmp_path / "step_8"))
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_6", "step_8"]  # step_8 may still be written
    assert (tmp_path / "step_6" / COMPLETE_MARKER).is_file()


def test_streamed_pool_two_processes_resume_exactly(demo_root, tmp_path):
    """--unlabeled_stream (parquet read as a stream) under 2 CPU processes: a run stopped after
    step 3 and resumed ends with the weights of an uninterrupted run, although the two ranks'
    shards (6 and 5 records) were at different points of their passes when the checkpoint was written."""
    import datasets as hf_datasets
    from PIL import Image

    pool = hf_datasets.Dataset.from_dict({"image": [Image.new("RGB", (52, 40), (30 * i, 90, 200 - 20 * i))
                                                    for i in range(7)]})
    for shard in range(3):
        pool.shard(3, shard, contiguous=True).to_parquet(tmp_path / f"pool{shard}.parquet")
    common = ("--method", "cps", "--labeled", "36", "--unlabeled_stream", f"{tmp_path}/pool*.parquet",
              "--unlabeled_length", "11", "--max_train_steps", "5", "--checkpointing_steps", "3")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _launch_two_cpu_processes([*tiny_args(demo_root, straight), *common])
    _launch_two_cpu_processes([*tiny_args(demo_root, interrupted), *common])
    state = torch.load(interrupted / "step_3" / "custom_checkpoint_0.pkl", weights_only=False)
    by_rank = state["streamed_positions_by_rank"]
    assert len(by_rank) == 2 and by_rank[0] != by_rank[1]  # rank 0's position alone would be wrong for rank 1
    shutil.rmtree(interrupted / "model")
    (interrupted / "all_results.json").unlink()
    _launch_two_cpu_processes([*tiny_args(demo_root, interrupted), *common, "--resume_from_checkpoint", "latest"])
    results = [json.loads((folder / "all_results.json").read_text()) for folder in (straight, interrupted)]
    assert results[1]["final_step"] == 5 and results[1]["num_unlabeled"] == "streamed"
    assert results[1]["parameter_fingerprint"] == results[0]["parameter_fingerprint"]


def test_unknown_flags_and_fields_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown argument\(s\): --no_such_flag"):  # one line, not argparse's exit
        train_cps.main(["--no_such_flag", "1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: voc\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        train_cps.main(["--config", str(bad)])


def test_every_preset_parses_and_is_generated(tmp_path):
    from cps_hf.training_args import parse_args

    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(presets) >= 45
    for preset in presets:
        args = parse_args(["--config", str(preset)])
        assert args.preset_note, preset.name
    check = subprocess.run([sys.executable, str(ROOT / "configs" / "generate_presets.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_own_data_has_its_own_starting_preset_and_folder():
    """The README's own-data command starts from configs/own_data.yaml, not the demo's narrow head, random
    init and high lr, and writes to its own folder, not into outputs/demo."""
    from cps_hf.training_args import parse_args

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    command = next(line for line in section.splitlines() if "scripts/train_cps.py" in line)
    assert "--config configs/own_data.yaml" in command and "configs/demo.yaml" not in section
    own, demo = parse_args(["--config", "configs/own_data.yaml"]), parse_args(["--config", "configs/demo.yaml"])
    assert own.dataset == "folder" and own.output_dir == "outputs/my_data" != demo.output_dir
    assert (own.pretrained_backbone, own.aspp_channels, own.decoder_channels, own.low_level_channels) == ("timm", 256, 256, 48)
    assert own.learning_rate < demo.learning_rate and own.checkpointing_steps and own.eval_steps


def test_compare_methods_runs_each_method_and_seed(demo_root, tmp_path, capsys):
    """scripts/compare_methods.py (how the README's demo table is made): one run per method and
    seed, same preset, a summary whose numbers are the runs' own results."""
    compare = load("scripts/compare_methods.py")
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(dict(
        dataset="voc", data_root=str(demo_root), labeled="8", backbone="mobilenetv3_small_100",
        pretrained_backbone="none", crop_size=32, scales=[0.75, 1.0], per_device_train_batch_size=2,
        aspp_channels=16, decoder_channels=16, low_level_channels=8, num_workers=0, max_train_steps=1,
    )))
    out = tmp_path / "compare"
    summary = compare.main(["--config", str(preset), "--methods", "supervised", "cps",
                            "--seeds", "0", "1", "--output_dir", str(out)])
    for method in ("supervised", "cps"):
        finals = summary["methods"][method]["final_mean_iou"]
        assert len(finals) == 2
        for seed, value in zip((0, 1), finals):
            saved = json.loads((out / f"{method}_seed{seed}" / "all_results.json").read_text())
            assert saved["method"] == method and saved["eval_mean_iou"] == value
    assert "| supervised |" in capsys.readouterr().out


def test_parameters_that_never_reach_the_logits_are_frozen():
    """timm's features_only HRNet keeps branches for levels we do not tap: under DDP their
    gradient-less parameters would stop the second step, so the trainer freezes them."""
    from cps_hf import CPSConfig
    from cps_hf.training import build_networks, freeze_unreachable_parameters

    def config(backbone, **kw):
        return CPSConfig(backbone=backbone, num_labels=3, aspp_channels=16, decoder_channels=16,
                         low_level_channels=8, **kw)

    (hrnet,) = build_networks(config("hrnet_w18_small", output_stride=None), 1)
    frozen = freeze_unreachable_parameters(hrnet)
    assert frozen and all(name.startswith("backbone.") for name in frozen)
    assert not any(p.requires_grad for n, p in hrnet.named_parameters() if n in frozen)
    assert hrnet.training  # mode restored
    hrnet(pixel_values=torch.randn(2, 3, 64, 64)).logits.sum().backward()
    assert all(p.grad is not None for p in hrnet.parameters() if p.requires_grad)
    (resnet,) = build_networks(config("resnet18"), 1)
    assert freeze_unreachable_parameters(resnet) == []


def test_step_logs_average_each_key_over_the_micro_batches_that_logged_it():
    """A per-class kept fraction exists only where that class was predicted: averaged where it exists,
    never dropped because one micro-batch lacks it (ranks do the same in reduce_logs, tested under DDP)."""
    from cps_hf.training import mean_logs

    logs = mean_logs([{"loss": 1.0, "pseudo_kept_u/red": 0.5}, {"loss": 3.0}, {"loss": 2.0, "pseudo_kept_u/red": 0.25}])
    assert logs == {"loss": 2.0, "pseudo_kept_u/red": 0.375}


def test_agreement_leaves_out_class_0_only_where_it_is_background(tmp_path):
    """Figure 7's `_fg` agreement leaves out background. Where class 0 is a real class (Cityscapes' road,
    MSRC's building) there is no `_fg` log; an explicit None used to fall back to the default, class 0."""
    from cps_hf.methods import StepLogs
    from cps_hf.training import method_from_args

    args = train_cps.parse_args(tiny_args(tmp_path, tmp_path / "out", "--method", "cps"))
    predictions_1, predictions_2 = torch.tensor([[0, 0, 1, 2]]), torch.tensor([[0, 1, 1, 1]])
    for names, index, fg in ((["background", "a", "b"], 0, pytest.approx(1 / 3)), (["road", "sidewalk", "car"], None, None)):
        method = method_from_args(args, names)
        logs = StepLogs()
        method._log_agreement("agreement_u", predictions_1, predictions_2, logs)
        floats = logs.to_floats()
        assert method.background_index == index
        assert floats["agreement_u"] == 0.5 and floats.get("agreement_u_fg") == fg
