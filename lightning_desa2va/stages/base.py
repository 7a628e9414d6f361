"""What the stages share.

:class:`TrainingStage`: which modules train (reported per module at start), the optimizer (and optional
LR schedule), the NaN guard. :class:`SegmentationStage` adds evaluation: a subclass says how a batch
becomes a loss (``training_step``) and mask logits (``predict_logits``); validation and test then measure
J, F and J&F (:class:`~lightning_desa2va.metrics.JFMetric`), cIoU and gIoU
(:class:`~lightning_desa2va.metrics.ReferringIoUMetric`) and where the mask falls, per expression type,
and save overlays of a few clips for people to look at. A stage adds metrics of its own with
``score_metrics`` and updates them in ``evaluation_logits``.
"""

from __future__ import annotations

import logging
import tempfile
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_desa2va.errors import NonFiniteLossError
from lightning_desa2va.losses import LossTerms
from lightning_desa2va.metrics import JFMetric, MaskShareMetric, ReferringIoUMetric, synced
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.models.frame_cache import KEPT, CachingImageEncoder
from lightning_desa2va.stages.checkpoints import MODEL_PREFIX, RECORD_KEY, record_of, trainable_only
from lightning_desa2va.stages.motion import MotionProbe
from lightning_desa2va.tracking import log_artifacts
from lightning_desa2va.visualize import OverlayItem, save_overlays

log = logging.getLogger(__name__)

Optimizer = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
Scheduler = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

SPLITS = ("val", "test")
OBJECT_SCORE_HEAD = "sam.sam_mask_decoder.pred_obj_score_head"
"""SAM-2's head that says whether the object is in the frame: memory tracking reads it, no referring loss."""
IOU_HEAD = "sam.sam_mask_decoder.iou_prediction_head"
"""SAM-2's IoU estimate of each mask: read by a loss only through ``fusion=confidence``."""
SCORE_PREFIXES = {"mask_share": "mask_share/", "diag": "diag/"}
"""Metrics (by their key in ``score_metrics``) whose results are logged under a prefix: ``val/diag/...``."""


