"""Real-weight recipes end to end on tiny checkpoints saved in the real formats (real_weight_folders.py).

``model=internvl_hf`` reads a transformers ``-hf`` folder (tokenizer, chat template, processor) and an
official SAM-2 ``.pt``; stage 2 trains LoRA and the new ``[SEG]`` embedding row alone; bad weights fail on
one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from lightning_desa2va.cli import main
from lightning_desa2va.config import compose_config
from lightning_desa2va.data.chat import IGNORE_INDEX, ChatEncoder, ChatTemplates
from lightning_desa2va.data.schema import QAPair
from lightning_desa2va.models.tokenizer import SEG_TOKEN, load_pretrained_tokenizer
from lightning_desa2va.pipeline import ensure_synthetic_shards, evaluate_checkpoint
from lightning_desa2va.training import train_stage

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
SMALL_RUN = [
    "stage=decoupled_finetune",
    "synthetic.videos={train:2,val:1,test:1}",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_workers=0",
    "data.shuffle_buffer=2",
    "stage.num_overlays=0",
]
PREDICT_VIDEO_SIZE = 96  # the video's own size; the tiny SAM-2 reads 128
PREDICT_FRAMES = 4
EMBEDDING = "model.vlm.model.model.language_model.embed_tokens"


@pytest.fixture(scope="module")
def finetuned(real_weights, tmp_path_factory, in_scratch_folder):
    """Stage 2 trained 2 steps from the tiny real-format weights, as `desa2va train` runs it."""
    root = tmp_path_factory.mktemp("finetune")
    with in_scratch_folder(root) as store:
        cfg = compose_config([*SMALL_RUN, store, *real_weights.overrides], EXPERIMENTS_DIR)
        ensure_synthetic_shards(cfg)
        run = train_stage(cfg, score_test=True)
        scores, _ = evaluate_checkpoint(cfg, run.checkpoint, "val")
    state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return cfg, run, scores, state


def test_internvl_hf_folder_trains_stage_two_and_evaluates(finetuned):
    cfg, run, scores, _ = finetuned
    assert cfg.run.choices.model == "internvl_hf"
    for metrics in (run.metrics, run.test_metrics, scores):
        assert 0.0 <= metrics["JF"] <= 1.0
    assert scores["JF"] == pytest.approx(run.metrics["JF"])  # the checkpoint reloads into a fresh build


def test_the_finetuned_internvl_hf_model_predicts_a_video_under_sa2va(finetuned, tmp_path):
    """`desa2va predict`'s code path on the real-format model: key frames through the folder's chat
    template, SAM-2 memory through the rest, one mask a frame at the video's size."""
    from PIL import Image

    from lightning_desa2va.data.synthetic import SyntheticConfig, render_video
    from lightning_desa2va.predict import predict

    cfg, run, _, _ = finetuned
    video = render_video(SyntheticConfig(image_size=PREDICT_VIDEO_SIZE, num_frames=PREDICT_FRAMES), 0, "clip")
    frames = tmp_path / "frames"
    frames.mkdir()
    for index, frame in enumerate(video.frames):
        Image.fromarray(frame).save(frames / f"{index:03d}.png")
    sa2va = compose_config([*cfg.run.overrides, "eval=sa2va", "eval.key_frames=2"], EXPERIMENTS_DIR)
    result = predict(
        sa2va, frames, video.sample.expressions[0].text, run.checkpoint, tmp_path / "out", "gif", 5.0
    )
    assert result.masks.shape == (PREDICT_FRAMES, PREDICT_VIDEO_SIZE, PREDICT_VIDEO_SIZE)
    assert len(list((tmp_path / "out").glob("mask_*.png"))) == PREDICT_FRAMES


