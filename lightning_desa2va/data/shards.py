"""The one writer and the one reader of WebDataset shards in the :mod:`~lightning_desa2va.data.schema` layout.

Shards of a split are ``{split}-%06d.tar`` in one directory, next to a ``manifest.json`` that says what
was written (schema version, source, counts per split); it is written last, so its presence means the
data set is complete. Bad data is raised or skipped by the handlers of :mod:`~lightning_desa2va.data.skips`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset
from tqdm import tqdm

from lightning_desa2va.data.errors import SchemaVersionError, ShardFormatError
from lightning_desa2va.data.schema import (
    EXPRESSION_TYPES,
    READ_VERSIONS,
    SCHEMA_VERSION,
    VideoSample,
    decode_sample,
    encode_sample,
)
from lightning_desa2va.data.skips import SkipCounter, error_handler
from lightning_desa2va.data.synthetic import SyntheticConfig, generate_split

log = logging.getLogger(__name__)

SHARD_PATTERN = "{split}-%06d.tar"
"""Shard file names; ``%06d`` is the shard index."""

MANIFEST_NAME = "manifest.json"
SYNTHETIC_GENERATOR = "lightning_desa2va.data.synthetic"
"""``generator`` of a synthetic benchmark's manifest (a data dir the demo may rewrite)."""

TAR_MTIME = 0
"""Fixed member mtime, so the same input writes byte-identical shards (an int: a float mtime costs every
member a PAX header, which doubles the headers a reader parses)."""

"""What reading a damaged tar raises (webdataset passes them to the handler with the shard's url)."""
TAR_BLOCK = 512
TAR_CHECK_CACHE = 65536
"""Shards whose check :func:`tar_problem` remembers (the scan reads every header once per process)."""
END_OF_ARCHIVE = 2 * TAR_BLOCK
"""A complete tar ends with two zero blocks after its last member."""


def _shard_glob(split: str) -> str:
    """Glob matching exactly the shards of one split (not those of a split whose name extends it)."""
    return f"{split}-" + "[0-9]" * 6 + ".tar"


def shard_pattern(out_dir: Path, split: str) -> str:
    """printf-style path pattern of a split's shards."""
    return str(Path(out_dir) / SHARD_PATTERN.format(split=split))


def write_split(
    samples: Iterable[VideoSample], out_dir: Path, split: str, max_videos_per_shard: int
) -> list[Path]:
    """Write samples into ``out_dir/{split}-000000.tar`` ...; old shards of the split are removed first."""
    if max_videos_per_shard < 1:
        raise ValueError(f"max_videos_per_shard must be >= 1, got {max_videos_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out_dir.glob(_shard_glob(split))):
        log.info("removing stale shard %s", stale)
        stale.unlink()
    written: list[Path] = []
    with webdataset.ShardWriter(
        shard_pattern(out_dir, split),
        maxcount=max_videos_per_shard,
        verbose=0,
        post=lambda fname: written.append(Path(fname)),
        mtime=TAR_MTIME,
    ) as sink:
        for sample in samples:
            sink.write(encode_sample(sample))
    log.info("wrote %d shard(s) of split %r to %s", len(written), split, out_dir)
    return written


@dataclass
class SplitStats:
    """Counts for the manifest, gathered while the samples stream past."""

    num_videos: int = 0
    num_frames: int = 0
    num_expressions: int = 0
    num_qa: int = 0
    multi_object_expressions: int = 0
    expression_types: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXPRESSION_TYPES, 0))
    ground_truth: bool = True
    """Whether every video has masks (false: a split published without them, for inference only)."""

    def tap(self, samples: Iterable[VideoSample]) -> Iterator[VideoSample]:
        """Yield the samples unchanged, counting them."""
        for sample in samples:
            self.num_videos += 1
            self.num_frames += sample.num_frames
            self.ground_truth = self.ground_truth and sample.ground_truth
            self.num_qa += len(sample.qa)
            for expr in sample.expressions:
                self.num_expressions += 1
                self.expression_types[expr.type] += 1
                self.multi_object_expressions += len(expr.object_ids) > 1
            yield sample

    def entry(self, shards: list[Path], **extra: Any) -> dict[str, Any]:
        """The manifest's entry of a split."""
        return {**asdict(self), **extra, "shards": [p.name for p in shards]}


