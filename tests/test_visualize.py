"""Palettes, colourised maps, overlays, the Figure-6 grid and curve PNGs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cps_hf.visualize import (
    PALETTES,
    VOC_PALETTE,
    colorize,
    comparison_grid,
    denormalize,
    get_palette,
    overlay,
    plot_curves,
    read_log,
)
from repo_modules import load


def colour(palette, index):
    return tuple(palette[3 * index : 3 * index + 3])


def test_standard_palette_colours():
    assert len(VOC_PALETTE) == 768
    assert colour(VOC_PALETTE, 0) == (0, 0, 0)
    assert colour(VOC_PALETTE, 1) == (128, 0, 0)  # aeroplane
    assert colour(VOC_PALETTE, 15) == (192, 128, 128)  # person
    assert colour(VOC_PALETTE, 255) == (224, 224, 192)  # VOC boundary / ignore
    cityscapes = PALETTES["cityscapes"]
    assert colour(cityscapes, 0) == (128, 64, 128)  # road
    assert colour(cityscapes, 13) == (0, 0, 142)  # car
    assert colour(cityscapes, 18) == (119, 11, 32)  # bicycle
    assert colour(cityscapes, 255) == (0, 0, 0)
    assert get_palette([1, 2, 3])[:6] == [1, 2, 3, 128, 0, 0]
    with pytest.raises(ValueError, match="unknown palette"):
        get_palette("ade")


def test_colorize_keeps_ids_as_palette_indices():
    labels = np.array([[0, 1], [15, 255]])
    image = colorize(torch.from_numpy(labels))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), labels)
    rgb = np.asarray(colorize(labels, "voc", rgb=True))
    assert tuple(rgb[1, 0]) == (192, 128, 128) and tuple(rgb[1, 1]) == (224, 224, 192)
    with pytest.raises(ValueError, match="0..255"):
        colorize(np.array([[0, 300]]))


def test_overlay_blends_except_on_ignored_pixels():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[1, 1], [0, 255]])
    np.testing.assert_array_equal(np.asarray(overlay(image, labels, alpha=0.0)), image)
    full = np.asarray(overlay(image, labels, alpha=1.0))
    assert tuple(full[0, 0]) == (128, 0, 0) and tuple(full[1, 0]) == (0, 0, 0)
    assert tuple(full[1, 1]) == (100, 100, 100)  # ignore shows the image
    half = np.asarray(overlay(image, labels, alpha=0.5))
    assert tuple(half[0, 0]) == (114, 50, 50)
    with pytest.raises(ValueError, match="differs from the image size"):
        overlay(image, np.zeros((3, 3), np.int64))


def test_denormalize_inverts_imagenet_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalised = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(denormalize(torch.from_numpy(normalised)), rgb)


def test_comparison_grid_layout_and_cells():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
    truth = np.full((8, 10), 15)
    rows = [(image, truth, np.zeros((8, 10), np.int64), truth), (image, truth, truth, truth)]
    grid = comparison_grid(rows, titles=None, cell_size=(10, 8), gap=4)
    assert grid.size == (4 * 10 + 5 * 4, 2 * 8 + 3 * 4)
    pixels = np.asarray(grid)
    np.testing.assert_array_equal(pixels[4:12, 4:14], image)  # first image cell
    assert tuple(pixels[5, 4 + 14 + 1]) == (192, 128, 128)  # ground truth cell, person colour
    assert tuple(pixels[5, 4 + 2 * 14 + 1]) == (0, 0, 0)  # supervised predicted background
    resized = comparison_grid(rows, titles=None, cell_size=(20, 16))
    assert resized.size == (4 * 20 + 5 * 4, 2 * 16 + 3 * 4)
    with pytest.raises(ValueError, match="same length"):
        comparison_grid([(image, truth), (image, truth, truth)])


def test_comparison_grid_is_readable():
    """Small images get cells of at least 256 px (labels upscaled without blending), titles in a
    readable font, and a legend of the classes drawn, named and in their colours."""
    image = np.random.default_rng(2).integers(0, 256, (8, 10, 3)).astype(np.uint8)
    truth = np.zeros((8, 10), np.int64)
    truth[:, 5:] = 15
    truth[0, 0] = 255
    prediction = np.full((8, 10), 15)
    names = {i: f"class {i}" for i in range(21)}
    bare = comparison_grid([(image, truth, prediction)], titles=None, gap=4)
    assert bare.size == (3 * 256 + 4 * 4, 205 + 2 * 4)  # 10x8 scaled by 25.6, aspect kept
    cells = np.asarray(bare)
    label_cell = cells[4 : 4 + 205, 4 + 260 : 4 + 260 + 256].reshape(-1, 3)
    assert {tuple(c) for c in label_cell} == {(0, 0, 0), (192, 128, 128), (224, 224, 192)}  # nearest: no blends
    titled = comparison_grid([(image, truth, prediction)], titles=["Image", "Ground truth", "CPS"], gap=4)
    assert titled.size[1] - bare.size[1] >= 20  # a title band at a font of >= 14 px
    with_legend = comparison_grid([(image, truth, prediction)], titles=None, class_names=names, gap=4)
    legend = np.asarray(with_legend)[bare.size[1] :].reshape(-1, 3)
    assert with_legend.size[0] == bare.size[0] and len(legend) > 0
    colours = {tuple(c) for c in legend}
    assert {(192, 128, 128), (224, 224, 192)} <= colours  # person and ignore: drawn, so explained
    assert (128, 0, 0) not in colours  # aeroplane is not drawn anywhere
    every = np.asarray(comparison_grid([(image, truth, prediction)], titles=None, class_names=names, legend="all"))
    assert (128, 0, 0) in {tuple(c) for c in every[bare.size[1] :].reshape(-1, 3)}
    assert every.shape[0] > with_legend.size[1]  # 21 classes take more legend rows than 3


def test_plot_curves_and_read_log(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": s, "loss": 2.0 / (s + 1), "agreement": 0.5 + s / 40} for s in range(20)]
    lines.append({"step": 20, "eval_mean_iou": 0.4})
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    records = read_log(log)
    assert len(records) == 21
    out = plot_curves(records, ["loss", "agreement", "eval_mean_iou"], tmp_path / "figs" / "curves.png")
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (1350, 320)
    with pytest.raises(ValueError, match=r"no numeric values of \['loss_cps'\].*agreement"):
        plot_curves(records, ["loss", "loss_cps"], tmp_path / "x.png")
    log.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON object"):
        read_log(log)


# ---------------------------------------------------------------------- scripts/make_figures.py
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_make_figures():
    return load("scripts/make_figures.py")


def trainer_log(path, prefix=""):
    """A log.jsonl with the keys scripts/train_cps.py writes for CPS (cps_hf.methods), NaN included."""
    lines = []
    for s in range(1, 7):
        lines.append({"step": s, "epoch": s / 6, "lr": 0.01 * (1 - s / 7) ** 0.9, f"{prefix}loss": 3 - s / 5,
                      f"{prefix}loss_sup": 1 - s / 20, f"{prefix}loss_cps": 2 - s / 10, f"{prefix}loss_cps_u": 1.0,
                      f"{prefix}agreement_u": 0.5 + s / 20, f"{prefix}agreement_u_fg": 0.3 + s / 20,
                      f"{prefix}agreement_l": 0.6 + s / 20, f"{prefix}agreement_l_fg": float("nan") if s == 1 else 0.4})
    lines.append({"step": 6, "eval_mean_iou": 0.4, "eval_iou/background": 0.8})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))  # NaN as the trainer writes it
    return path


@pytest.mark.parametrize("prefix", ["", "train/"])
def test_make_figures_plots_every_agreement_key_the_trainer_logs(tmp_path, monkeypatch, prefix):
    make_figures = load_make_figures()
    import cps_hf.visualize as visualize

    drawn = {}
    real = getattr(visualize, "plot_lines", None)
    monkeypatch.setattr(visualize, "plot_lines", lambda records, keys, path, **kw: drawn.update(keys=keys, **kw)
                        or real(records, keys, path, **kw), raising=False)
    run = tmp_path / "run"
    run.mkdir()
    trainer_log(run / "log.jsonl", prefix)
    written = make_figures.main(["--log", str(run), "--output_dir", str(tmp_path / "figs")])
    assert [p.name for p in written] == ["training_curves.png", "agreement.png", "eval_mean_iou.png"]
    keys = [f"{prefix}agreement_{k}" for k in ("u", "u_fg", "l", "l_fg")]
    assert drawn["keys"] == keys
    assert drawn["labels"][f"{prefix}agreement_u"] == f"{prefix}agreement_u: unlabeled images"
    assert drawn["labels"][f"{prefix}agreement_l_fg"] == f"{prefix}agreement_l_fg: labeled images, foreground"
    with Image.open(tmp_path / "figs" / "agreement.png") as picture:
        assert picture.format == "PNG"


def test_make_figures_draws_the_erasure_alarms_share_ratios(tmp_path, monkeypatch):
    make_figures = load_make_figures()
    import cps_hf.visualize as visualize

    drawn = {}
    real = visualize.plot_lines
    monkeypatch.setattr(visualize, "plot_lines", lambda records, keys, path, **kw: drawn.setdefault(path.name, keys)
                        and real(records, keys, path, **kw))
    lines = [{"step": s, "loss": 1.0 / s, "share_ratio/cat": 1.0, "share_ratio/dog": 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    written = make_figures.main(["--log", str(tmp_path), "--output_dir", str(tmp_path / "figs")])
    assert "class_shares.png" in [p.name for p in written]
    assert drawn["class_shares.png"] == ["share_ratio/cat", "share_ratio/dog"]


def test_make_figures_names_a_missing_model_folder(tmp_path):
    from cps_hf.errors import UserInputError

    make_figures = load_make_figures()
    missing = tmp_path / "some" / "folder" / "that" / "does" / "not" / "exist"
    common = ["--dataset", "voc", "--data_root", str(tmp_path), "--output_dir", str(tmp_path / "figs")]
    with pytest.raises(UserInputError, match=f"^--models {missing}: folder does not exist$"):
        make_figures.main(["--models", str(missing), *common])
    with pytest.raises(UserInputError, match="folder does not exist"):
        make_figures.main(["--models", "some/folder/that/does/not/exist", *common])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserInputError, match="config.json: is a file, not a model folder"):
        make_figures.main(["--models", str(tmp_path / "config.json"), *common])
    with pytest.raises(UserInputError) as hub:  # Hub-shaped: goes to the Hub (offline here), still one line
        make_figures.main(["--models", "someone/no-such-cps-model", *common])
    assert str(hub.value).startswith("--models someone/no-such-cps-model: cannot load") and "\n" not in str(hub.value)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(SCRIPTS / "make_figures.py"), "--models", str(missing), *common],
                               env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip() == f"error: --models {missing}: folder does not exist"


def test_make_figures_grid_has_large_cells_and_a_legend_from_id2label(tmp_path, monkeypatch):
    from cps_hf import CPSConfig, CPSForSemanticSegmentation, CPSImageProcessor
    from cps_hf.data import DEMO_CLASSES, make_demo_voc

    make_demo_voc(tmp_path / "voc", num_train=1, num_val=2, size=(32, 40), seed=0)
    torch.manual_seed(0)
    names = [f"my {name}" for name in DEMO_CLASSES]  # the model's names, not the dataset's
    config = CPSConfig(backbone="resnet18", num_labels=len(names), id2label=dict(enumerate(names)),
                       label2id={n: i for i, n in enumerate(names)}, aspp_channels=16, decoder_channels=16,
                       low_level_channels=8)
    CPSForSemanticSegmentation(config).eval().save_pretrained(tmp_path / "model")
    CPSImageProcessor().save_pretrained(tmp_path / "model")
    make_figures = load_make_figures()
    import cps_hf.visualize as visualize

    seen, real = {}, visualize.comparison_grid
    monkeypatch.setattr(visualize, "comparison_grid", lambda rows, **kw: seen.update(kw) or real(rows, **kw))
    written = make_figures.main(["--models", str(tmp_path / "model"), "--dataset", "voc", "--data_root",
                                 str(tmp_path / "voc"), "--num_images", "2", "--output_dir", str(tmp_path / "figs")])
    assert dict(seen["class_names"]) == dict(enumerate(names))
    with Image.open(written[0]) as grid:
        width, height = grid.size
        pixels = np.asarray(grid.convert("RGB"))
    assert width >= 3 * 256 and height >= 2 * 205  # 40x32 images in cells of 256x205, not thumbnails
    cells_end = max(np.nonzero(pixels[:, 4:-4].std(axis=(1, 2)) > 0)[0])  # last non-white row is in the legend
    assert cells_end > height - 60


def _saved_figures(monkeypatch):
    """Every matplotlib Figure saved from now on (still open for inspection)."""
    from matplotlib.figure import Figure

    saved, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self) or real(self, *a, **k))
    return saved


def test_figures_label_their_axes_and_keep_the_legend_off_the_curves(tmp_path, monkeypatch):
    saved = _saved_figures(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    trainer_log(run / "log.jsonl")
    load_make_figures().main(["--log", str(run), "--output_dir", str(tmp_path / "figs")])
    curves, agreement, evaluation = saved
    assert [axes.get_ylabel() for axes in curves.axes] == ["loss", "loss", "loss", "learning rate"]
    assert evaluation.axes[0].get_ylabel() == "mean IoU (0-1)"
    axes = agreement.axes[0]
    renderer = agreement.canvas.get_renderer()
    legend, plot = axes.get_legend().get_window_extent(renderer), axes.get_window_extent(renderer)
    assert legend.y1 <= plot.y0  # below the panel, never over a curve
    assert axes.get_ylabel()


def test_a_log_of_several_runs_is_drawn_as_its_last_run_with_a_warning(tmp_path, monkeypatch, capsys):
    from cps_hf.visualize import split_runs

    saved = _saved_figures(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    first = trainer_log(tmp_path / "first.jsonl").read_text()
    second = "".join(json.dumps({"step": s, "loss": 10.0 + s, "lr": 0.1}) + "\n" for s in (1, 2, 3))
    (run / "log.jsonl").write_text(first + second)
    records = read_log(run / "log.jsonl")
    assert [len(part) for part in split_runs(records)] == [7, 3]
    assert len(split_runs(records[:7])) == 1  # one run's own log (eval records repeat a step) is one part
    load_make_figures().main(["--log", str(run), "--output_dir", str(tmp_path / "figs")])
    assert "holds 2 runs" in capsys.readouterr().out
    loss_axes = saved[0].axes[0]
    assert list(loss_axes.lines[0].get_xdata()) == [1, 2, 3]  # the last run only: no zig-zag
    assert list(loss_axes.lines[0].get_ydata()) == [11.0, 12.0, 13.0]


def test_the_demo_draws_each_class_in_its_own_hue():
    """The demo's "blue" used VOC's colour 3, olive (128, 128, 0)."""
    from cps_hf.data import DEMO_CLASSES
    from cps_hf.data.demo import demo_palette

    palette = demo_palette()
    colours = [palette[3 * i: 3 * i + 3] for i in range(len(DEMO_CLASSES))]
    assert colours[0] == [0, 0, 0]
    for index, channel in ((1, 0), (2, 1), (3, 2)):  # red, green, blue: that channel dominates
        assert colours[index][channel] > 2 * max(v for k, v in enumerate(colours[index]) if k != channel)
    assert palette[3 * 255: 3 * 256] == [224, 224, 192] and len(palette) == 768  # VOC's ignore colour
