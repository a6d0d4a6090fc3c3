"""Hub export, push and pull of CPS models, on a tiny random-init resnet18 model.

- export: the folder round-trips through the Auto classes and the pipeline, and its model card
  parses back with model-index mIoU results;
- push: the commit huggingface_hub would send is captured (no network) and checked file by file;
- pull: a real HTTP download through an `olah` Hub mirror serving the pushed layout from a git
  repository on disk;
- `from_pretrained` never fetches backbone weights; `cps_hf.weights.load_backbone_weights` keeps them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cps_hf.weights import load_backbone_weights
import timm
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

import cps_hf  # noqa: F401  (registers the CPS Auto classes)
from cps_hf import CPSForSemanticSegmentation, CPSImageProcessor
from cps_hf.hub import build_model_card, export_model, push_model

import tiny_models
from tiny_models import logits_of, with_running_statistics

EXPORTED_FILES = ["README.md", "config.json", "configuration_cps.py", "image_processing_cps.py", "model.safetensors",
                  "modeling_cps.py", "preprocessor_config.json"]
ID2LABEL = {0: "bg", 1: "a", 2: "b"}
RESULTS = {
    "eval_mean_iou": np.float64(0.7123),
    "eval_per_category_iou": np.array([0.9, np.nan, 0.5246]),
    "eval_overall_accuracy": 0.9,
    "eval_loss": 0.31,
}
CARD_KWARGS = dict(
    results=RESULTS,
    dataset_name="PASCAL VOC 2012 (augmented)",
    dataset_type="pascal_voc",
    protocol="1/8 (1323 labeled)",
    method="CPS + CutMix",
    training_args={"learning_rate": 0.0025, "per_device_train_batch_size": 8, "cps_weight": 1.5},
    repo_id="org/cps-tiny",
)


tiny_config = partial(tiny_models.tiny_config, list(ID2LABEL.values()), channels=32)


def tiny_model(backbone: str = "resnet18") -> CPSForSemanticSegmentation:
    torch.manual_seed(0)
    return with_running_statistics(CPSForSemanticSegmentation(tiny_config(backbone)))


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same weights, same logits up to float32 rounding (~1e-6).

    Not bit-exact: weights loaded from safetensors sit at other memory alignments than freshly
    built ones, and oneDNN picks other SIMD paths for them (checked: cloning the loaded weights
    makes the logits bit-identical again).
    """
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model() -> CPSForSemanticSegmentation:
    return tiny_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    return export_model(model, tmp_path_factory.mktemp("export") / "cps-tiny", **CARD_KWARGS)


# ---------------------------------------------------------------------------------------------
# Export round trip
# ---------------------------------------------------------------------------------------------


def test_export_writes_only_the_pipeline_files(exported):
    assert sorted(p.name for p in exported.iterdir()) == EXPORTED_FILES


def test_export_round_trips_through_auto_classes(model, exported, pixel_values):
    loaded = AutoModelForSemanticSegmentation.from_pretrained(exported).eval()
    assert isinstance(loaded, CPSForSemanticSegmentation)
    assert_same_logits(logits_of(loaded, pixel_values), logits_of(model, pixel_values))
    assert isinstance(AutoImageProcessor.from_pretrained(exported), CPSImageProcessor)


REMOTE_LOAD = """
import sys, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

folder = sys.argv[1]
model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
segments = pipeline("image-segmentation", model=folder, trust_remote_code=True)(Image.new("RGB", (45, 33), (9, 99, 199)))
torch.manual_seed(0)
with torch.no_grad():
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
torch.save(logits, sys.argv[2])
print(type(model).__module__, type(processor).__module__, "cps_hf" in sys.modules, len(segments))
"""


