"""The one writer and the one reader of WebDataset shards in the :mod:`~lightning_desa2va.data.schema` layout.

Shards of a split are ``{split}-%06d.tar`` in one directory. :func:`write_synthetic_benchmark` writes
``manifest.json`` last, so its presence means the benchmark is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset
from tqdm import tqdm
from webdataset.handlers import reraise_exception

from lightning_desa2va.data.schema import (
    EXPRESSION_TYPES,
    SCHEMA_VERSION,
    ShardFormatError,
    VideoSample,
    decode_sample,
    encode_sample,
)
from lightning_desa2va.data.synthetic import SyntheticConfig, generate_split

log = logging.getLogger(__name__)

SHARD_PATTERN = "{split}-%06d.tar"
"""Shard file names; ``%06d`` is the shard index."""

MANIFEST_NAME = "manifest.json"

TAR_MTIME = 0.0
"""Fixed member mtime, so the same seed writes byte-identical shards."""

ON_ERROR_CHOICES = ("raise", "skip")


def _shard_glob(split: str) -> str:
    """Glob matching exactly the shards of one split (not those of a split whose name extends it)."""
    return f"{split}-" + "[0-9]" * 6 + ".tar"


def shard_pattern(out_dir: Path, split: str) -> str:
    """printf-style path pattern of a split's shards."""
    return str(Path(out_dir) / SHARD_PATTERN.format(split=split))


def write_split(
    samples: Iterable[VideoSample],
    out_dir: Path,
    split: str,
    max_videos_per_shard: int,
    total: int | None = None,
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
    with (
        webdataset.ShardWriter(
            shard_pattern(out_dir, split),
            maxcount=max_videos_per_shard,
            verbose=0,
            post=lambda fname: written.append(Path(fname)),
            mtime=TAR_MTIME,
        ) as sink,
        tqdm(total=total, desc=f"writing {split}", unit="video") as bar,
    ):
        for sample in samples:
            sink.write(encode_sample(sample))
            bar.update()
    log.info("wrote %d shard(s) of split %r to %s", len(written), split, out_dir)
    return written


@dataclass
class _SplitStats:
    """Counts for the manifest, gathered while the samples stream past."""

    num_videos: int = 0
    num_expressions: int = 0
    num_qa: int = 0
    multi_object_expressions: int = 0
    expression_types: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXPRESSION_TYPES, 0))

    def tap(self, samples: Iterable[VideoSample]) -> Iterator[VideoSample]:
        """Yield the samples unchanged, counting them."""
        for sample in samples:
            self.num_videos += 1
            self.num_qa += len(sample.qa)
            for expr in sample.expressions:
                self.num_expressions += 1
                self.expression_types[expr.type] += 1
                self.multi_object_expressions += len(expr.object_ids) > 1
            yield sample


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
        stats = _SplitStats()
        samples = stats.tap(generate_split(cfg, split, count, seed))
        shards[split] = write_split(samples, out_dir, split, max_videos_per_shard, total=count)
        splits[split] = {**asdict(stats), "shards": [p.name for p in shards[split]]}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "generator": "lightning_desa2va.data.synthetic",
        "seed": seed,
        "max_videos_per_shard": max_videos_per_shard,
        "config": asdict(cfg),
        "splits": splits,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return shards


def read_manifest(data_dir: Path) -> dict:
    """The benchmark's manifest, or a FileNotFoundError naming where it was looked for."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {Path(data_dir).resolve()}: shards missing or incomplete"
        )
    return json.loads(path.read_text())


def split_urls(data_dir: Path, split: str) -> list[str]:
    """Sorted shard paths of a split; FileNotFoundError naming the directory and split if there are none."""
    data_dir = Path(data_dir)
    urls = sorted(str(p) for p in data_dir.glob(_shard_glob(split)))
    if not urls:
        raise FileNotFoundError(
            f"no shards of split {split!r} ({SHARD_PATTERN.format(split=split)}) in {data_dir}"
        )
    return urls


def _reason(exn: BaseException) -> str:
    """Short description of an exception (webdataset appends stream objects to its args)."""
    detail = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {detail}" if detail else type(exn).__name__


def _shard_of(exn: BaseException, urls: Iterable[str]) -> str | None:
    """The shard an exception came from (webdataset appends the url to ``exn.args``), if it says."""
    known = set(urls)
    for arg in reversed(exn.args):
        if isinstance(arg, str) and (arg in known or arg.endswith(".tar")):
            return arg
    text = str(exn)
    return next((u for u in sorted(known) if u in text), None)


@dataclass
class SkipCounter:
    """A webdataset handler that logs and counts what ``on_error="skip"`` drops.

    ``count`` counts error events: a truncated shard usually costs one event for the shard and one for
    the partial sample it ends with.
    """

    urls: list[str] = field(default_factory=list)
    count: int = 0
    messages: list[str] = field(default_factory=list)

    def __call__(self, exn: Exception) -> bool:
        """Handler protocol of :mod:`webdataset.handlers`: True means continue with the next item."""
        self.count += 1
        message = (
            str(exn)
            if isinstance(exn, ShardFormatError)
            else f"shard {_shard_of(exn, self.urls) or '<unknown>'}: {_reason(exn)}"
        )
        self.messages.append(message)
        log.warning("skipping unreadable data (%d so far): %s", self.count, message)
        return True


def error_handler(
    on_error: str, urls: Iterable[str], skips: SkipCounter | None = None
) -> Callable[[Exception], bool]:
    """A webdataset handler: ``raise`` re-raises naming the shard, ``skip`` counts into ``skips``."""
    urls = list(urls)
    if on_error == "skip":
        counter = skips if skips is not None else SkipCounter()
        counter.urls.extend(u for u in urls if u not in counter.urls)  # one counter may serve several splits
        return counter
    if on_error != "raise":
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")

    def raise_naming_shard(exn: Exception) -> bool:
        shard = None if isinstance(exn, ShardFormatError) else _shard_of(exn, urls)
        if shard is None:  # already named, or not about reading a shard: leave it as it is
            return reraise_exception(exn)
        raise ShardFormatError(f"cannot read shard {shard}: {_reason(exn)}") from exn

    return raise_naming_shard


def read_split(
    urls: list[str] | str, on_error: str = "raise", skips: SkipCounter | None = None
) -> Iterator[VideoSample]:
    """Decoded samples of the given shards in order.

    ``on_error="raise"`` raises :class:`ShardFormatError` naming the shard (and sample); ``"skip"`` drops
    unreadable shards and samples, logging each and counting them in ``skips`` when one is given.
    """
    urls = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    handler = error_handler(on_error, urls, skips)
    dataset = webdataset.WebDataset(
        urls,
        handler=handler,
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        empty_check=False,
    ).map(decode_sample, handler=handler)
    return iter(dataset)
