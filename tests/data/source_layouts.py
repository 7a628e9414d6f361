"""Tiny datasets written in exactly the layouts the real ones ship in (MeViS / ReVOS, Ref-YouTube-VOS /
Ref-DAVIS17, refer's RefCOCO), with the ground truth the tests compare the shards against.

Frames are 24x40 (non-square) noisy JPEGs; objects are rectangles that never overlap unless a test asks,
one object is absent from some frames, one expression names two objects, some are not ASCII.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

HEIGHT, WIDTH = 24, 40
PALETTE = [0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [128] * (256 * 3 - 12)


@dataclass
class Truth:
    """What a converter must reproduce: per video, each object's binary masks and each expression."""

    frames: dict[str, list[Path]] = field(default_factory=dict)
    """video → its frame files, in order."""
    objects: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """video → source object id → [T, H, W] bool."""
    expressions: dict[str, dict[str, tuple[str, list[str]]]] = field(default_factory=dict)
    """video → expression id → (text, source object ids)."""


def rectangle(
    top: int, left: int, height: int, width: int, size: tuple[int, int] = (HEIGHT, WIDTH)
) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (HEIGHT, WIDTH)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    return path


def rle(mask: np.ndarray) -> dict | None:
    """MeViS's mask_dict entry of one frame: compressed COCO RLE with str counts, null when absent."""
    if not mask.any():
        return None
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


# MeViS video "vid_a": object 0 everywhere, object 1 absent from frame 2, object 2 moving; 4 frames.
MEVIS_VIDEOS = {
    "vid_a": {
        "frames": ["00000", "00001", "00002", "00003"],
        "objects": {  # obj_id: (anno_id, one mask per frame)
            0: ("10", [rectangle(2, 2, 8, 10)] * 4),
            1: (
                "11",
                [
                    rectangle(14, 3, 6, 8),
                    rectangle(14, 4, 6, 8),
                    rectangle(0, 0, 0, 0),
                    rectangle(14, 6, 6, 8),
                ],
            ),
            2: ("12", [rectangle(4, 20 + 3 * t, 10, 6) for t in range(4)]),
        },
        "expressions": {
            "0": ("the cat sitting still", [0]),
            "1": ("two animals, one of them leaves for a moment", [0, 1]),
            "2": ("l'oiseau qui s'envole très vite 🐦", [2]),
        },
    },
    "vid_b": {
        "frames": ["00000", "00001", "00002"],
        "objects": {0: ("20", [rectangle(5 + t, 5, 10, 12) for t in range(3)])},
        "expressions": {"0": ("狗在向下走", [0])},
    },
}


def write_mevis(root: Path, split: str = "train", revos: bool = False, ground_truth: bool = True) -> Truth:
    """MeViS (``root/<split>/...``) or ReVOS (``root/...``, ``meta_expressions_<split>_.json``); without
    ``ground_truth``, as MeViS ``valid`` is published: no ``mask_dict.json``, expressions without objects."""
    base = root if revos else root / split
    truth = Truth()
    meta: dict = {"videos": {}}
    mask_dict: dict = {}
    for v, (name, video) in enumerate(MEVIS_VIDEOS.items()):
        frame_dir = base / "JPEGImages" / name
        truth.frames[name] = [
            write_jpeg(frame_dir / f"{f}.jpg", 10 * v + t) for t, f in enumerate(video["frames"])
        ]
        truth.objects[name] = {str(o): np.stack(masks) for o, (_, masks) in video["objects"].items()}
        for anno, masks in video["objects"].values():
            mask_dict[anno] = [rle(mask) for mask in masks]
        expressions = {}
        for exp_id, (text, obj_ids) in video["expressions"].items():
            annos = [int(video["objects"][o][0]) for o in obj_ids]
            expressions[exp_id] = {"exp": text, "obj_id": obj_ids, "anno_id": annos}
            if revos:
                expressions[exp_id]["type_id"] = 0
        truth.expressions[name] = {
            k: (t, [str(o) for o in ids]) for k, (t, ids) in video["expressions"].items()
        }
        meta["videos"][name] = {"vid_id": v, "frames": video["frames"], "expressions": expressions}
    if revos:  # ReVOS also has expressions that match nothing in the video
        meta["videos"]["vid_b"]["expressions"]["1"] = {
            "exp": "the unicorn",
            "obj_id": [],
            "anno_id": [],
            "type_id": 2,
        }
        truth.expressions["vid_b"]["1"] = ("the unicorn", [])
    meta_name = f"meta_expressions_{split}_.json" if revos else "meta_expressions.json"
    if not ground_truth:
        for video in meta["videos"].values():
            video["expressions"] = {k: {"exp": e["exp"]} for k, e in video["expressions"].items()}
    (base / meta_name).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    if ground_truth:
        (base / "mask_dict.json").write_text(json.dumps(mask_dict))
    return truth


