"""Partitions: seeded counts/fractions, bundled protocols (published sizes), list formats, errors."""

from pathlib import Path

import datasets
import pytest

from cps_hf.data import DatasetError, available_protocols, read_id_list, split_labeled
from cps_hf.data.protocols import BUNDLED_SPLIT_LISTS, PROTOCOL_DIR

ROOT = Path(__file__).resolve().parents[1]


def _ids_dataset(ids):
    return datasets.Dataset.from_dict({"id": list(ids)})


@pytest.fixture(scope="module")
def voc_train_aug():
    return _ids_dataset(read_id_list(BUNDLED_SPLIT_LISTS[("voc", "train_aug")]))


@pytest.fixture(scope="module")
def city_train():
    return _ids_dataset(read_id_list(PROTOCOL_DIR / "cps/city/config_new/train.txt"))


def _check_partition(full, labeled, unlabeled):
    lab, unl = set(labeled["id"]), set(unlabeled["id"])
    assert not lab & unl
    return lab, unl


# Strings are what the command line gives: "--labeled 0.125" must work like the YAML float.
@pytest.mark.parametrize(
    "amount, expected", [(0.125, 1323), ("0.125", 1323), ("1/16", 662), ("1-4", 2646), (0.5, 5291), (".5", 5291), (92, 92)]
)
def test_counts_and_fractions_give_published_sizes(voc_train_aug, amount, expected):
    labeled, unlabeled = split_labeled(voc_train_aug, amount, seed=0)
    lab, unl = _check_partition(voc_train_aug, labeled, unlabeled)
    assert len(lab) == expected and lab | unl == set(voc_train_aug["id"])


def test_seeded_split_is_deterministic_and_seed_dependent(voc_train_aug):
    a, _ = split_labeled(voc_train_aug, 183, seed=1)
    b, _ = split_labeled(voc_train_aug, 183, seed=1)
    c, _ = split_labeled(voc_train_aug, 183, seed=2)
    assert a["id"] == b["id"] and set(a["id"]) != set(c["id"])


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("cps/voc/1-8", (1323, 9259)),
        ("cps/voc/1-16", (662, 9920)),
        ("unimatch/voc/92", (92, 10490)),
        ("unimatch/voc/u2pl-1-16", (662, 9920)),
        ("cps/voc-fewsup/92", (92, 10490)),  # Table 5: unlabeled = the rest of train_aug
        ("cps/voc-fewsup/1-2", (732, 9850)),
        ("cps/voc-fewsup-train-only/92", (92, 1372)),  # rest of the 1,464 train set (one shared id dropped)
        ("cps/voc-fewsup-train-only/1-2", (732, 732)),
    ],
)
def test_voc_protocols(voc_train_aug, name, sizes):
    labeled, unlabeled = split_labeled(voc_train_aug, name)
    _check_partition(voc_train_aug, labeled, unlabeled)
    assert (len(labeled), len(unlabeled)) == sizes


def test_same_ids_in_cps_and_unimatch_formats(voc_train_aug, city_train):
    assert set(split_labeled(voc_train_aug, "cps/voc/1-8")[0]["id"]) == set(split_labeled(voc_train_aug, "unimatch/voc/1-8")[0]["id"])
    cps, cps_rest = split_labeled(city_train, "cps/cityscapes/1-8")
    uni, _ = split_labeled(city_train, "unimatch/cityscapes/1-8")
    assert len(cps) == 372 and len(cps_rest) == 2603 and set(cps["id"]) == set(uni["id"])
    assert "jena_000078_000019" in set(city_train["id"])


def test_protocol_with_missing_ids_says_how_many_and_which():
    small = _ids_dataset(["2007_000032", "2007_000039"])
    with pytest.raises(DatasetError, match=r"1322 of 1323 ids are not in the dataset \(2 samples\), e\.g\. 2007_000250"):
        split_labeled(small, "cps/voc/1-8")


def test_list_files_ids_and_errors(tmp_path):
    full = _ids_dataset([f"img{i}" for i in range(10)])
    (tmp_path / "l.txt").write_text("JPEGImages/img3.jpg SegmentationClass/img3.png\r\nimg5\n\n")
    labeled, unlabeled = split_labeled(full, str(tmp_path / "l.txt"))
    assert labeled["id"] == ["img3", "img5"] and len(unlabeled) == 8
    assert split_labeled(full, ["img1"])[0]["id"] == ["img1"]
    for bad in (0, 11, 1.5, "1.5", "0.0", "cps/voc/1-3", str(tmp_path / "none.txt")):
        with pytest.raises(DatasetError):
            split_labeled(full, bad)


def test_every_bundled_protocol_file_is_readable():
    from cps_hf.data import get_protocol

    for name in available_protocols():
        protocol = get_protocol(name)
        for path in (protocol.labeled, protocol.unlabeled):
            if path is not None:
                assert read_id_list(path), name


@pytest.mark.parametrize("count", [92, 183, 366, 732])
def test_table_5_presets_train_on_the_rest_of_train_aug(voc_train_aug, count):
    """Paper 5.3: PseudoSeg's labels from the 1,464 train images, all the rest of train_aug (~10.5k)
    unlabeled, not the ~1.4k rest of train of the pseudoseg_unlabeled lists."""
    import yaml

    preset = yaml.safe_load((ROOT / "configs" / f"voc_r101_{count}_cps_cutmix.yaml").read_text())
    assert preset["train_split"] == "train_aug"
    labeled, unlabeled = split_labeled(voc_train_aug, preset["labeled"])
    assert len(labeled) == count and len(unlabeled) == 10582 - count
    train_only = set(read_id_list(PROTOCOL_DIR / "unimatch/pascal/1464/labeled.txt"))
    assert set(labeled["id"]) <= train_only
    assert len(set(unlabeled["id"]) - train_only) == 10582 - 1464  # every SBD-only image is unlabeled