def test_only_the_seg_rows_and_lora_train_and_the_checkpoint_keeps_them_alone(finetuned, real_weights):
    """The checkpoint holds LoRA and the [SEG] row, not the frozen folder weights; rebuilt from the folder
    it gives every pretrained row untouched and [SEG]'s trained row, in the input embedding and, tied as the
    folder ties them, in lm_head."""
    from lightning_desa2va.predict import load_predictor

    cfg, run, _, state = finetuned
    seg_id = load_pretrained_tokenizer(str(real_weights.vlm_folder)).convert_tokens_to_ids(SEG_TOKEN)
    pretrained = AutoModelForImageTextToText.from_pretrained(real_weights.vlm_folder, local_files_only=True)
    saved = pretrained.get_input_embeddings().weight.detach()
    assert seg_id == saved.shape[0]  # [SEG] is new to the checkpoint: its row was added
    assert not any("base_layer" in key or key.endswith("embed_tokens.weight") for key in state)
    delta = state[f"{EMBEDDING}.token_adapter.trainable_tokens_delta.default"]  # the [SEG] row, trained
    assert delta.shape == (1, saved.shape[1])
    vlm = load_predictor(cfg, run.checkpoint).stage.model.vlm.model
    embedding, head = vlm.get_input_embeddings(), vlm.get_output_embeddings()
    assert not torch.allclose(delta[0], embedding.token_adapter.trainable_tokens_original["default"][0])
    assert torch.equal(embedding.weight[:seg_id], saved)  # every pretrained row is untouched
    assert torch.equal(embedding.weight[seg_id], delta[0])
    assert torch.equal(head.weight[seg_id], delta[0])  # tied: the [SEG] it predicts is the one it reads
    lora_b = [value for key, value in state.items() if "lora_B" in key]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)  # LoRA B starts at 0: it trained


def test_chat_template_of_the_folder_lays_out_turns_and_labels_only_answers(real_weights):
    tokenizer = load_pretrained_tokenizer(str(real_weights.vlm_folder))
    encoder = ChatEncoder(tokenizer, ChatTemplates(), image_tokens=16)
    chat = encoder.segmentation("the red square", 2, [QAPair("what colour is it ?", "red")])
    tokens = tokenizer.convert_ids_to_tokens(chat.input_ids.tolist())
    labelled = [
        token for token, label in zip(tokens, chat.labels.tolist(), strict=True) if label != IGNORE_INDEX
    ]
    assert labelled == ["sure", ",", SEG_TOKEN, ".", "<|im_end|>", "red", "<|im_end|>"]
    assert tokens[:3] == ["<|im_start|>", "user", "<img>"]
    assert tokens.count("<IMG_CONTEXT>") == 2 * 16
    assert tokens.count("<|im_start|>") == 4  # user, assistant, user, assistant: the template's turns


@pytest.mark.parametrize(
    ("experiment", "folder"), [("desa2va_1b", "InternVL3-1B-hf"), ("desa2va_4b", "InternVL3-2B-hf")]
)
def test_real_recipes_compose_sa2va_values_and_stage_two_lora(experiment, folder):
    text = compose_config([f"experiment={experiment}", "stage=text_pretrain"], EXPERIMENTS_DIR)
    finetune = compose_config([f"experiment={experiment}", "stage=decoupled_finetune"], EXPERIMENTS_DIR)
    for cfg in (text, finetune):
        assert cfg.model.vlm.path == f"weights/{folder}"
        assert cfg.model.sam2.checkpoint == "weights/sam2.1_hiera_large.pt"
        assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
        assert cfg.stage.optimizer.lr == pytest.approx(4e-5)
        assert cfg.data.num_frames == (2 if cfg is text else 5)  # stage 1 reads 2 frames, as in the default
        assert cfg.loss.mask.num_points == 12544 and cfg.model.vlm.gradient_checkpointing
        assert cfg.run.choices.eval == "sa2va_i"  # tracking by the official SAM-2's mask decoder
        assert cfg.eval.foundation_sam2.checkpoint == cfg.model.sam2.checkpoint
        assert cfg.run.choices.motion_prompt == "none" and cfg.loss.w_stated_motion == cfg.stage.w_motion == 0
        assert not cfg.logger.log_model
        # validation (counts batches) and checkpoints (count optimizer steps) fall on the same steps
        accumulate, every = (
            cfg.trainer.accumulate_grad_batches,
            cfg.trainer.callbacks.checkpoint.every_n_train_steps,
        )
        assert cfg.trainer.val_check_interval == accumulate * every and cfg.trainer.max_steps % every == 0
    assert "lora" not in text.stage
    assert (finetune.stage.lora.r, finetune.stage.lora.lora_alpha) == (128, 256)
    moved = compose_config([f"experiment={experiment}", "paths.weights_dir=/data/w"], EXPERIMENTS_DIR)
    assert moved.model.vlm.path == f"/data/w/{folder}"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(real_weights):
    """Layers recompute their activations in the backward pass; LoRA and [SEG] get the same gradients."""
    from peft import LoraConfig

    from lightning_desa2va.models.vlm import load_pretrained_vlm

    tokenizer = load_pretrained_tokenizer(str(real_weights.vlm_folder))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        vlm = load_pretrained_vlm(
            str(real_weights.vlm_folder), tokenizer, [SEG_TOKEN], "float32", checkpointing
        )
        vlm.requires_grad_(False)
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"
        )
        tags = vlm.adapt(lora)
        for name, parameter in vlm.named_parameters():
            parameter.requires_grad_(any(tag in name for tag in tags))
        vlm.train()
        assert vlm.model.is_activation_checkpointing == checkpointing
        chat = ChatEncoder(tokenizer, ChatTemplates(), vlm.image_tokens).segmentation("the red square", 2, [])
        pixels = torch.randn(2, 3, vlm.image_size, vlm.image_size, generator=torch.Generator().manual_seed(1))
        out = vlm(chat.input_ids[None], torch.ones_like(chat.input_ids)[None], pixels, chat.labels[None])
        (out.lm_loss + out.seg_hidden.square().mean()).backward()
        grads = {name: p.grad.clone() for name, p in vlm.named_parameters() if p.requires_grad}
        results.append((out.lm_loss.detach(), grads))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    assert torch.allclose(loss, checkpointed_loss) and grads.keys() == checkpointed_grads.keys()
    assert any("trainable_tokens_delta" in name for name in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, checkpointed_grads[name], atol=1e-6), name


