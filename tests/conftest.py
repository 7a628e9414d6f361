"""Shared fixtures: composed configs, the tiny tokenizer and model, and hand-made clip batches.

Heavy imports (the model stack pulls in transformers, SAM-2 and Lightning) happen inside the fixtures, so
test modules that need none of them (``tests/data``, metrics) do not pay for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = REPO_ROOT / "experiments"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked ``long(seconds=...)`` (the slowest: minutes of training, several processes, many
    configs composed; seconds as measured in ``make test``) first, the longest first: ``make test`` hands
    whole modules to two workers in this order, so neither is left running a long one alone at the end."""

    def expected_seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("long")
        return 0.0 if marker is None else float(marker.kwargs["seconds"])

    items.sort(key=expected_seconds, reverse=True)


@pytest.fixture(scope="session")
def experiments_dir() -> Path:
    """The repository's experiment YAMLs, independent of the directory pytest runs from."""
    return EXPERIMENTS_DIR


@pytest.fixture(scope="session")
def compose(experiments_dir: Path) -> Callable[..., Any]:
    """``compose(*overrides)``: the validated run config with Hydra-syntax overrides."""
    from lightning_desa2va.config import compose_config

    def _compose(*overrides: str) -> Any:
        return compose_config(list(overrides), experiments_dir=experiments_dir)

    return _compose


@pytest.fixture(scope="session")
def tokenizer(compose: Callable[..., Any]) -> Any:
    """The embedded default tokenizer (built offline from the synthetic vocabulary)."""
    from hydra.utils import instantiate

    return instantiate(compose().model.tokenizer)


@pytest.fixture(scope="session")
def make_model(compose: Callable[..., Any], tokenizer: Any) -> Callable[..., tuple[Any, Any]]:
    """``make_model(*overrides, seed=0)``: (config, freshly built seeded DeSa2VA) for those overrides."""
    from lightning_desa2va.build import build_model

    def _make(*overrides: str, seed: int = 0) -> tuple[Any, Any]:
        cfg = compose(*overrides)
        torch.manual_seed(seed)
        return cfg, build_model(cfg, tokenizer)

    return _make