def overlap_objects(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    """Make objects 0 and 1 of MeViS video "vid_a" overlap on every frame (1 lies inside 0); their masks
    [T, H, W] by anno_id, as ``mask_dict.json`` now publishes them."""
    path = root / split / "mask_dict.json"
    mask_dict = json.loads(path.read_text())
    big, small = rectangle(0, 0, 20, 18), rectangle(5, 5, 4, 4)  # object 2 starts at column 20
    mask_dict["10"], mask_dict["11"] = [rle(big)] * 4, [rle(small)] * 4
    path.write_text(json.dumps(mask_dict))
    return {"10": np.stack([big] * 4), "11": np.stack([small] * 4)}


# Ref-YouTube-VOS video: frames every fifth, palette ids 1 and 2 (2 absent from the middle frame).
YTVOS_FRAMES = ["00000", "00005", "00010"]


def write_refytvos(root: Path, split: str = "train", ground_truth: bool = True) -> Truth:
    """Ref-YouTube-VOS; without ``ground_truth``, as its ``valid`` split is published: no ``Annotations``, no
    ``meta.json``, expressions without objects."""
    truth = Truth()
    person = [rectangle(2, 2 + t, 12, 8) for t in range(3)]
    dog = [rectangle(15, 20, 6, 10), rectangle(0, 0, 0, 0), rectangle(15, 26, 6, 10)]
    objects = {"1": np.stack(person), "2": np.stack(dog)}
    truth.objects["0a1b2c3d4e"] = objects
    truth.frames["0a1b2c3d4e"] = []
    for t, name in enumerate(YTVOS_FRAMES):
        truth.frames["0a1b2c3d4e"].append(
            write_jpeg(root / split / "JPEGImages" / "0a1b2c3d4e" / f"{name}.jpg", t)
        )
        if not ground_truth:
            continue
        ids = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        ids[person[t]], ids[dog[t]] = 1, 2
        png = Image.fromarray(ids)
        png.putpalette(PALETTE)
        path = root / split / "Annotations" / "0a1b2c3d4e" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        png.save(path)
    expressions = {"0": ("a person walking to the right", "1"), "1": ("ein Hund, der kurz verschwindet", "2")}
    truth.expressions["0a1b2c3d4e"] = {k: (text, [o]) for k, (text, o) in expressions.items()}
    entries = {
        k: {"exp": text, "obj_id": o} if ground_truth else {"exp": text}
        for k, (text, o) in expressions.items()
    }
    meta = {"videos": {"0a1b2c3d4e": {"frames": YTVOS_FRAMES, "expressions": entries}}}
    meta_path = root / "meta_expressions" / split / "meta_expressions.json"
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    if not ground_truth:
        return truth
    categories = {
        "1": {"category": "person", "frames": YTVOS_FRAMES},
        "2": {"category": "dog", "frames": YTVOS_FRAMES},
    }
    (root / split / "meta.json").write_text(json.dumps({"videos": {"0a1b2c3d4e": {"objects": categories}}}))
    return truth


def uncompressed_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a mask in column-major order, starting with a run of zeros (COCO's crowd RLE)."""
    counts, value, run = [], 0, 0
    for pixel in mask.flatten(order="F"):
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return [*counts, run]


def polygon(mask_box: tuple[int, int, int, int]) -> list[list[float]]:
    """A COCO polygon around the pixels of rectangle (top, left, height, width)."""
    top, left, height, width = mask_box
    x0, y0, x1, y1 = left, top, left + width, top + height
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


REFCOCO_VAL_ANNS = {201}


def write_refcoco(data: Path) -> Truth:
    """refer's layout: ``data/refcoco/refs(unc).p``, ``data/refcoco/instances.json``, images in
    ``data/images/mscoco/images/train2014``. Image 1 (24x40) has a polygon object and a compressed-RLE
    object; image 2 (30x20) an uncompressed-RLE crowd object, referred in the val split
    (:data:`REFCOCO_VAL_ANNS`), the others in train."""
    root = data / "refcoco"
    root.mkdir(parents=True)
    images = data / "images" / "mscoco" / "images" / "train2014"
    truth = Truth()
    boxes = {101: (2, 3, 10, 12), 102: (14, 22, 8, 15), 201: (5, 4, 20, 10)}
    sizes = {1: (HEIGHT, WIDTH), 2: (30, 20)}
    decoded = {}
    annotations = []
    for ann_id, box in boxes.items():
        image_id = ann_id // 100
        h, w = sizes[image_id]
        if ann_id == 101:
            segmentation = polygon(box)
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w)))
        else:
            mask = rectangle(*box, size=(h, w)).astype(np.uint8)
            encoded = mask_utils.encode(np.asfortranarray(mask))
            if ann_id == 102:
                segmentation = {"size": [h, w], "counts": encoded["counts"].decode("ascii")}
            else:  # uncompressed RLE, as COCO stores crowds
                segmentation = {"size": [h, w], "counts": uncompressed_counts(mask)}
        decoded[ann_id] = mask.astype(bool)
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1 + ann_id % 2,
                "segmentation": segmentation,
                "iscrowd": int(ann_id == 201),
                "area": float(mask.sum()),
                "bbox": [box[1], box[0], box[3], box[2]],
            }
        )
    coco_images = []
    for image_id, size in sizes.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        write_jpeg(images / name, image_id, size)
        coco_images.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
        video = Path(name).stem
        truth.frames[video] = [images / name]
        truth.objects[video] = {str(a): decoded[a][None] for a in boxes if a // 100 == image_id}
        truth.expressions[video] = {}
    instances = {
        "images": coco_images,
        "annotations": annotations,
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
        ],
    }
    (root / "instances.json").write_text(json.dumps(instances))
    sentences = {
        101: ["man on the left", "homme à gauche"],
        102: ["bike in the corner"],
        201: ["the tall one"],
    }
    refs = []
    for ref_id, (ann_id, texts) in enumerate(sentences.items()):
        split = "val" if ann_id in REFCOCO_VAL_ANNS else "train"
        sents = [
            {"sent_id": 10 * ref_id + k, "sent": text, "raw": text, "tokens": text.split()}
            for k, text in enumerate(texts)
        ]
        refs.append(
            {
                "ref_id": ref_id,
                "image_id": ann_id // 100,
                "ann_id": ann_id,
                "category_id": 1 + ann_id % 2,
                "split": split,
                "sent_ids": [s["sent_id"] for s in sents],
                "sentences": sents,
                "file_name": f"COCO_train2014_{ann_id // 100:012d}_{ann_id}.jpg",
            }
        )
        video = f"COCO_train2014_{ann_id // 100:012d}"
        for sent in sents:
            truth.expressions[video][str(sent["sent_id"])] = (sent["sent"], [str(ann_id)])
    with (root / "refs(unc).p").open("wb") as stream:
        pickle.dump(refs, stream, protocol=2)
    return truth
