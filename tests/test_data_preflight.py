"""The up-front data check: all problems in one error, opt-in skipping with a list, a cache."""

import io
import json
import logging
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from cps_hf.data import DatasetBundle, DatasetError, build_datasets, make_demo_voc, preflight_check
from cps_hf.data import preflight
from cps_hf.data.validation import truncation_problem


@pytest.fixture
def bundle(tmp_path):
    make_demo_voc(tmp_path / "data", num_train=12, num_val=3, size=32, seed=0)
    return build_datasets("voc", tmp_path / "data", labeled=4, seed=0)


def _files(dataset, column):
    """id -> file path of `column`."""
    raw = dataset.cast_column(column, datasets.Image(decode=False))
    return {row["id"]: row[column]["path"] for row in raw}


def _break_files(bundle):
    """Break four unlabeled samples and one labeled one; return {id: broken file}."""
    images, labels = _files(bundle.unlabeled, "image"), _files(bundle.unlabeled, "label")
    missing, truncated, mismatched, empty = sorted(images)[:4]
    os.remove(images[missing])
    data = open(images[truncated], "rb").read()
    open(images[truncated], "wb").write(data[: len(data) // 2])
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(labels[mismatched])  # label of an unlabeled image
    open(images[empty], "wb").close()
    colour_id, colour_label = sorted(_files(bundle.labeled, "label").items())[0]
    Image.new("RGB", Image.open(colour_label).size).save(colour_label)
    return {missing: images[missing], truncated: images[truncated], mismatched: labels[mismatched],
            empty: images[empty], colour_id: colour_label}


def test_all_problems_are_reported_in_one_error(bundle, tmp_path):
    broken = _break_files(bundle)
    with pytest.raises(DatasetError) as caught:
        preflight_check(bundle, cache_file=tmp_path / "out" / "data_check.json")
    message = str(caught.value)
    assert "5 problem(s) in 5 sample(s)" in message and "labeled 1" in message and "unlabeled 4" in message
    for problem in ("file not found", "truncated JPEG", "image is 32x32 but its label is 16x16", "empty file (0 bytes)",
                    "got mode 'RGB'"):
        assert problem in message
    for path in broken.values():
        assert f"{path}: " in message
    assert "--skip_bad_samples" in message and "check_dataset.py" in message


def test_skip_mode_drops_exactly_the_bad_samples_and_lists_them(bundle, tmp_path):
    broken = _break_files(bundle)
    skipped_file = tmp_path / "out" / "skipped_samples.jsonl"
    checked = preflight_check(bundle, cache_file=tmp_path / "out" / "data_check.json", skip_bad_samples=True,
                              skipped_file=skipped_file)
    lines = [json.loads(line) for line in skipped_file.read_text().splitlines()]
    assert {line["file"] for line in lines} == set(broken.values())
    assert {line["id"] for line in lines} == set(broken)
    assert all(line["problem"] and line["split"] in ("labeled", "unlabeled") for line in lines)
    for split in ("labeled", "unlabeled"):
        before, after = set(getattr(bundle, split)["id"]), list(getattr(checked, split)["id"])
        assert set(after) == before - set(broken) and len(after) == len(set(after))
    assert checked.val is bundle.val and checked.class_names == bundle.class_names


def test_bad_val_samples_are_never_skipped(bundle, tmp_path):
    val_image = sorted(_files(bundle.val, "image").values())[0]
    os.remove(val_image)
    with pytest.raises(DatasetError, match="never skipped") as caught:
        preflight_check(bundle, skip_bad_samples=True, skipped_file=tmp_path / "skipped.jsonl")
    assert f"{val_image}: file not found" in str(caught.value)


def test_skipping_every_labeled_sample_is_an_error(bundle, tmp_path):
    for path in _files(bundle.labeled, "image").values():
        os.remove(path)
    with pytest.raises(DatasetError, match="all 4 labeled samples have bad files"):
        preflight_check(bundle, skip_bad_samples=True, skipped_file=tmp_path / "skipped.jsonl")
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 4


def test_cache_skips_the_check_until_a_file_changes(bundle, tmp_path, monkeypatch):
    calls = []
    real = preflight.header_problems
    monkeypatch.setattr(preflight, "header_problems", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "out" / "data_check.json"
    records = len(bundle.labeled) + len(bundle.unlabeled) + len(bundle.val)
    assert preflight_check(bundle, cache_file=cache) is bundle
    assert len(calls) == records
    preflight_check(bundle, cache_file=cache)
    assert len(calls) == records  # unchanged files: nothing checked again

    broken = _break_files(bundle)  # files change: checked again
    kwargs = dict(cache_file=cache, skip_bad_samples=True, skipped_file=tmp_path / "out" / "skipped.jsonl")
    first = preflight_check(bundle, **kwargs)
    assert len(calls) == 2 * records
    (tmp_path / "out" / "skipped.jsonl").unlink()
    again = preflight_check(bundle, **kwargs)  # a resumed run: same skipping, from the cache
    assert len(calls) == 2 * records
    assert list(again.unlabeled["id"]) == list(first.unlabeled["id"]) and list(again.labeled["id"]) == list(first.labeled["id"])
    assert len((tmp_path / "out" / "skipped.jsonl").read_text().splitlines()) == len(broken)
    with pytest.raises(DatasetError, match="5 problem"):
        preflight_check(bundle, cache_file=cache)  # the cached problems still stop a run without skipping
    assert len(calls) == 2 * records


def _png_bytes(shape, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8), mode=mode).save(buffer, "PNG")
    return buffer.getvalue()


def test_in_memory_records_and_streamed_pools(caplog):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image(), "id": datasets.Value("string")})
    good = {"image": {"bytes": _png_bytes((8, 8, 3)), "path": None}, "label": {"bytes": _png_bytes((8, 8)), "path": None}}
    rows = [dict(good, id="ok"), dict(good, id="cut", image={"bytes": _png_bytes((8, 8, 3))[:-20], "path": None}),
            dict(good, id="small", label={"bytes": _png_bytes((4, 8)), "path": None})]
    hub = datasets.Dataset.from_list(rows, features=features)
    memory = DatasetBundle(hub.select([0]), hub.select([1, 2]), hub.select([0]), ["a", "b"])
    with pytest.raises(DatasetError) as caught:
        preflight_check(memory)
    message = str(caught.value)
    assert "image of sample 'cut': truncated PNG" in message
    assert "label of sample 'small': image is 8x8 but its label is 8x4 (WxH)" in message

    streamed = DatasetBundle(hub.select([0]), hub.select([1, 2]).to_iterable_dataset(), hub.select([0]), ["a", "b"])
    with caplog.at_level(logging.INFO, logger="cps_hf.data.preflight"):
        assert preflight_check(streamed) is streamed
    assert "unlabeled pool is streamed" in caplog.text


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_truncation_is_seen_from_the_ends_of_a_file(fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, fmt)
    data = buffer.getvalue()
    assert truncation_problem(data[:16], data[-64:], len(data)) is None
    cut = data[: len(data) * 2 // 3]
    assert truncation_problem(cut[:16], cut[-64:], len(cut)).startswith(f"truncated {'WebP' if fmt == 'WEBP' else fmt}")


def _write_values(path, values):
    """Rewrite a palette/grey label PNG keeping its size, with `values` painted in its first row."""
    label = np.array(Image.open(path))
    label[0, : len(values)] = values
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def test_label_values_outside_the_classes_are_found_up_front_in_every_split(bundle, tmp_path):
    """The demo has 4 classes: 7 and 200 are neither a class nor the ignore index 255. Such values used to
    pass this check ("0 problems") and stop the run when the sample was drawn or at the first evaluation."""
    labeled = sorted(_files(bundle.labeled, "label").items())[0]
    unlabeled = sorted(_files(bundle.unlabeled, "label").items())[0]
    val = sorted(_files(bundle.val, "label").items())[0]
    for (_, path), values in ((labeled, [7]), (unlabeled, [200, 255]), (val, [4, 5])):
        _write_values(path, values)
    with pytest.raises(DatasetError) as caught:
        preflight_check(bundle, cache_file=tmp_path / "out" / "data_check.json")
    message = str(caught.value)
    assert "3 problem(s) in 3 sample(s)" in message
    assert f"{labeled[1]}: label values [7] are outside the 4 classes (0..3) and not the ignore index 255" in message
    assert f"{unlabeled[1]}: label values [200] are outside" in message  # 255 is the ignore index: fine
    assert f"{val[1]}: label values [4, 5] are outside" in message
    # --skip_bad_samples drops the bad labeled and unlabeled samples, but a bad val label still stops the run
    with pytest.raises(DatasetError, match=r"label values \[4, 5\][\s\S]*never skipped"):
        preflight_check(bundle, skip_bad_samples=True, skipped_file=tmp_path / "skipped.jsonl")
    _write_values(val[1], [0, 0])
    checked = preflight_check(bundle, skip_bad_samples=True, skipped_file=tmp_path / "skipped.jsonl")
    assert labeled[0] not in checked.labeled["id"] and unlabeled[0] not in checked.unlabeled["id"]
    assert len(checked.labeled) == len(bundle.labeled) - 1


def test_a_label_value_outside_the_classes_stops_training_before_the_first_step(tmp_path):
    """Through the trainer: the run stops in the data check, naming the file, before any step."""
    from test_train import tiny_args, train_cps  # noqa: F401

    make_demo_voc(tmp_path / "data", num_train=12, num_val=3, size=32, seed=0)
    val_label = sorted(_files(build_datasets("voc", tmp_path / "data", labeled=4).val, "label").values())[0]
    _write_values(val_label, [9])
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"label values \[9\] are outside the 4 classes"):
        train_cps.main(tiny_args(tmp_path / "data", out, "--labeled", "4", "--max_train_steps", "1"))
    assert not (out / "log.jsonl").exists() and not (out / "training_config.yaml").exists()