def test_missing_vlm_folder_is_one_line(real_weights, capsys):
    absent = real_weights.weights_dir / "InternVL3-absent-hf"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--experiments-dir",
                str(EXPERIMENTS_DIR),
                "train",
                *real_weights.overrides,
                f"model.folder={absent}",
            ]
        )
    assert exit_info.value.code == 2
    assert _error_line(capsys) == f"desa2va: error: VLM folder not found: {absent}"


def test_folder_without_a_model_is_one_line(real_weights, tmp_path, capsys):
    tokenizer_only = tmp_path / "tokenizer-only"
    shutil.copytree(
        real_weights.vlm_folder, tokenizer_only, ignore=shutil.ignore_patterns("config.json", "*.safetensors")
    )
    with pytest.raises(SystemExit):
        main(
            [
                "--experiments-dir",
                str(EXPERIMENTS_DIR),
                "train",
                *real_weights.overrides,
                f"model.folder={tokenizer_only}",
            ]
        )
    assert (
        _error_line(capsys)
        == f"desa2va: error: no transformers model folder (config.json) at {tokenizer_only}"
    )


def train_with_sam2_checkpoint(real_weights, checkpoint: Path) -> None:
    """`desa2va train` on the real-format model with another SAM-2 file; a user error exits."""
    with pytest.raises(SystemExit):
        main(["--experiments-dir", str(EXPERIMENTS_DIR), "train", *real_weights.overrides,
              f"model.sam2.checkpoint={checkpoint}"])  # fmt: skip


def test_sam2_checkpoint_of_another_size_is_one_line(real_weights, compose, tmp_path, capsys):
    sam2 = compose().model.sam2
    wider = [o for o in sam2.overrides if "neck.d_model" not in o] + ["model.image_encoder.neck.d_model=32"]
    from real_weight_folders import write_sam2_pt

    other = write_sam2_pt(tmp_path / "sam2_other.pt", sam2.config_name, wider)
    train_with_sam2_checkpoint(real_weights, other)
    message = _error_line(capsys)
    assert message.startswith(f"desa2va: error: SAM-2 checkpoint {other} does not fit the configured model")
    assert "shapes differ" in message


def test_sam2_file_that_is_no_checkpoint_is_one_line(real_weights, tmp_path, capsys):
    garbage = tmp_path / "sam2_garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    train_with_sam2_checkpoint(real_weights, garbage)
    message = _error_line(capsys)
    assert message.startswith(f"desa2va: error: SAM-2 checkpoint {garbage} cannot be read")


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's error: its last line of stderr, with no traceback before it (loading bars may be)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_qwen2_5_vl_folder_trains_stage_two_with_its_vision_tokens(real_weights, tmp_path, in_scratch_folder):
    with in_scratch_folder(tmp_path) as store:
        cfg = compose_config([*SMALL_RUN, store, *real_weights.qwen_overrides], EXPERIMENTS_DIR)
        ensure_synthetic_shards(cfg)
        run = train_stage(cfg)
    assert 0.0 <= run.metrics["JF"] <= 1.0
    state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    delta = state[f"{EMBEDDING}.token_adapter.trainable_tokens_delta.default"]
    assert delta.shape == (1, 32) and delta.abs().sum() > 0  # the [SEG] row is kept
    assert all(value.abs().sum() > 0 for key, value in state.items() if "lora_B" in key)


