"""The inference protocols (``eval=per_frame|sa2va|sa2va_i``): which frames the VLM sees and the fused mask
is decoded on, SAM-2's memory through the others, the frozen foundation decoder of Sa2VA-i, and scores at
each video's original size."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch.nn import functional as F

from lightning_desa2va.data.chat import ChatEncoder, ChatTemplates
from lightning_desa2va.metrics import region_similarity
from lightning_desa2va.models.inference import Sa2VAInference, keep_image_blocks
from lightning_desa2va.stages.base import at_original_size

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
EXPRESSIONS = ["the red circle", "the small blue square moving left"]
NUM_FRAMES = 5
KEY_FRAMES = 2
PROTOCOLS = {
    "per_frame": [],
    "sa2va": [f"eval.key_frames={KEY_FRAMES}"],
    "sa2va_i": [f"eval.key_frames={KEY_FRAMES}"],
}


def protocol_stage(make_model, build_stage, name: str, *overrides: str):
    cfg, model = make_model("stage=decoupled_finetune", "stage.num_overlays=0", f"eval={name}", *overrides)
    return cfg, build_stage(cfg, model)


def count_decoded_rows(monkeypatch, sam) -> list[int]:
    """Frames each language-prompted decode of ``sam`` decodes (a spy around the real call)."""
    rows: list[int] = []
    decode = sam.decode_prompts

    def spy(features, *args, **kwargs):
        rows.append(features.image_embeddings.shape[0])
        return decode(features, *args, **kwargs)

    monkeypatch.setattr(sam, "decode_prompts", spy)
    return rows


def count_calls(module: torch.nn.Module) -> list[int]:
    """One entry per forward call of ``module`` from now on."""
    called: list[int] = []
    module.register_forward_hook(lambda *_: called.append(1))
    return called


@pytest.mark.parametrize(("name", "decoded_frames"), [("per_frame", 5), ("sa2va", 2), ("sa2va_i", 2)])
def test_protocols_decode_the_fused_mask_on_their_key_frames_only(
    name, decoded_frames, make_model, make_batch, build_stage, monkeypatch
) -> None:
    _, stage = protocol_stage(make_model, build_stage, name, *PROTOCOLS[name])
    model = stage.model.eval()
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    rows = count_decoded_rows(monkeypatch, model.sam)
    shown: list[int] = []
    model.vlm.register_forward_hook(lambda module, args, out: shown.append(args[2].shape[0]))
    with torch.no_grad():
        result = stage.inference(model, batch)
    batch_size = len(EXPRESSIONS)
    assert rows and all(count == batch_size * decoded_frames for count in rows), rows
    assert shown == [batch_size * decoded_frames]  # the VLM's frames: the key frames only
    assert len(result.key_frames) == decoded_frames
    assert result.logits.shape == batch["target_masks"].shape
    # the key frames keep the fused mask decoded on them
    assert torch.equal(result.logits[:, result.key_frames], result.output.fused_logits)


def test_key_frames_are_the_first_k_or_spread_uniformly() -> None:
    assert Sa2VAInference(3, "first").key_frame_indices(10) == [0, 1, 2]
    assert Sa2VAInference(3, "uniform").key_frame_indices(10) == [0, 4, 9]
    assert Sa2VAInference(4, "uniform").key_frame_indices(7) == [0, 2, 4, 6]
    assert Sa2VAInference(5, "uniform").key_frame_indices(3) == [0, 1, 2]  # a short clip: every frame
    with pytest.raises(ValueError, match="eval.sampling"):
        Sa2VAInference(3, "random")
    with pytest.raises(ValueError, match="eval.tracking_decoder=foundation needs"):
        Sa2VAInference(3, "first", "foundation")


def test_the_vlm_is_asked_with_the_image_blocks_of_the_key_frames_only(tokenizer, make_model) -> None:
    _, model = make_model()
    encoder = ChatEncoder(tokenizer, ChatTemplates(), model.vlm.image_tokens)
    full = [encoder.segmentation(text, NUM_FRAMES, []).input_ids for text in EXPRESSIONS]
    ids = torch.nn.utils.rnn.pad_sequence(full, batch_first=True, padding_value=tokenizer.pad_token_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(row) for row in full], batch_first=True)
    kept_ids, kept_mask = keep_image_blocks(
        ids, mask, model.vlm.model.config.image_token_id, NUM_FRAMES, [0, 4]
    )
    for row, text in enumerate(EXPRESSIONS):
        expected = encoder.segmentation(text, 2, []).input_ids
        assert torch.equal(kept_ids[row, : len(expected)], expected)
        assert int(kept_mask[row].sum()) == len(expected)


def test_the_key_frame_masks_reach_the_other_frames_through_memory(make_model, make_batch) -> None:
    _, model = make_model("stage=decoupled_finetune")
    model.eval()
    frames = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)["frames"]
    size = model.sam.image_size
    left = torch.full((2, KEY_FRAMES, size, size), -10.0)
    right = left.clone()
    left[..., 20:60, 10:50] = 10.0
    right[..., 70:110, 70:120] = 10.0
    with torch.no_grad():
        from_left = model.propagate(frames, [0, 3], left)
        from_right = model.propagate(frames, [0, 3], right)
    assert torch.equal(from_left[:, [0, 3]], left)
    # frames 1, 2 and 4 get no mask of their own: only the key frames' memory can make them differ
    assert not torch.allclose(from_left[:, [1, 2, 4]], from_right[:, [1, 2, 4]])


def test_sa2va_i_tracks_with_the_foundation_decoder_and_sa2va_with_the_tuned_one(
    make_model, make_batch, build_stage
) -> None:
    calls = {}
    for name in ("sa2va", "sa2va_i"):
        _, stage = protocol_stage(make_model, build_stage, name, *PROTOCOLS[name])
        model = stage.model.eval()
        tuned = model.sam.sam_mask_decoder
        foundation = stage.inference.foundation_decoder
        assert foundation is not tuned
        counts = {
            "tuned": count_calls(tuned),
            "foundation": [] if foundation is None else count_calls(foundation),
        }
        with torch.no_grad():
            stage.inference(model, make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES))
        assert model.sam.sam_mask_decoder is tuned  # the model's own decoder is back after tracking
        calls[name] = {decoder: len(called) for decoder, called in counts.items()}
    decodes = 2  # the text and the visual mask of the key frames (fusion=dynamic reads both)
    tracked = NUM_FRAMES - KEY_FRAMES
    assert calls["sa2va"]["tuned"] >= decodes + tracked and calls["sa2va"]["foundation"] == 0
    assert calls["sa2va_i"]["tuned"] == decodes and calls["sa2va_i"]["foundation"] >= tracked


def test_the_foundation_decoder_stays_frozen_while_stage_2_trains(
    make_model, make_batch, build_stage, fit_on_batch, compose, tmp_path
) -> None:
    cfg, stage = protocol_stage(
        make_model, build_stage, "sa2va_i", *PROTOCOLS["sa2va_i"], "stage.optimizer.lr=1e-2"
    )
    foundation = stage.inference.foundation_decoder
    shipped = instantiate(compose().model.sam2).sam_mask_decoder.state_dict()
    batch = make_batch(stage.model, EXPRESSIONS, num_frames=3)
    fit_on_batch(stage, batch, 2, tmp_path, val_batch=batch)
    assert not any(parameter.requires_grad for parameter in foundation.parameters())
    assert not foundation.training
    trained = stage.optimizers().optimizer.param_groups[0]["params"]
    assert not {id(p) for p in foundation.parameters()} & {id(p) for p in trained}
    for key, value in foundation.state_dict().items():
        assert torch.equal(value, shipped[key]), f"the foundation decoder changed: {key}"
    assert any(
        not torch.equal(value, shipped[key])
        for key, value in stage.model.sam.sam_mask_decoder.state_dict().items()
    ), "the tuned decoder did not train"


def test_scores_are_computed_at_each_videos_original_size(make_model, make_batch, build_stage) -> None:
    _, stage = protocol_stage(make_model, build_stage, "per_frame")
    batch = make_batch(stage.model, EXPRESSIONS, num_frames=2)
    target = batch["target_masks"]
    logits = torch.where(target, 10.0, -10.0)
    # clip 0 at twice the height and three times the width, clip 1 at the model's size
    upsampled = F.interpolate(target[:1].float(), scale_factor=(2, 3), mode="nearest").bool()[0]
    batch["original_target_masks"] = [upsampled, target[1]]
    batch["original_size"] = [tuple(upsampled.shape[-2:]), tuple(target.shape[-2:])]
    scored = list(at_original_size(logits, batch))
    assert [pred.shape for pred, _, _ in scored] == [(1, *upsampled.shape), (1, *target[1].shape)]
    # the upsampled predictions meet the originals (but for corner pixels where bilinear weights tie)
    assert all(region_similarity(pred, gt).min() > 0.99 for pred, gt, _ in scored)

    stage.evaluation_logits = lambda batch, split: logits
    batch["original_target_masks"][0] = upsampled.roll(12, dims=-1)  # the original truth lies elsewhere
    stage._evaluate(batch, "val")
    scores = stage.scores["val"]["jf"].compute()
    assert scores["J"] < 0.9  # scored against the originals, not against the model-size targets


@pytest.fixture(scope="module")
def synthetic_eval(tmp_path_factory, compose, tokenizer):
    """A few synthetic validation videos as shards and a stage-2 checkpoint of the shipped foundations."""
    from lightning_desa2va.build import build_model
    from lightning_desa2va.data.shards import write_synthetic_benchmark
    from lightning_desa2va.data.synthetic import SyntheticConfig

    root = tmp_path_factory.mktemp("synthetic_eval")
    write_synthetic_benchmark(root / "data", SyntheticConfig(num_frames=NUM_FRAMES), {"val": 2}, 0, 2)
    cfg = compose("stage=decoupled_finetune")
    model = build_model(cfg, tokenizer)
    stage = instantiate(cfg.stage, model=model, loss=instantiate(cfg.loss))  # with its LoRA weights
    checkpoint = root / "last.ckpt"
    torch.save(
        {"state_dict": {f"model.{key}": value for key, value in stage.model.state_dict().items()}}, checkpoint
    )
    return root, checkpoint


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_a_short_stage_2_evaluation_runs_under_each_protocol(
    name, synthetic_eval, compose, in_scratch_folder
):
    from lightning_desa2va.pipeline import evaluate_checkpoint

    root, checkpoint = synthetic_eval
    overrides = [f"paths.data_dir={root / 'data'}", "data.num_workers=0", "data.eval_batch_size=2"]
    cfg = compose(
        "stage=decoupled_finetune", "stage.num_overlays=0", f"eval={name}", *PROTOCOLS[name], *overrides
    )
    with in_scratch_folder(root):
        scores, baseline = evaluate_checkpoint(cfg, checkpoint, "val")
    assert 0.0 <= scores["JF"] <= 1.0 and 0.0 < baseline["JF"] <= 1.0
    assert "diag/abs_cos_zt_zv" in scores  # the diagnostics read the protocol's own forward pass


def one_video(batch: dict) -> dict:
    """The batch's expressions all asked about clip 0 (as an evaluation batch holds a video's expressions)."""
    shared = {key: batch[key][:1].expand_as(batch[key]).clone() for key in ("frames", "vlm_pixels")}
    return {**batch, **shared, "video_id": ["video"] * len(batch["video_id"])}


@pytest.mark.parametrize("name", ["per_frame", "sa2va"])
def test_the_expressions_of_a_video_share_its_encoding_and_get_the_same_masks(
    name, make_model, make_batch, build_stage
) -> None:
    _, stage = protocol_stage(make_model, build_stage, name, *PROTOCOLS[name])
    model = stage.model.eval()
    shared = one_video(make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES))
    apart = {**shared, "video_id": ["one", "other"]}  # the same pixels, read as two videos
    encoded: list[int] = []
    model.sam.image_encoder.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    with torch.no_grad():
        together = stage.inference(model, shared)
        encoded_together, encoded[:] = list(encoded), []
        separately = stage.inference(model, apart)
    # SAM-2 encodes the video's frames once for all its expressions (for sa2va: its key frames to decode,
    # all its frames to track through), where two videos are encoded one by one
    frames_encoded = {"per_frame": [NUM_FRAMES], "sa2va": [KEY_FRAMES, NUM_FRAMES]}[name]
    assert encoded_together == frames_encoded
    assert encoded == [count * len(EXPRESSIONS) for count in frames_encoded]
    torch.testing.assert_close(together.logits, separately.logits)
    assert not torch.allclose(together.logits[0], together.logits[1])  # each expression its own mask


def test_stage_1_evaluation_encodes_a_video_once_for_all_its_expressions(
    make_model, make_batch, build_stage
) -> None:
    cfg, model = make_model("stage=text_pretrain", "stage.num_overlays=0")
    stage = build_stage(cfg, model)
    batch = one_video(make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES))
    encoded: list[int] = []
    model.sam.image_encoder.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    with torch.no_grad():
        shared = stage.predict_logits(batch)
        assert encoded == [NUM_FRAMES]
        torch.testing.assert_close(shared, stage.segment(batch).logits)