def test_export_loads_with_trust_remote_code_where_cps_hf_is_not_imported(model, exported, tmp_path):
    """A fresh interpreter that never imports cps_hf loads the export from its own source files
    (transformers' dynamic modules) and computes the same logits."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    logits_file = tmp_path / "logits.pt"
    completed = subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(exported), str(logits_file)],
                               capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    model_module, processor_module, imported_cps_hf, num_segments = completed.stdout.split()[-4:]
    assert model_module.startswith("transformers_modules.") and model_module.endswith(".modeling_cps")
    assert processor_module.startswith("transformers_modules.") and imported_cps_hf == "False"
    assert int(num_segments) >= 1
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model.eval()(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert_same_logits(torch.load(logits_file), expected)  # other thread counts (OMP_NUM_THREADS) differ by ~1e-7
    assert "trust_remote_code=True" in (exported / "README.md").read_text()  # the card tells users how


def test_export_without_remote_code_and_no_leaked_registration(model, tmp_path):
    plain = export_model(model, tmp_path / "plain", remote_code=False, **CARD_KWARGS)
    assert sorted(p.name for p in plain.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert "auto_map" not in json.loads((plain / "config.json").read_text())
    assert "trust_remote_code=True" not in (plain / "README.md").read_text()
    model.save_pretrained(tmp_path / "after")  # an export with remote code earlier must not leak into this
    assert not (tmp_path / "after" / "modeling_cps.py").exists()


def test_exported_folder_works_with_the_pipeline(model, exported):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(exported), subtask="semantic")
    segments = segmenter(image)

    assert segments and {segment["label"] for segment in segments} <= set(ID2LABEL.values())
    assert all(segment["mask"].size == image.size for segment in segments)
    # The masks are the model's own argmax, pixel for pixel, one label per pixel.
    inputs = CPSImageProcessor()(image, return_tensors="pt")
    expected = logits_of(model, inputs["pixel_values"]).argmax(1)[0].numpy()
    label2id = {name: index for index, name in ID2LABEL.items()}
    predicted = np.full(expected.shape, -1)
    for segment in segments:
        mask = np.array(segment["mask"]) > 0
        assert (predicted[mask] == -1).all(), "two segments claim the same pixel"
        predicted[mask] = label2id[segment["label"]]
    assert np.array_equal(predicted, expected)


QUIET_PIPELINE = """
import builtins, json, logging, sys

prompts = []


def no_input(prompt=""):
    # transformers' "Do you wish to run the custom code? [y/N]" would wait 15 s here in a terminal.
    prompts.append(prompt)
    raise EOFError("the pipeline asked for input")


builtins.input = no_input
records = []


class Keep(logging.Handler):
    def emit(self, record):
        records.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:300])


logging.getLogger("transformers").addHandler(Keep(logging.WARNING))
import cps_hf
from PIL import Image
from transformers import pipeline

segmenter = pipeline("image-segmentation", model=sys.argv[1], subtask="semantic")
segments = segmenter(Image.new("RGB", (45, 33), (9, 99, 199)))
print(json.dumps({"prompts": prompts, "records": records, "segments": len(segments),
                  "model": type(segmenter.model).__module__, "processor": type(segmenter.image_processor).__module__}))
"""


def test_pipeline_on_an_export_with_auto_map_neither_prompts_nor_warns(exported, tmp_path):
    """The README's snippet: with cps_hf imported, `pipeline("image-segmentation")` on a folder that
    also carries remote code never asks to run it (its processor probes used to ask, for a video
    processor, and wait 15 s in a terminal) and logs no "not supported" error for the CPS model.
    `input` is replaced to record any prompt, so nothing here depends on timing or a terminal."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", QUIET_PIPELINE, str(exported)], capture_output=True, text=True,
                               timeout=300, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["prompts"] == [], report["prompts"]
    assert report["records"] == [], report["records"]
    assert "not supported" not in completed.stderr and "custom code" not in completed.stderr
    assert report["model"] == "cps_hf.modeling_cps" and report["processor"] == "cps_hf.image_processing_cps"
    assert report["segments"] >= 1
    assert not (tmp_path / "modules").exists()  # no remote code was even copied for import


