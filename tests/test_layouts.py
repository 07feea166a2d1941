"""Every real dataset, laid out exactly as its official release unpacks (tiny files in the real
formats, written here by hand, not by cropbench's synthetic writers), loads through the registry;
`cropbench list datasets` prints each layout as a tree.

Official layouts: ImageNet ILSVRC2012 train tar of per-class tars, val tar flat (sorted into wnid
folders first); CIFAR python tarballs (cifar-10-batches-py/, cifar-100-python/); STL-10
stl10_binary/; COCO 2017 zips (train2017/, val2017/, annotations/instances_*2017.json); VOC tars
(VOCdevkit/VOC2007, VOC2012); Cityscapes leftImg8bit_trainvaltest / gtFine_trainvaltest zips;
UCF101.rar (UCF-101/<Class>/) + UCF101TrainTestSplits (ucfTrainTestlist/); HMDB51 hmdb51_org.rar
(per-class rars unpacking to <class>/) + test_train_splits.rar (testTrainMulti_7030_splits/).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision
from click.testing import CliRunner
from PIL import Image

from cropbench.cli import cli
from cropbench.data import build_dataset, validate_dataset
from cropbench.data.video_synth import write_video
from cropbench.errors import DatasetError


def _jpeg(path: Path, w: int = 20, h: int = 16, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path, "JPEG")


def test_imagenet_official_layout_loads_with_train_class_indices(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    for k, w in enumerate(wnids):
        _jpeg(root / "train" / w / f"{w}_{k}.JPEG")
    _jpeg(root / "val" / wnids[2] / "ILSVRC2012_val_00000001.JPEG")  # val lacks the first two classes
    validate_dataset("imagenet", tmp_path, ("train", "val"), "paper")
    val = build_dataset("imagenet", "val", tmp_path, image_size=8)
    assert val.classes == wnids and val.targets == [2]  # train's index, not val's own (which says 0)


def test_imagenet_flat_val_as_the_tar_unpacks_is_an_error_saying_to_sort_it(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    _jpeg(root / "train" / "n01440764" / "n01440764_1.JPEG")
    _jpeg(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetError, match=r"imagenet/val has no class folders .*sorted into class folders"):
        validate_dataset("imagenet", tmp_path, "val", "paper")


def _patch_md5(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """torchvision checks the official files' md5 sums, which tiny files cannot match: only that
    check is bypassed; file names, folders and the pickle / binary formats are the official ones."""
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)


def _cifar_batch(path: Path, n: int, label_key: str, labels: list[int]) -> None:
    data = np.arange(n * 3072, dtype=np.uint8).reshape(n, 3072) % 251
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"data": data, label_key: labels}))


def write_cifar10(root: Path) -> None:
    """cifar-10-python.tar.gz as it unpacks: 5 training batches of 2 images, a test batch of 3."""
    base = root / "cifar10" / "cifar-10-batches-py"
    for i in range(1, 6):
        _cifar_batch(base / f"data_batch_{i}", 2, "labels", [i % 10, (i + 1) % 10])
    _cifar_batch(base / "test_batch", 3, "labels", [7, 8, 9])
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))


def test_cifar10_and_cifar100_official_layouts_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # md5 only
    write_cifar10(tmp_path)
    train = build_dataset("cifar10", "train", tmp_path, image_size=32)
    test = build_dataset("cifar10", "val", tmp_path, image_size=32)
    assert (len(train), len(test), test.targets, train.num_classes) == (10, 3, [7, 8, 9], 10)

    base = tmp_path / "cifar100" / "cifar-100-python"
    _cifar_batch(base / "train", 4, "fine_labels", [0, 1, 2, 99])
    _cifar_batch(base / "test", 2, "fine_labels", [5, 6])
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{k}" for k in range(100)]}))
    assert build_dataset("cifar100", "train", tmp_path, image_size=32).targets == [0, 1, 2, 99]


def test_stl10_official_binary_layout_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_md5(monkeypatch, torchvision.datasets.STL10)
    base = tmp_path / "stl10" / "stl10_binary"
    base.mkdir(parents=True)
    for split, labels in (("train", [1, 10]), ("test", [3])):
        np.zeros((len(labels), 3, 96, 96), np.uint8).tofile(base / f"{split}_X.bin")
        np.array(labels, np.uint8).tofile(base / f"{split}_y.bin")  # 1-based on disk
    (base / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    ds = build_dataset("stl10", "train", tmp_path, image_size=96)
    assert ds.targets == [0, 9] and len(build_dataset("stl10", "test", tmp_path, image_size=96)) == 1


def _coco_json(path: Path, images: list[dict], anns: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 3, "name": "car", "supercategory": "v"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _ann(i: int, image_id: int, bbox: list[float], cat: int = 3) -> dict:
    x, y, w, h = bbox
    poly = [x, y, x + w, y, x + w, y + h, x, y + h]
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": w * h, "iscrowd": 0,
            "segmentation": [poly]}  # fmt: skip


def write_coco(root: Path, anns: list[dict] | None = None) -> Path:
    """Official COCO 2017 layout with two images per split (12-digit file names)."""
    folder = root / "coco"
    for split in ("train", "val"):
        images = []
        for image_id in (139, 285):
            name = f"{image_id:012d}.jpg"
            _jpeg(folder / f"{split}2017" / name, 32, 24)
            images.append({"id": image_id, "file_name": name, "width": 32, "height": 24})
        default = [_ann(1, 139, [2.0, 3.0, 10.0, 8.0]), _ann(2, 285, [0.0, 0.0, 5.0, 5.0], cat=1)]
        _coco_json(folder / "annotations" / f"instances_{split}2017.json", images, anns or default)
    return folder


def test_coco_official_layout_loads(tmp_path: Path) -> None:
    write_coco(tmp_path)
    validate_dataset("coco", tmp_path, ("train", "val"), "small")
    ds = build_dataset("coco", "train", tmp_path)
    image, target = ds[0]
    assert image.shape == (3, 24, 32) and ds.classes == ["person", "car"]
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0]] and target["labels"].tolist() == [2]


def _voc_xml(path: Path, objects: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    objs = "".join(
        f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><folder>VOC2007</folder><filename>{path.stem}.jpg</filename>"
        f"<size><width>32</width><height>24</height><depth>3</depth></size>{objs}</annotation>"
    )


def test_voc_official_vocdevkit_layout_loads(tmp_path: Path) -> None:
    devkit = tmp_path / "voc" / "VOCdevkit"
    for year, sets in (("2007", {"trainval": ["000005"], "test": ["000001"]}), ("2012", {"trainval": ["2008_000002"]})):
        base = devkit / f"VOC{year}"
        for image_set, ids in sets.items():
            (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
            (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(ids) + "\n")
            for image_id in ids:
                _jpeg(base / "JPEGImages" / f"{image_id}.jpg", 32, 24)
                _voc_xml(base / "Annotations" / f"{image_id}.xml", [("dog", (3, 4, 20, 15))])
    validate_dataset("voc", tmp_path, ("trainval", "test"), "paper")
    ds = build_dataset("voc", "trainval", tmp_path)
    _, target = ds[0]
    assert len(ds) == 2 and target["boxes"].tolist() == [[2.0, 3.0, 20.0, 15.0]]  # 1-based inclusive -> xyxy


def test_cityscapes_official_layout_loads(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    stem = "aachen_000000_000019"
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        s = stem.replace("aachen", city)
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(
            root / "leftImg8bit" / split / city / f"{s}_leftImg8bit.png"
        )
        label = np.full((8, 16), 7, np.uint8)  # labelId 7 = road = trainId 0
        label[:, :4] = 26  # car = trainId 13
        Image.fromarray(label).save(root / "gtFine" / split / city / f"{s}_gtFine_labelIds.png")
    validate_dataset("cityscapes", tmp_path, ("train", "val"), "paper")
    _, target = build_dataset("cityscapes", "val", tmp_path)[0]
    assert target[0, :4].unique().tolist() == [13] and target[0, 4:].unique().tolist() == [0]


def _avi(path: Path) -> None:
    write_video(path, np.zeros((4, 16, 16, 3), np.uint8), fps=8)


def test_ucf101_official_layout_loads(tmp_path: Path) -> None:
    root = tmp_path / "ucf101"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    train, test = [], []
    for c, cls in enumerate(("ApplyEyeMakeup", "Archery")):
        for g in (8, 1):
            name = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
            _avi(root / "UCF-101" / name)
            (train if g == 8 else test).append(f"{name} {c + 1}" if g == 8 else name)
    for fold in (1, 2, 3):
        (lists / f"trainlist0{fold}.txt").write_text("\r\n".join(train) + "\r\n")  # the official CRLF files
        (lists / f"testlist0{fold}.txt").write_text("\r\n".join(test) + "\r\n")
    validate_dataset("ucf101", tmp_path, "all", "small")
    ds = build_dataset("ucf101", "test2", tmp_path, image_size=16)
    assert ds.targets == [0, 1] and ds.classes == ("ApplyEyeMakeup", "Archery")


def write_hmdb51(root: Path, videos_level: bool = False, folds: tuple[int, ...] = (1, 2, 3)) -> Path:
    """hmdb51/<class>/*.avi (as the per-class rars unpack) + testTrainMulti_7030_splits/."""
    folder = root / "hmdb51"
    splits = folder / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for cls in ("brush_hair", "cartwheel"):
        names = [f"{cls}_clip_{i}_u_nm_np1_fr_goo_{i}.avi" for i in range(3)]
        for n in names:
            _avi(folder / ("videos" if videos_level else "") / cls / n)
        for fold in folds:  # one train, one test, one unused per class
            (splits / f"{cls}_test_split{fold}.txt").write_text(
                "".join(f"{n} {m} \n" for n, m in zip(names, (1, 2, 0), strict=True))
            )
    return folder


@pytest.mark.parametrize("videos_level", [False, True], ids=["official", "with-videos-folder"])
def test_hmdb51_official_layout_and_the_videos_folder_layout_load(tmp_path: Path, videos_level: bool) -> None:
    write_hmdb51(tmp_path, videos_level)
    validate_dataset("hmdb51", tmp_path, "all", "small")
    ds = build_dataset("hmdb51", "test3", tmp_path, image_size=16)
    assert ds.targets == [0, 1] and ds.classes == ("brush_hair", "cartwheel")
    assert ds[0].video.shape[0] == 3


def test_list_datasets_prints_every_layout_as_a_tree() -> None:
    res = CliRunner().invoke(cli, ["list", "datasets"])
    assert res.exit_code == 0, res.output
    out = res.output
    for line in (
        "<data root>/imagenet/train/<wnid>/<wnid>_<n>.JPEG",
        "<data root>/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "<data root>/stl10/stl10_binary/",
        "<data root>/coco/annotations/instances_train2017.json",
        "<data root>/voc/VOCdevkit/VOC2007/Annotations/<id>.xml",
        "<data root>/cityscapes/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png",
        "<data root>/ucf101/\n      UCF-101/<Class>/v_<Class>_gGG_cCC.avi",
        "<data root>/hmdb51/\n      <class>/<video>.avi",
    ):
        assert line in out, line
    assert "synth_coco  (embedded synthetic, micro scale only)" in out