def write_synthetic_benchmark(
    out_dir: Path,
    cfg: SyntheticConfig,
    num_videos: dict[str, int],
    seed: int,
    max_videos_per_shard: int,
) -> dict[str, list[Path]]:
    """Generate and write every split, then ``manifest.json`` describing how and what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    shards: dict[str, list[Path]] = {}
    splits: dict[str, dict] = {}
    for split, count in num_videos.items():
        stats = SplitStats()
        clips = tqdm(
            generate_split(cfg, split, count, seed), total=count, desc=f"writing {split}", unit="video"
        )
        shards[split] = write_split(stats.tap(clips), out_dir, split, max_videos_per_shard)
        splits[split] = stats.entry(shards[split])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "generator": SYNTHETIC_GENERATOR,
        "seed": seed,
        "max_videos_per_shard": max_videos_per_shard,
        "config": asdict(cfg),
        "splits": splits,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return shards


def update_manifest(out_dir: Path, source: dict[str, Any], split: str, entry: dict[str, Any]) -> dict:
    """Record one converted split in ``manifest.json``, keeping the other splits of the same source."""
    path = Path(out_dir) / MANIFEST_NAME
    manifest: dict[str, Any] = {}
    if path.is_file():
        manifest = json.loads(path.read_text())
    same = manifest.get("schema_version") == SCHEMA_VERSION and manifest.get("source") == source
    splits = dict(manifest.get("splits", {})) if same else {}
    splits[split] = entry
    manifest = {"schema_version": SCHEMA_VERSION, "source": source, "splits": splits}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(data_dir: Path) -> dict:
    """The data set's manifest, or a FileNotFoundError naming where it was looked for."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {Path(data_dir).resolve()}: shards missing or incomplete"
        )
    return json.loads(path.read_text())


def manifest_version(data_dir: Path) -> int | None:
    """The schema version a data dir's manifest records (``None`` without a manifest)."""
    path = Path(data_dir) / MANIFEST_NAME
    return json.loads(path.read_text()).get("schema_version") if path.is_file() else None


def check_schema_version(data_dir: Path) -> None:
    """Fail before reading when a data dir's manifest says its shards have another schema version, or are of
    version 2 with objects that overlap (whose masks version 2 painted into one object's)."""
    version = manifest_version(data_dir)
    if version is None or version == SCHEMA_VERSION:
        return
    if version not in READ_VERSIONS:
        raise SchemaVersionError(
            f"{data_dir}: shards of schema version {version}, this reader reads version {SCHEMA_VERSION}; "
            "rewrite them (desa2va shards synthetic / desa2va shards build) or delete the directory"
        )
    lost = {
        split: entry.get("overlapping_pixels", 0)
        for split, entry in read_manifest(data_dir).get("splits", {}).items()
        if entry.get("overlapping_pixels", 0)
    }
    if lost:
        raise SchemaVersionError(
            f"{data_dir}: shards of schema version {version} gave pixels where objects overlap to one object "
            f"({lost}), so the other's ground truth is not the published one; rebuild them with desa2va "
            f"shards build (version {SCHEMA_VERSION} keeps each object's own mask)"
        )


def split_urls(data_dir: Path, split: str) -> list[str]:
    """Sorted shard paths of a split; FileNotFoundError naming the directory and split if there are none."""
    data_dir = Path(data_dir)
    urls = sorted(str(p) for p in data_dir.glob(_shard_glob(split)))
    if not urls:
        raise FileNotFoundError(
            f"no shards of split {split!r} ({SHARD_PATTERN.format(split=split)}) in {data_dir}"
        )
    return urls