@pytest.fixture(scope="session")
def make_batch(tokenizer: Any) -> Callable[..., dict[str, Any]]:
    """``make_batch(model, expressions, num_frames=2, seed=0, qa=())``: a collated batch, one clip per
    expression, each conversation followed by the QA turns ``qa`` (``(question, answer)`` pairs).

    Each clip has a bright rectangle (the target, at a different place per clip) on a dim noisy
    background; tokens come from the real chat encoder and collation, sized to the model's foundations.
    """
    from torch.nn import functional as F

    from lightning_desa2va.data.chat import IGNORE_INDEX, ChatEncoder, ChatTemplates
    from lightning_desa2va.data.clips import collate_clips
    from lightning_desa2va.data.schema import QAPair

    def _make(
        model: Any, expressions: list[str], num_frames: int = 2, seed: int = 0, qa: Sequence = ()
    ) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        encoder = ChatEncoder(tokenizer, ChatTemplates(), model.vlm.image_tokens)
        size, vlm_size = model.sam.image_size, model.vlm.image_size
        # The rectangle is object 1, a still "red square" for the look and motion objectives.
        looks = torch.tensor(
            [[IGNORE_INDEX] * 2, tokenizer("red square", add_special_tokens=False)["input_ids"]]
        )
        still = tokenizer("still", add_special_tokens=False)["input_ids"]
        motions = torch.tensor([[IGNORE_INDEX] * 2, [*still, IGNORE_INDEX]])  # the rectangle stays put
        samples = []
        for index, expression in enumerate(expressions):
            target = torch.zeros(num_frames, size, size, dtype=torch.bool)
            top, left = size // 8 + 8 * index, size // 4 + 4 * index
            target[:, top : top + size // 3, left : left + size // 4] = True
            noise = 0.2 * torch.randn(num_frames, 3, size, size, generator=generator)
            frames = noise + 1.5 * target[:, None].float() - 0.5
            vlm_pixels = F.interpolate(frames, size=(vlm_size, vlm_size), mode="bilinear")
            chat = encoder.segmentation(expression, num_frames, [QAPair(*pair) for pair in qa])
            label = encoder.label_prompt(expression)
            caption = encoder.caption_qa(f"the {expression}", num_frames, [])
            samples.append(
                {
                    "frames": frames,
                    "vlm_pixels": vlm_pixels,
                    "target_masks": target,
                    "instance_masks": target.long(),
                    "input_ids": chat.input_ids,
                    "labels": chat.labels,
                    "label_input_ids": label.input_ids,
                    "expression_label_input_ids": label.input_ids,
                    "referent_word_ids": torch.zeros(0, dtype=torch.long),  # no object attributes here
                    "referent_motion_ids": torch.zeros(0, dtype=torch.long),
                    "object_look_ids": looks,
                    "object_motion_ids": motions,
                    "stated_motion": torch.zeros(3),  # a look-only expression states no motion
                    "caption_input_ids": caption.input_ids,
                    "caption_labels": caption.labels,
                    "has_caption": True,
                    "qa_questions": [],
                    "expression": expression,
                    "expression_type": "static",
                    "video_id": f"video-{index}",
                }
            )
        return collate_clips(samples, tokenizer.pad_token_id)

    return _make


@pytest.fixture(scope="session")
def build_stage() -> Callable[[Any, Any], Any]:
    """``build_stage(cfg, model)``: the configured stage LightningModule around ``model``."""
    from hydra.utils import instantiate

    def _build(cfg: Any, model: Any) -> Any:
        return instantiate(cfg.stage, model=model, loss=instantiate(cfg.loss))

    return _build


@pytest.fixture(scope="session")
def fit_on_batch() -> Callable[..., tuple[Any, list[float]]]:
    """``fit_on_batch(stage, batch, steps, root, val_batch=None, **trainer_options)``: (trainer, losses).

    A real but quiet Lightning fit (no logger, checkpoints or progress bar) on one batch repeated ``steps``
    times, so a test exercises the stage's own optimizer, training_step and logging.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class LossRecorder(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    def _fit(stage: Any, batch: Any, steps: int, root: Path, val_batch: Any = None, **options: Any):
        recorder = LossRecorder()
        trainer = pl.Trainer(
            **{
                "accelerator": "cpu",
                "devices": 1,
                "max_steps": steps,
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "limit_val_batches": 0 if val_batch is None else 1.0,
                "callbacks": [recorder],
                "default_root_dir": root,
                **options,
            }
        )
        validation = None if val_batch is None else DataLoader([val_batch], batch_size=None)
        trainer.fit(stage, DataLoader([batch] * steps, batch_size=None), validation)
        return trainer, recorder.losses

    return _fit


@pytest.fixture(scope="session")
def in_scratch_folder() -> Callable[[Path], AbstractContextManager[str]]:
    """``with in_scratch_folder(root) as store:`` runs a job with ``root`` as its working folder (relative
    data/, outputs/, mlruns/ land there); ``store`` is the ``logger.tracking_uri`` override of an MLflow
    store in it, absolute because MLflow caches stores by URI (a relative one would reach another test's).
    """

    @contextmanager
    def _enter(root: Path) -> Iterator[str]:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root)
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            yield f"logger.tracking_uri=sqlite:///{root / 'mlflow.db'}"

    return _enter


@pytest.fixture(scope="session")
def real_weights(tmp_path_factory: pytest.TempPathFactory, compose: Callable[..., Any]) -> Any:
    """Tiny checkpoints in the real formats (an InternVL ``-hf`` folder, a SAM-2 ``.pt`` sized like the tiny
    default's), written once: a ``RealWeights`` whose ``overrides`` select ``model=internvl_hf`` on them."""
    from real_weight_folders import write_real_weights

    sam2 = compose().model.sam2
    return write_real_weights(tmp_path_factory.mktemp("weights"), sam2.config_name, list(sam2.overrides))


@pytest.fixture(autouse=True)
def _no_command_outlives_its_test() -> Iterator[None]:
    """A test that fails while a command of ``cli_processes`` runs leaves it killed, not running on."""
    yield
    from cli_processes import stop_left_running

    stop_left_running()