def test_model_card_parses_back_with_model_index_results(exported):
    card = ModelCard.load(exported / "README.md")
    assert card.data.pipeline_tag == "image-segmentation"
    assert card.data.library_name == "transformers"
    assert {"semantic-segmentation", "cps", "cross-pseudo-supervision", "semi-supervised"} <= set(card.data.tags)
    assert card.data.datasets == ["pascal_voc"]
    by_metric = {result.metric_type: result for result in card.data.eval_results}
    assert set(by_metric) == {"mean_iou", "overall_accuracy"}
    miou = by_metric["mean_iou"]
    assert miou.metric_value == pytest.approx(0.7123)
    assert (miou.task_type, miou.dataset_type, miou.dataset_split) == ("image-segmentation", "pascal_voc", "val")
    assert miou.dataset_name == "PASCAL VOC 2012 (augmented)"
    # The model-index block is what the Hub reads for leaderboards.
    assert "model-index" in card.content and "name: cps-tiny" in card.content

    body = card.text
    assert "| mIoU | 71.23 |" in body
    assert "| 0 | bg | 90.00 |" in body and "| 1 | a | n/a |" in body and "| 2 | b | 52.46 |" in body
    assert "1/8 (1323 labeled)" in body and "CPS + CutMix" in body and "`resnet18`" in body
    assert "| cps_weight | 1.5 |" in body
    assert 'pipeline("image-segmentation", model="org/cps-tiny"' in body and "import cps_hf" in body
    assert "@inproceedings" in body and "Cross Pseudo Supervision" in body


def test_model_card_accepts_unprefixed_keys_and_rejects_bad_results():
    config = tiny_config()
    card = build_model_card(
        config, results={"mean_iou": 0.5}, dataset_name="toy", dataset_type="folder", protocol=None, method="CPS"
    )
    assert card.data.eval_results[0].metric_value == 0.5
    assert "| mIoU | 50.00 |" in card.text
    common = dict(dataset_name="toy", dataset_type="folder", protocol=None, method="CPS")
    with pytest.raises(ValueError, match="fraction"):
        build_model_card(config, results={"eval_mean_iou": 71.2}, **common)
    with pytest.raises(ValueError, match="per_category_iou.*2 entries.*3 classes"):
        build_model_card(config, results={"mean_iou": 0.5, "per_category_iou": [0.1, 0.2]}, **common)
    with pytest.raises(ValueError, match="mean_iou"):
        build_model_card(config, results={"eval_loss": 0.2}, **common)


def test_model_card_without_results_has_no_model_index():
    card = build_model_card(tiny_config(), dataset_name="toy", dataset_type="folder", protocol=None, method="CPS")
    assert card.data.eval_results is None and "model-index" not in card.content


def test_export_refuses_a_folder_with_stray_files(model, tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileExistsError, match="pytorch_model.bin"):
        export_model(model, tmp_path, **CARD_KWARGS)
    with pytest.raises(TypeError, match="model card"):
        export_model(model, tmp_path / "new")


# ---------------------------------------------------------------------------------------------
# Push: capture the commit instead of sending it
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def captured_hub(monkeypatch):
    """Replace the three HfApi calls that reach the Hub; record what they were asked to do."""
    calls = {"create_repo": [], "create_branch": [], "create_commit": []}

    def record(name, result):
        def fake(self, *args, **kwargs):
            calls[name].append((args, kwargs))
            return result

        return fake

    monkeypatch.setattr(HfApi, "create_repo", record("create_repo", "https://hub.invalid/org/cps-tiny"))
    monkeypatch.setattr(HfApi, "create_branch", record("create_branch", None))
    monkeypatch.setattr(HfApi, "create_commit", record("create_commit", "commit-info"))
    return calls


def test_push_sends_exactly_the_exported_files(exported, captured_hub):
    result = push_model(exported, "org/cps-tiny", private=True, commit_message="Upload tiny CPS")

    assert result == "commit-info"
    [(args, kwargs)] = captured_hub["create_repo"]
    assert args == ("org/cps-tiny",) and kwargs["repo_type"] == "model" and kwargs["private"] is True
    assert kwargs["exist_ok"] is True
    assert captured_hub["create_branch"] == []
    [(args, commit)] = captured_hub["create_commit"]
    assert (commit["repo_id"], commit["repo_type"], commit["revision"]) == ("org/cps-tiny", "model", None)
    assert commit["commit_message"] == "Upload tiny CPS"
    operations = commit["operations"]
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert sorted(op.path_in_repo for op in operations) == EXPORTED_FILES
    for op in operations:
        data = (exported / op.path_in_repo).read_bytes()
        with op.as_file() as sent:
            assert sent.read() == data
        assert op.upload_info.sha256.hex() == hashlib.sha256(data).hexdigest()
        assert op.upload_info.size == len(data)