def tar_problem(path: str) -> str | None:
    """Why a local tar file is incomplete (``None`` when it is whole), from its headers alone; the
    answer is remembered per process while the file's size and mtime stay the same.

    Reading a tar cut inside a member raises, but one cut in or right before a member header reads as
    a shorter, complete archive: Python's tarfile stops there silently. The block count and the
    end-of-archive blocks tell the difference.
    """
    stat = os.stat(path)
    return _tar_problem(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=TAR_CHECK_CACHE)
def _tar_problem(path: str, size: int, mtime_ns: int) -> str | None:
    if size % TAR_BLOCK:
        return f"{size} bytes, not a whole number of {TAR_BLOCK}-byte tar blocks: truncated"
    end = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                end = member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK
    except tarfile.TarError as exn:
        return f"{type(exn).__name__}: {exn}"
    if end + END_OF_ARCHIVE > size:
        return f"ends at byte {size} without the end-of-archive blocks: truncated"
    return None


def verified(handler: Callable[[Exception], bool]) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """A pipeline stage passing shard urls on, reporting an incomplete local tar to ``handler`` first
    (``truncated_tar``); its readable samples are still read."""

    def stage(urls: Iterable[dict]) -> Iterator[dict]:
        for item in urls:
            url = item["url"]
            problem = tar_problem(url) if os.path.isfile(url) else None
            if problem:
                handler(ShardFormatError(f"shard {url}: {problem}", "truncated_tar", shard=url))
            yield item

    return stage


def shard_reader(
    urls: list[str],
    handler: Callable[[Exception], bool],
    split: bool = False,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    split_samples: bool = False,
) -> webdataset.DataPipeline:
    """Raw samples of the shards: shards split by node and worker (``split``; with ``split_samples`` by worker
    only, each rank keeping its share of every shard's samples), shuffled by ``shuffle_seed`` and ``epoch``
    when a seed is given, each tar checked whole before it is read."""
    stages: list[Any] = [webdataset.SimpleShardList(urls)]
    if split:
        stages += (
            [webdataset.split_by_worker]
            if split_samples
            else [webdataset.split_by_node, webdataset.split_by_worker]
        )
    if shuffle_seed is not None:
        # detshuffle counts passes itself, from the epoch it is given + 1
        stages.append(webdataset.detshuffle(len(urls), seed=shuffle_seed, epoch=epoch - 1))
    stages += [verified(handler), webdataset.tarfile_to_samples(handler=handler)]
    if split and split_samples:
        stages.append(split_samples_by_node)
    return webdataset.DataPipeline(*stages)


def split_samples_by_node(samples: Iterable[dict]) -> Iterator[dict]:
    """This rank's share of each shard's samples: every world-size-th by its place in the shard. Every rank
    reads every shard, so an evaluation split scores each sample exactly once however few shards it has
    (split by shard, a rank could get none, and wait for ever for the others at the end)."""
    rank, world_size, _, _ = webdataset.utils.pytorch_worker_info()
    places: dict[str, int] = {}
    for sample in samples:
        url = sample.get("__url__", "")
        place = places.get(url, 0)
        places[url] = place + 1
        if place % world_size == rank:
            yield sample


def read_split(
    urls: list[str] | str, on_error: str = "raise", skips: SkipCounter | None = None
) -> Iterator[VideoSample]:
    """Samples of the given shards in order (images still encoded).

    ``on_error="raise"`` raises :class:`ShardFormatError` naming the shard (and sample); ``"skip"`` drops
    unreadable shards and samples, logging each and counting them in ``skips`` when one is given.
    """
    urls = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    handler = error_handler(on_error, urls, skips)
    return iter(shard_reader(urls, handler).compose(webdataset.map(decode_sample, handler=handler)))
