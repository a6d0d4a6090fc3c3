"""The browser page (cps_hf/app.py, scripts/app.py): reading uploads, predictions, legend, the Space folder
and its push, and the page itself driven by headless Chromium as a person would use it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cps_hf.errors import UserInputError

from test_predict import CLASSES, save_tiny_model, write_image

pytest.importorskip("gradio", reason="the app is an optional extra: pip install -e '.[app]'")

from cps_hf.app import (Segmenter, add_space_link, export_space, legend_html, model_examples,  # noqa: E402
                        push_space)
from repo_modules import load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test_artifacts"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app_model") / "model"
    save_tiny_model(folder, eval_protocol={"mode": "whole", "crop_size": None, "stride": None})
    (folder / "examples").mkdir()
    write_image(folder / "examples" / "street.png", (96, 64), 3)
    return str(folder)


@pytest.fixture(scope="module")
def segmenter(model_dir):
    return Segmenter.load(model_dir)


def test_a_prediction_has_the_image_size_a_legend_and_the_protocol(segmenter, tmp_path):
    image = segmenter.read(write_image(tmp_path / "photo.png", (70, 51), 0))
    plain = segmenter.predict(image)
    assert plain.mask.shape == (51, 70) and plain.colour_mask.shape == (51, 70, 3) and plain.overlay.shape == (51, 70, 3)
    assert sum(share for _, _, share, _ in plain.shares) == pytest.approx(1.0)
    assert [name for _, name, _, _ in plain.shares] == [CLASSES[i] for i, *_ in plain.shares]
    ids, counts = np.unique(plain.mask, return_counts=True)
    assert {i for i, *_ in plain.shares} == set(ids.tolist())
    assert plain.shares[0][2] == pytest.approx(counts.max() / plain.mask.size)  # largest share first
    colour = tuple(plain.colour_mask[plain.mask == plain.shares[0][0]][0])
    assert colour == plain.shares[0][3]  # the legend's swatch is the mask's colour
    legend = legend_html(plain)
    assert legend.count('class="cps-legend-entry"') == len(plain.shares) and plain.shares[0][1] in legend
    assert "whole image" in plain.protocol and "flip False" in plain.protocol and "from" in plain.protocol
    both = segmenter.predict(image, flip=True, multi_scale=True)
    assert "flip True" in both.protocol and "[0.75, 1.0, 1.25]" in both.protocol


def test_uploads_that_are_not_images_or_too_large_are_refused_with_a_message(segmenter, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UserInputError, match=r"notes.png is not an image this page can read"):
        segmenter.read(text)
    small = Segmenter(**{**segmenter.__dict__, "max_megapixels": 0.001})
    big = write_image(tmp_path / "big.png", (60, 40), 1)
    with pytest.raises(UserInputError, match=r"big.png is 60 x 40 pixels \(0.0 megapixels\), above this page's limit"):
        small.read(big)
    cut = tmp_path / "cut.jpg"
    Image.new("RGB", (30, 20), (10, 20, 30)).save(cut)
    cut.write_bytes(cut.read_bytes()[:-40])
    with pytest.raises(UserInputError, match="cut.jpg"):
        segmenter.read(cut)


def test_examples_come_from_the_flag_and_the_model_folder(model_dir, tmp_path):
    extra = write_image(tmp_path / "mine.png", (20, 20), 2)
    assert model_examples(model_dir, [str(extra)]) == [str(extra), str(Path(model_dir) / "examples" / "street.png")]
    assert model_examples("user/some-model") == []


def test_export_space_writes_a_folder_that_runs_on_its_own(model_dir, tmp_path):
    space = export_space(model_dir, tmp_path / "space", title="Tiny CPS")
    files = {str(p.relative_to(space)) for p in space.rglob("*") if p.is_file()}
    assert {"app.py", "README.md", "requirements.txt", "space_settings.json", "cps_hf/__init__.py", "cps_hf/app.py",
            "model/config.json", "model/model.safetensors", "examples/street.png"} <= files
    assert not any(f.startswith("cps_hf/") and not f.endswith(".py") for f in files)  # the package's code only
    front = (space / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front and 'title: "Tiny CPS"' in front
    requirements = (space / "requirements.txt").read_text()
    assert "gradio>=" in requirements and "timm" in requirements and "transformers" in requirements
    # The Space's app builds its page from the copied package and model, not from this checkout.
    probe = ("import runpy, cps_hf; namespace = runpy.run_path('app.py'); "
             "print(cps_hf.__file__); print(type(namespace['demo']).__name__)")
    completed = subprocess.run([sys.executable, "-c", probe], cwd=space, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    package, page = completed.stdout.strip().splitlines()[-2:]
    assert Path(package).resolve().parent == (space / "cps_hf").resolve() and page == "Blocks"
    hub = export_space("user/cps-voc", tmp_path / "hub_space")
    assert "models:\n- user/cps-voc" in (hub / "README.md").read_text()
    assert json.loads((hub / "space_settings.json").read_text())["model"] == "user/cps-voc"
    assert not (hub / "model").exists()
    with pytest.raises(UserInputError, match="not empty"):
        export_space(model_dir, tmp_path / "space")


def test_push_space_uploads_the_folder_and_links_it_from_the_model_card(model_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create_repo", a, k)))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, **k: calls.append(("create_commit", k)) or "commit")
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "README.md").write_text("---\nlicense: mit\n---\n\n# CPS tiny\n\nTrained on the demo.\n")
    space = export_space(str(model), tmp_path / "space")
    pushed = push_space(space, "me/cps-tiny-demo", str(model))
    (_, repo_args, repo_kwargs), (_, commit) = calls
    assert repo_args == ("me/cps-tiny-demo",) and repo_kwargs["repo_type"] == "space" and repo_kwargs["space_sdk"] == "gradio"
    assert commit["repo_type"] == "space" and {op.path_in_repo for op in commit["operations"]} >= {"app.py", "README.md"}
    card = (model / "README.md").read_text()
    assert pushed["card"] == str(model / "README.md")
    assert "# CPS tiny\n\nTry it in the browser: [me/cps-tiny-demo](https://huggingface.co/spaces/me/cps-tiny-demo)" in card
    assert add_space_link(card, "me/other").count("Try it in the browser") == 1  # a newer Space replaces the link

    hub_card = tmp_path / "hub_card.md"
    hub_card.write_text("# cps-voc\n\nA Hub model.\n")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo, name, token=None: str(hub_card))
    calls.clear()
    push_space(space, "me/cps-voc-demo", "me/cps-voc")
    card_commit = calls[-1][1]
    assert card_commit["repo_id"] == "me/cps-voc" and card_commit["repo_type"] == "model"
    [operation] = card_commit["operations"]
    assert b"[me/cps-voc-demo](https://huggingface.co/spaces/me/cps-voc-demo)" in operation.path_or_fileobj.read()


@pytest.mark.parametrize("argv, message", [
    (["--model", "{model}", "--push_space", "me/x"], "--push_space needs --export_space DIR"),
    (["--model", "{model}", "--max_megapixels", "0"], "--max_megapixels must be > 0"),
    (["--model", "{tmp}/missing"], "--model {tmp}/missing"),
    (["--model", "{model}", "--examples", "{tmp}/none.jpg"], "--examples: no such file {tmp}/none.jpg"),
])
def test_argument_mistakes_are_one_line(model_dir, tmp_path, argv, message):
    names = {"model": model_dir, "tmp": tmp_path}
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "app.py"), *[a.format(**names) for a in argv]],
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [line for line in completed.stderr.strip().splitlines()
                                                     if line.startswith("error: ")]
    assert message.format(**names) in completed.stderr


# ---------------------------------------------------------------------- in the browser


def _screenshot_helpers():
    """benchmarks/app_screenshot.py: serving the page and driving Chromium (shared with the README's screenshot)."""
    return load("benchmarks/app_screenshot.py")


HELPERS = _screenshot_helpers()


@pytest.fixture(scope="module")
def served_page(model_dir, tmp_path_factory):
    """scripts/app.py on a free local port, as a user starts it."""
    with HELPERS.served(model_dir, log=tmp_path_factory.mktemp("app_log") / "app.log") as url:
        yield url


@pytest.fixture
def browser():
    chromium, driver = HELPERS.browser_paths()
    if not (chromium and driver):
        pytest.skip("no Chromium and chromedriver on this machine (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="pip install selenium")
    with HELPERS.chromium() as driver:
        yield driver


def test_the_page_segments_an_uploaded_image_in_the_browser(served_page, browser, segmenter, tmp_path):
    from selenium.webdriver.common.by import By

    photo = write_image(tmp_path / "photo.png", (160, 120), 5)
    HELPERS.wait_for_result(browser, HELPERS.upload(browser, served_page, photo))
    size = browser.execute_script("const i = document.querySelector('#cps-mask img'); return [i.naturalWidth, i.naturalHeight];")
    assert size == [160, 120]  # the mask at the image's own size
    entries = browser.find_elements(By.CSS_SELECTOR, "#cps-legend .cps-legend-entry")
    shown = [(int(e.get_attribute("data-class-id")), e.find_element(By.CSS_SELECTOR, ".cps-class-name").text)
             for e in entries]
    expected = segmenter.predict(segmenter.read(photo))
    assert shown == [(class_id, name) for class_id, name, _, _ in expected.shares]  # the model's classes and order
    status = browser.find_element(By.ID, "cps-status").text
    assert "Segmented 160 x 120 pixels" in status and "whole image" in status
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "app_page.png"))
    assert (ARTIFACTS / "app_page.png").stat().st_size > 10_000