def test_push_to_a_branch_creates_it(exported, captured_hub):
    push_model(exported, "org/cps-tiny", revision="v1")
    [(_, branch)] = captured_hub["create_branch"]
    assert branch["branch"] == "v1" and branch["exist_ok"] is True
    assert captured_hub["create_commit"][0][1]["revision"] == "v1"


def test_push_refuses_incomplete_or_pickled_folders(exported, tmp_path, captured_hub):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(exported, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['model.safetensors'\]"):
        push_model(no_weights, "org/x")

    pickled = tmp_path / "pickled"
    shutil.copytree(exported, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not safe")
    with pytest.raises(ValueError, match="pickle.*pytorch_model.bin"):
        push_model(pickled, "org/x")

    stray = tmp_path / "stray"
    shutil.copytree(exported, stray)
    (stray / "optimizer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="optimizer_state.json"):
        push_model(stray, "org/x")

    assert captured_hub["create_repo"] == [] and captured_hub["create_commit"] == []


# ---------------------------------------------------------------------------------------------
# Pull over HTTP from an olah mirror
# ---------------------------------------------------------------------------------------------

GIT = ["git", "-c", "user.name=cps-test", "-c", "user.email=cps@test.invalid", "-c", "init.defaultBranch=main"]


def write_mirror_repo(exported: Path, repo_dir: Path) -> None:
    """The pushed layout as olah's mirror expects it: a git repo whose safetensors are LFS objects.

    The Hub stores weights in LFS; olah reads an LFS pointer from the tree and serves the object
    from `.git/lfs/objects/<oid[:2]>/<oid[2:4]>/<oid>`, so no git-lfs binary is needed.
    """
    repo_dir.mkdir(parents=True)
    subprocess.run(GIT + ["init", "-q", str(repo_dir)], check=True)
    for path in sorted(exported.iterdir()):
        if path.suffix == ".safetensors":
            data = path.read_bytes()
            oid = hashlib.sha256(data).hexdigest()
            lfs_object = repo_dir / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            lfs_object.parent.mkdir(parents=True)
            shutil.copyfile(path, lfs_object)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n"
            (repo_dir / path.name).write_text(pointer)
        else:
            shutil.copyfile(path, repo_dir / path.name)
    (repo_dir / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    subprocess.run(GIT + ["-C", str(repo_dir), "add", "-A"], check=True)
    subprocess.run(GIT + ["-C", str(repo_dir), "commit", "-q", "-m", "Upload CPS model"], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"olah exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    pytest.fail(f"olah did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def olah_mirror(exported, tmp_path):
    """olah, offline, serving `org/name` from a git mirror on disk; yields its base URL."""
    pytest.importorskip("olah", reason="olah (Hub mirror, from PyPI) is not installed")
    if shutil.which("git") is None:
        pytest.skip("the git executable is needed to build olah's mirror repository")
    mirrors = tmp_path / "mirrors"
    write_mirror_repo(exported, mirrors / "models" / "org" / "name")
    port = free_port()
    config = tmp_path / "olah.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [basic]
            host = "127.0.0.1"
            port = {port}
            repos-path = "{tmp_path / 'olah-cache'}"
            mirrors-path = ["{mirrors}"]

            [accessibility]
            offline = true
            """
        )
    )
    log = tmp_path / "olah.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(tmp_path / "logs")],
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{base_url}/org/name/resolve/main/config.json", server, log)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


PULL_SCRIPT = """
import sys, torch
import cps_hf  # noqa: F401  (registers the CPS Auto classes)
from huggingface_hub import hf_hub_download
from transformers import AutoModelForSemanticSegmentation

model = AutoModelForSemanticSegmentation.from_pretrained("org/name").eval()
with torch.no_grad():
    logits = model(pixel_values=torch.load(sys.argv[1])).logits
torch.save(logits, sys.argv[2])
# The processor config and model card come over HTTP too (see test docstring for why not AutoImageProcessor).
for name in ("preprocessor_config.json", "README.md"):
    print(name, hf_hub_download("org/name", name))
"""


def test_pull_from_an_olah_mirror_over_http(model, exported, pixel_values, olah_mirror, tmp_path):
    """`from_pretrained("org/name")` with HF_ENDPOINT at the mirror gives the exported model's logits.

    Runs in a subprocess because HF_ENDPOINT and HF_HUB_OFFLINE are read at import time. Only
    files the repo holds are requested by name: olah (0.5.4, offline) answers a request for a file
    the mirror lacks with 401 RepoNotFound instead of the Hub's 404 EntryNotFound, so
    `AutoImageProcessor.from_pretrained("org/name")`, which first probes `processor_config.json`,
    fails through olah (it works against the real Hub and on local folders).
    """
    torch.save(pixel_values, tmp_path / "inputs.pt")
    hf_home = tmp_path / "hf_home"
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        HF_ENDPOINT=olah_mirror,
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
    )
    pulled = subprocess.run(
        [sys.executable, "-c", PULL_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert pulled.returncode == 0, pulled.stderr[-4000:]

    assert_same_logits(torch.load(tmp_path / "logits.pt"), logits_of(model, pixel_values))
    # The files really came through the Hub client's cache, byte for byte.
    downloaded = dict(line.split(" ", 1) for line in pulled.stdout.strip().splitlines())
    for name, path in downloaded.items():
        assert Path(path).is_relative_to(hf_home) and Path(path).read_bytes() == (exported / name).read_bytes()
    snapshots = list((hf_home / "hub" / "models--org--name" / "snapshots").iterdir())
    assert len(snapshots) == 1
    assert (snapshots[0] / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------
# Backbone weights: never downloaded by from_pretrained, kept by load_backbone_weights
# ---------------------------------------------------------------------------------------------


class FetchAttempt(Exception):
    pass


@pytest.fixture
def no_backbone_downloads(monkeypatch):
    """Make every timm pretrained-weight path raise, whatever the local cache holds."""

    def refuse(*args, **kwargs):
        raise FetchAttempt("tried to fetch pretrained backbone weights")

    import timm.models._builder as timm_builder
    import timm.models._hub as timm_hub

    monkeypatch.setattr(timm_builder, "load_pretrained", refuse)
    monkeypatch.setattr(timm_builder, "load_custom_pretrained", refuse)
    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_from_pretrained_never_downloads_backbone_weights(tmp_path, pixel_values, no_backbone_downloads):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "conftest should run the tests with HF_HUB_OFFLINE=1"
    # An explicit pretrained tag, as a model trained from ImageNet weights would record.
    trained = tiny_model("resnet18.a1_in1k")
    trained.config.backbone_pretrained_source = "timm/resnet18.a1_in1k"
    card = build_model_card(trained.config, dataset_name="toy", dataset_type="folder", protocol=None, method="CPS")
    folder = export_model(trained, tmp_path / "export", card=card)

    # The guard is at the right level: asking for the pretrained backbone does hit it...
    with pytest.raises(FetchAttempt):
        load_backbone_weights(CPSForSemanticSegmentation(trained.config), True)
    # ...while loading the exported model does not, and gives back the trained weights.
    loaded = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    assert loaded.config.backbone == "resnet18.a1_in1k"
    assert_same_logits(logits_of(loaded, pixel_values), logits_of(trained, pixel_values))


def test_load_backbone_weights_from_a_local_file_survives_post_init(tmp_path):
    generator = torch.Generator().manual_seed(2)
    state_dict = timm.create_model("resnet18", pretrained=False).state_dict()
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)  # > 0: valid running_var too
    checkpoint = tmp_path / "resnet18_imagenet.pth"
    torch.save(state_dict, checkpoint)

    model = CPSForSemanticSegmentation(tiny_config())
    head_before = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    report = load_backbone_weights(model, checkpoint)
    assert report.loaded == report.total and not report.kept_random

    backbone = model.backbone.state_dict()
    assert any(name.endswith("running_mean") for name in backbone)
    assert set(backbone) <= set(state_dict)
    for name, tensor in backbone.items():
        assert torch.equal(tensor, state_dict[name]), f"backbone {name} differs from the checkpoint"
    assert all(torch.equal(model.decode_head.state_dict()[k], v) for k, v in head_before.items())
    assert model.config.backbone_pretrained_source == "resnet18_imagenet.pth"

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_backbone_weights(model, tmp_path / "missing.pth")