class TrainingStage(pl.LightningModule):
    """Base LightningModule of every training stage of :class:`DeSa2VA`."""

    #: How summaries name this stage (or its output masks).
    label: str = "model"

    def __init__(
        self,
        model: DeSa2VA,
        optimizer: Optimizer,
        train_modules: list[str],
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_modules = list(train_modules)
        self.last_validated_step: int | None = None
        self.trainable_extra: tuple[str, ...] = ()  # parameter-name parts trained beside train_modules
        self.initialised_keys: set[str] = set()  # model keys a checkpoint (stage.init_from) loaded
        # Checkpoints leave out the frozen foundation weights (stages/checkpoints.py): builds rebuild them.
        self.strict_loading = False
        self.run_overrides: list[str] = []  # the overrides that built the run, recorded in its checkpoints
        self.saved_weights: dict[str, int] = {}  # what the last checkpoint kept and left to the base folders

    def select_trainable(self, extra: Iterable[str] = (), unread: Iterable[str] = ()) -> None:
        """Freeze everything, then unfreeze the configured submodules and parameters named in ``extra``,
        except the submodules named in ``unread`` (e.g. :data:`IOU_HEAD` inside the mask decoder): what
        no loss of the stage reads stays frozen, because DDP without its search for unused parameters
        (``strategy=ddp``) needs a gradient for every trainable parameter at every step."""
        self.model.requires_grad_(False)
        for name in self.train_modules:
            try:
                self.model.get_submodule(name).requires_grad_(True)
            except AttributeError as error:
                raise ValueError(
                    f"stage.train_modules names '{name}', which the model does not have"
                ) from error
        self.trainable_extra = tuple(extra)
        unread_prefixes = tuple(f"{module}." for module in unread)
        for name, parameter in self.model.named_parameters():
            if any(part in name for part in self.trainable_extra):
                parameter.requires_grad_(True)
            if name.startswith(unread_prefixes):
                parameter.requires_grad_(False)

    def on_fit_start(self) -> None:
        """Report what trains when training starts (evaluating a checkpoint trains nothing)."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info(
            "%s trains %d of %d parameters:\n%s",
            type(self).__name__,
            trainable,
            self.model_size,
            self.trainable_table(self.trainable_extra),
        )

    def on_train_end(self) -> None:
        """Say how many frames the frozen image encoder's cache served (models/frame_cache.py)."""
        for module in self.model.modules():
            if isinstance(module, CachingImageEncoder) and module.hits + module.misses:
                log.info(
                    "image encoder: %d of %d frames served from its cache (%d kept in the process)",
                    module.hits,
                    module.hits + module.misses,
                    len(KEPT),
                )

    def trainable_table(self, extra: Iterable[str] = ()) -> str:
        """Trainable / total parameters of every part of the model, of each configured nested module
        (e.g. ``sam.sam_mask_decoder``), of the parameters named by ``extra`` (e.g. LoRA's ``lora_``) and
        of the heads the stage holds itself, one row each."""
        rows: list[tuple[str, list[nn.Parameter]]] = [
            (name, list(module.parameters())) for name, module in self.model.named_children()
        ]
        nested = [name for name in self.train_modules if "." in name]
        rows += [(name, list(self.model.get_submodule(name).parameters())) for name in nested]
        rows += [(f"*{tag}*", [p for n, p in self.model.named_parameters() if tag in n]) for tag in extra]
        rows += [
            (f"stage.{name}", list(module.parameters()))
            for name, module in self.named_children()
            if module is not self.model and any(True for _ in module.parameters())
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'module':<{width}}  {'trainable':>12}  {'total':>12}"]
        for name, parameters in rows:
            trained = sum(p.numel() for p in parameters if p.requires_grad)
            lines.append(f"{name:<{width}}  {trained:>12,}  {sum(p.numel() for p in parameters):>12,}")
        return "\n".join(lines)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what the run changed, not the frozen foundation weights; record what was left out."""
        rebuilt = trainable_only(self.model, checkpoint["state_dict"], self.initialised_keys)
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        checkpoint[RECORD_KEY] = record_of(rebuilt, self.run_overrides, metrics)
        kept = sum(key.startswith(MODEL_PREFIX) for key in checkpoint["state_dict"])
        self.saved_weights = {"model_tensors_kept": kept, "rebuilt_from_base": len(rebuilt)}

    @property
    def model_size(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def configure_optimizers(self) -> Any:
        """The trainable model parameters and any head the stage itself holds (e.g. a pre-training probe)."""
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def check_finite(
        self, loss: Tensor, batch: dict[str, Any], terms: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Stop on a NaN/inf loss, every rank together when any rank's is (one rank raising alone would
        leave the others waiting in their next collective)."""
        stop = not bool(torch.isfinite(loss))
        if self._trainer is not None:
            stop = self.trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise NonFiniteLossError(self._non_finite(loss, batch, terms or {}))
        return loss

    def _non_finite(self, loss: Tensor, batch: dict[str, Any], terms: Mapping[str, Tensor]) -> str:
        """One line: the loss, its first non-finite term, the step, the clips and the last good checkpoint."""
        if torch.isfinite(loss):
            what = "another rank's loss is not finite"
        else:
            bad = [f"{name} = {float(value)}" for name, value in terms.items() if not torch.isfinite(value)]
            what = f"loss is {float(loss)}" + (f" (term {bad[0]})" if bad else "")
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        checkpoint = getattr(callback, "last_model_path", "")
        last = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint saved yet"
        return f"{what} at step {self.global_step} on videos {batch['video_id']}; {last}"


@dataclass
class MotionTerms:
    """The motion probe's loss and the share of object pixels whose direction words it names."""

    loss: Tensor
    accuracy: Tensor


class SegmentationStage(TrainingStage):
    """A stage whose output is masks for expressions, scored with J&F per expression type."""

    def __init__(
        self,
        model: DeSa2VA,
        optimizer: Optimizer,
        train_modules: list[str],
        num_overlays: int,
        w_motion: float = 0.0,
        motion_grid: int = 32,
    ) -> None:
        super().__init__(model, optimizer, train_modules)
        self.num_overlays = num_overlays
        self.w_motion = w_motion
        self.motion_probe = (
            MotionProbe(model.sam.prompt_dim, model.vlm.vocab_size, motion_grid) if w_motion > 0 else None
        )
        self.scores = nn.ModuleDict({split: nn.ModuleDict(self.score_metrics()) for split in SPLITS})
        self._overlays: list[OverlayItem] = []

    def score_metrics(self) -> dict[str, torchmetrics.Metric]:
        """The metrics validation and test each update, by key (``SCORE_PREFIXES`` says which log under a
        prefix); a stage that measures more adds its own."""
        return {"jf": JFMetric(), "iou": ReferringIoUMetric(), "mask_share": MaskShareMetric()}

    def motion_objective(self, image_embeddings: Tensor, batch: dict[str, Any]) -> MotionTerms | None:
        """The motion probe on the embeddings the masks were decoded from (``None`` when ``w_motion`` is 0
        or the batch has no object with a motion)."""
        if self.motion_probe is None:
            return None
        loss, hits = self.motion_probe(image_embeddings, batch["instance_masks"], batch["object_motion_ids"])
        return None if loss is None else MotionTerms(loss, hits.float().mean())

    def log_losses(self, losses: LossTerms, motion: MotionTerms | None, batch: dict[str, Any]) -> Tensor:
        """Log every term, add the weighted motion loss to the mask losses and check the total is finite."""
        total, terms = losses.total, dict(losses.terms)
        batch_size = len(batch["expression"])
        if motion is not None:
            total = total + self.w_motion * motion.loss
            terms["motion"] = motion.loss
            self.log("train/motion_accuracy", motion.accuracy, batch_size=batch_size)
        self.log("train/loss", self.check_finite(total, batch, terms), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{name}": value for name, value in terms.items()}, batch_size=batch_size)
        return total

    @abstractmethod
    def predict_logits(self, batch: dict[str, Any]) -> Tensor:
        """The stage's output mask logits [B, T, H, W] for a batch."""

    def evaluation_logits(self, batch: dict[str, Any], split: str) -> Tensor:
        """The mask logits validation and test score; a stage with metrics of its own updates them here
        (``self.scores[split]``) from the same forward pass."""
        return self.predict_logits(batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Any], split: str) -> None:
        logits = self.evaluation_logits(batch, split)
        predicted = logits > 0
        scores, target, types = self.scores[split], batch["target_masks"], batch["expression_type"]
        for original_pred, original_target, clip_types in at_original_size(logits, batch):
            scores["jf"].update(original_pred, original_target, clip_types)
            scores["iou"].update(original_pred, original_target, clip_types)
        scores["mask_share"].update(
            predicted, target, batch["instance_masks"], batch["object_look_ids"], types
        )
        for index in range(len(batch["expression"])):
            if len(self._overlays) >= self.num_overlays:
                break
            self._overlays.append(
                OverlayItem(
                    frames=self._unnormalise(batch["frames"][index].cpu()),
                    pred=predicted[index].cpu(),
                    gt=target[index].cpu(),
                    title=batch["expression"][index],
                    name=f"{batch['video_id'][index]}_{batch['expression'][index]}",
                )
            )

    def on_validation_epoch_end(self) -> None:
        self._log_results("val")
        self.last_validated_step = self.global_step

    def on_test_epoch_end(self) -> None:
        self._log_results("test")

    def extra_results(self) -> dict[str, float]:
        """Results that no metric aggregates (e.g. measured on the weights), logged with every evaluation."""
        return {}

    def _log_results(self, split: str, metrics: Mapping[str, torchmetrics.Metric] | None = None) -> None:
        """Compute, reset and log ``metrics`` (default: the split's ``scores``), then save rank 0's overlays.

        Whether a metric has anything to report (e.g. no QA turn in any batch) is decided across ranks, and
        every rank computes it when any rank updated it: computing syncs the states, a collective that a
        rank which saw no sample must join too."""
        results = self.extra_results()
        for key, metric in (self.scores[split] if metrics is None else metrics).items():
            if self.trainer.strategy.reduce_boolean_decision(metric.update_called, all=False):
                prefix = SCORE_PREFIXES.get(key, "")
                results.update({f"{prefix}{name}": value for name, value in synced(metric).items()})
            metric.reset()
        self.log_dict({f"{split}/{name}": value for name, value in results.items()}, sync_dist=True)
        overlays, self._overlays = self._overlays, []
        if self.trainer.sanity_checking or not overlays or not self.trainer.is_global_zero:
            return
        with tempfile.TemporaryDirectory() as folder:
            paths = save_overlays(overlays, Path(folder))
            log_artifacts(
                self.logger,
                paths,
                f"overlays/{split}-step{self.global_step:06d}",
                fallback_dir=Path(self.trainer.default_root_dir),
            )

    def _unnormalise(self, frames: Tensor) -> Tensor:
        """Frames back in [0, 1] for people to look at."""
        encoder = self.trainer.datamodule.eval_encoder
        return (frames * encoder.pixel_std[0] + encoder.pixel_mean[0]).clamp(0, 1)


def at_original_size(logits: Tensor, batch: dict[str, Any]) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
    """(predicted masks, ground truth, expression types) to score: the predictions upsampled to each
    video's original size beside its original-size ground truth (``original_target_masks``), the whole batch
    at once when every video is at the model's size; batches without originals (training clips) as they
    are."""
    types = batch["expression_type"]
    originals = batch.get("original_target_masks")
    size = tuple(logits.shape[-2:])
    if originals is None or all(tuple(target.shape[-2:]) == size for target in originals):
        target = batch["target_masks"] if originals is None else torch.stack(originals).to(logits.device)
        yield logits > 0, target, types
        return
    for index, target in enumerate(originals):
        clip = logits[index][None].float()  # [1, T, H, W]: frames as channels, upsampled together
        upsampled = F.interpolate(clip, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
        yield upsampled > 0, target[None].to(logits.device), [types[index]]