def test_a_bad_upload_gets_a_message_on_the_page(served_page, browser, tmp_path):
    from selenium.webdriver.common.by import By

    fake = tmp_path / "holiday.png"
    fake.write_text("this is not a picture")
    wait = HELPERS.upload(browser, served_page, fake)
    wait.until(lambda d: "Cannot segment" in d.find_element(By.ID, "cps-status").text)
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "holiday.png is not an image this page can read" in text and "Traceback" not in text


def test_an_ensemble_export_is_served_like_one_network(tmp_path):
    """--export_ensemble's model_ensemble/ (the mean softmax of every network of a run) loads and predicts."""
    import torch

    from cps_hf.hub import export_ensemble
    from cps_hf.inference import predict_logits

    from tiny_models import tiny_config, with_running_statistics
    from cps_hf import CPSForSemanticSegmentation

    networks = []
    for seed in range(2):
        torch.manual_seed(seed)
        networks.append(with_running_statistics(CPSForSemanticSegmentation(tiny_config(CLASSES))).eval())
    folder = export_ensemble(networks, tmp_path / "model_ensemble", dataset_name="toy", dataset_type="folder",
                             protocol="1/8", method="CPS")
    ensemble = Segmenter.load(str(folder))
    assert type(ensemble.model).__name__ == "CPSEnsembleForSemanticSegmentation"
    image = ensemble.read(write_image(tmp_path / "photo.png", (48, 40), 7))
    prediction = ensemble.predict(image)
    assert prediction.mask.shape == (40, 48) and [name for _, name, _, _ in prediction.shares][0] in CLASSES
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(ensemble.mean)[:, None, None], torch.tensor(ensemble.std)[:, None, None]
    expected = predict_logits(ensemble.model, (pixels - mean) / std, num_labels=len(CLASSES), **ensemble.protocol)
    assert (expected.argmax(1)[0].numpy() == prediction.mask).mean() > 0.99