def test_export_is_a_hugging_face_folder_that_predict_and_eval_read_with_the_checkpoints_masks(
    finetuned, tmp_path, capsys
):
    """LoRA and [SEG] merged into a transformers folder; predict on it gives the checkpoint's masks, eval its
    scores, and every part holds as many parameters as the base model."""
    from lightning_desa2va.data.synthetic import SyntheticConfig, render_video
    from lightning_desa2va.predict import load_predictor, predict_config

    cfg, run, scores, _ = finetuned
    out = tmp_path / "export"
    data_dir = run.output_dir.parents[3] / cfg.paths.data_dir  # <root>/outputs/<experiment>/<stage>/<run>
    overrides = [*cfg.run.overrides, f"paths.data_dir={data_dir}"]
    main(
        [
            "--experiments-dir",
            str(EXPERIMENTS_DIR),
            "export",
            str(run.checkpoint),
            "--out",
            str(out),
            *overrides,
        ]
    )
    printed = capsys.readouterr().out
    manifest = json.loads((out / "desa2va.json").read_text())
    assert [(size["exported"], size["base"]) for size in manifest["sizes"]] == [
        (size["base"], size["base"]) for size in manifest["sizes"]
    ]
    assert "VLM" in printed and "SAM-2" in printed
    exported = AutoModelForImageTextToText.from_pretrained(
        out, local_files_only=True
    )  # transformers reads it
    seg_id = load_pretrained_tokenizer(str(out)).convert_tokens_to_ids(SEG_TOKEN)
    assert seg_id == exported.get_input_embeddings().num_embeddings - 1  # [SEG] is in the saved tokenizer
    assert manifest["scores"]["val/JF"] == pytest.approx(run.metrics["JF"])
    assert "base_model: InternVL3-tiny-hf" in (out / "README.md").read_text()

    video = render_video(SyntheticConfig(image_size=PREDICT_VIDEO_SIZE, num_frames=PREDICT_FRAMES), 1, "clip")
    expression = video.sample.expressions[0].text
    from_checkpoint = load_predictor(
        predict_config(overrides, run.checkpoint, EXPERIMENTS_DIR), run.checkpoint
    )
    from_export = load_predictor(predict_config([f"paths.data_dir={data_dir}"], out, EXPERIMENTS_DIR), out)
    assert "lora_" not in str(dict(from_export.stage.model.named_parameters()).keys())
    np.testing.assert_array_equal(
        from_export.masks(video.frames, expression), from_checkpoint.masks(video.frames, expression)
    )
    export_cfg = predict_config([f"paths.data_dir={data_dir}", "eval=per_frame"], out, EXPERIMENTS_DIR)
    export_scores, _ = evaluate_checkpoint(export_cfg, out, "val")
    assert export_scores["JF"] == pytest.approx(scores["JF"], abs=1e-6)


def test_predict_or_eval_of_a_checkpoint_under_another_model_is_one_line_naming_the_overrides_that_fit(
    finetuned, real_weights, tmp_path, capsys
):
    """The InternVL-hf checkpoint under the tiny default (no model overrides) and under Qwen2.5-VL's."""
    from PIL import Image

    _, run, _, _ = finetuned
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (32, 32)).save(frames / "000.png")
    predict = [
        "predict",
        "--video",
        str(frames),
        "--expression",
        "the red circle",
        "--ckpt",
        str(run.checkpoint),
    ]
    for command in (predict, [*predict, *real_weights.qwen_overrides], ["eval", str(run.checkpoint)]):
        with pytest.raises(SystemExit):
            main(["--experiments-dir", str(EXPERIMENTS_DIR), *command, "stage=decoupled_finetune"])
        line = _error_line(capsys)
        assert line.startswith(f"desa2va: error: {run.checkpoint} does not fit the configured model: "), line
        assert "model=internvl_hf" in line and f"model.folder={real_weights.vlm_folder}" in line
