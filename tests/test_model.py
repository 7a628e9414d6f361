"""The DeSa2VA model, its decouplers, the [SEG] read-out, gradient flow per stage, and the losses."""

from __future__ import annotations

import pytest
import torch

from lightning_desa2va.losses import (
    LossTerms,
    MaskLoss,
    TripleSupervisionLoss,
    covered_share,
    uncertain_points,
)
from lightning_desa2va.models.decoupler import (
    LinearDecoupler,
    LinearOrthoDecoupler,
    NoDecoupler,
    SegEmbeddings,
)
from lightning_desa2va.models.desa2va import DeSa2VAOutput, MaskRequest

B, T = 2, 2
EXPRESSIONS = ["the red circle", "all the blue squares moving left"]


@pytest.fixture(scope="module")
def model(make_model):
    """A default (linear decoupler, dynamic fusion) model in eval mode, not wrapped by any stage."""
    _, built = make_model()
    return built.eval()


@pytest.fixture(scope="module")
def batch(model, make_batch):
    return make_batch(model, EXPRESSIONS, num_frames=T)


def forward(model, batch, **overrides) -> DeSa2VAOutput:
    inputs = {key: batch[key] for key in ("frames", "vlm_pixels", "input_ids", "attention_mask")}
    return model(**{**inputs, **overrides})


def test_forward_gives_every_mask_per_frame(model, batch) -> None:
    size = model.sam.image_size
    with torch.no_grad():
        out = forward(model, batch, labels=batch["labels"])
    for logits in (out.text_logits, out.visual_logits, out.fused_logits):
        assert logits.shape == (B, T, size, size)
        assert torch.isfinite(logits).all()
    assert out.embeddings.text.shape == out.embeddings.visual.shape == (B, model.sam.prompt_dim)
    # the fusion gates at the decoder's resolution, a quarter of the image's
    assert out.gate is not None and out.gate.shape == (B, T, size // 4, size // 4)
    assert ((out.gate >= 0) & (out.gate <= 1)).all()
    assert out.lm_loss is not None and out.lm_loss.ndim == 0 and torch.isfinite(out.lm_loss)
    assert out.text_heatmap is None  # regressed points are not read from a heatmap


def test_aux_masks_at_the_decoders_resolution_are_the_fused_masks_inputs_not_upsampled(model, batch) -> None:
    size = model.sam.image_size
    with torch.no_grad():
        image = forward(model, batch)
        decoder = forward(model, batch, masks=MaskRequest(aux_resolution="decoder"))
    for name in ("text_logits", "visual_logits"):
        low = getattr(decoder, name)
        assert low.shape == (B, T, size // 4, size // 4)
        upsampled = model.sam.upsample(low.flatten(0, 1)[:, None])[:, 0].view(B, T, size, size)
        torch.testing.assert_close(upsampled, getattr(image, name))
    torch.testing.assert_close(decoder.fused_logits, image.fused_logits)
    gated = decoder.gate * decoder.text_logits + (1 - decoder.gate) * decoder.visual_logits
    torch.testing.assert_close(
        model.sam.upsample(gated.flatten(0, 1)[:, None])[:, 0], image.fused_logits.flatten(0, 1)
    )


def test_segment_text_gives_text_masks_and_points_inside_the_image(model, batch) -> None:
    size = model.sam.image_size
    with torch.no_grad():
        segmentation = model.segment_text(
            batch["frames"], batch["label_input_ids"], batch["label_attention_mask"]
        )
    logits, prompt = segmentation.logits, segmentation.prompt
    assert logits.shape == (B, T, size, size)
    assert segmentation.image_embeddings.shape[0] == B * T
    assert prompt.tokens.shape == (B * T, model.text_prompt.num_points, model.sam.prompt_dim)
    coordinates = model.text_prompt.coordinates(10 * torch.randn(B * T, model.sam.prompt_dim), size)
    assert coordinates.shape == (B * T, model.text_prompt.num_points, 2)
    assert ((coordinates >= 0) & (coordinates <= size)).all()


def test_the_expression_changes_the_masks(model, batch, make_batch) -> None:
    other = make_batch(model, ["the green triangle", "the yellow object that is not moving"], num_frames=T)
    assert torch.equal(other["frames"], batch["frames"])  # same pixels, only the tokens differ
    with torch.no_grad():
        first, second = forward(model, batch), forward(model, other)
    assert first.lm_loss is None  # no labels given: the LM head's loss is skipped
    assert not torch.allclose(first.embeddings.text, second.embeddings.text)
    assert not torch.allclose(first.fused_logits, second.fused_logits)
    assert not torch.allclose(first.text_logits, second.text_logits)
    assert not torch.allclose(first.visual_logits, second.visual_logits)


def test_sa2va_baseline_shares_one_embedding_and_keeps_the_visual_mask(make_model, make_batch) -> None:
    _, baseline = make_model("experiment=sa2va_baseline")
    batch = make_batch(baseline, EXPRESSIONS, num_frames=T)
    with torch.no_grad():
        out = forward(baseline.eval(), batch)
    assert out.embeddings.text is out.embeddings.visual
    assert torch.equal(out.fused_logits, out.visual_logits)
    assert out.gate is None


def test_seg_hidden_is_the_last_layer_state_at_the_seg_token(model, batch) -> None:
    vlm = model.vlm
    ids, mask = batch["label_input_ids"], batch["label_attention_mask"]
    with torch.no_grad():
        seg_hidden = vlm(ids, mask).seg_hidden
        hidden = vlm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    for row in range(ids.shape[0]):
        position = (ids[row] == vlm.seg_token_id).nonzero()[0, 0]
        torch.testing.assert_close(seg_hidden[row], hidden[row, position])


def test_vlm_refuses_a_sequence_without_seg(model, batch) -> None:
    ids = batch["label_input_ids"].clone()
    ids[1][ids[1] == model.vlm.seg_token_id] = model.vlm.seg_token_id + 1
    with pytest.raises(ValueError, match=r"\[1\].*\[SEG\]"), torch.no_grad():
        model.vlm(ids, batch["label_attention_mask"])


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: parameter.grad for name, parameter in module.named_parameters()}


def assert_all_nonzero(grads: dict[str, torch.Tensor | None], where: str) -> None:
    assert grads, f"{where} has no parameters"
    dead = [name for name, grad in grads.items() if grad is None or not grad.abs().sum() > 0]
    assert not dead, f"{where}: no gradient reaches {dead}"


def test_mask_loss_gradient_reaches_every_trained_part_through_seg(make_model, make_batch, build_stage):
    cfg, model = make_model(
        "stage=decoupled_finetune", "loss.w_lm=0", "loss.w_orth=0", "loss.w_stated_motion=0"
    )
    stage = build_stage(cfg, model)
    batch = make_batch(model, EXPRESSIONS, num_frames=T)
    output = stage.forward_batch(batch)
    assert output.lm_loss is None  # w_lm=0: the answer labels do not even reach the VLM
    losses = stage.loss(output, batch["target_masks"], None)
    assert set(losses.terms) == {"fused", "text", "visual"}
    losses.total.backward()

    assert_all_nonzero(grads_of(model.decoupler), "decoupler")
    assert_all_nonzero(grads_of(model.text_prompt), "text prompt")
    assert_all_nonzero(grads_of(model.visual_prompt), "visual prompt")
    assert_all_nonzero(grads_of(model.fusion), "fusion")
    assert_all_nonzero(grads_of(model.sam.sam_mask_decoder.transformer), "SAM-2 mask decoder transformer")
    assert_all_nonzero(grads_of(model.sam.sam_mask_decoder.output_upscaling), "SAM-2 mask upscaling")
    # The mask loss reaches the language model only through the [SEG] hidden state. LoRA's B starts at
    # zero, so at initialisation only lora_B receives gradient (lora_A's is B^T·…=0).
    lora = {n: g for n, g in grads_of(model.vlm.language_model).items() if "lora_" in n}
    lora_b = {n: g for n, g in lora.items() if "lora_B" in n}
    num_layers = cfg.model.vlm.num_layers
    assert len(lora_b) == num_layers * len(cfg.stage.lora.target_modules)
    assert_all_nonzero(lora_b, "LoRA B of the language model")
    assert all(model.vlm.language_model.get_parameter(n).requires_grad for n in lora)

    frozen = {
        "SAM-2 image encoder": model.sam.image_encoder,
        "VLM vision tower": model.vlm.model.model.vision_tower,
        "VLM projector": model.vlm.model.model.multi_modal_projector,
    }
    for where, module in frozen.items():
        for name, parameter in module.named_parameters():
            assert not parameter.requires_grad, f"{where}: {name} trains"
            assert parameter.grad is None, f"{where}: {name} got a gradient"
    base_weights = [
        (n, p) for n, p in model.vlm.language_model.named_parameters() if "lora_" not in n and "layers" in n
    ]
    assert base_weights and not any(p.requires_grad or p.grad is not None for _, p in base_weights)


def test_stage_1_trains_only_decoupler_text_prompt_and_mask_decoder(make_model, build_stage) -> None:
    cfg, model = make_model("stage=text_pretrain")
    stage = build_stage(cfg, model)
    trained_prefixes = ("decoupler.", "text_prompt.", "sam.sam_mask_decoder.")
    trainable = {name for name, p in stage.model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(name.startswith(trained_prefixes) for name in trainable), sorted(trainable)
    unread = ("sam.sam_mask_decoder.iou_prediction_head.", "sam.sam_mask_decoder.pred_obj_score_head.")
    for prefix in ("text_prompt.", "sam.sam_mask_decoder.", "decoupler.to_text."):
        owned = {n for n, _ in model.named_parameters() if n.startswith(prefix) and not n.startswith(unread)}
        assert owned and owned <= trainable, prefix
    for prefix in (*unread, "decoupler.to_visual."):  # no stage-1 loss reads them: frozen
        owned = {n for n, _ in model.named_parameters() if n.startswith(prefix)}
        assert owned and not owned & trainable, prefix
    assert not any("lora_" in name for name, _ in model.named_parameters())  # no LoRA in stage 1
    optimised = {id(p) for group in stage.configure_optimizers().param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}


def test_no_decoupler_shares_one_embedding() -> None:
    decoupler = NoDecoupler(in_dim=16, out_dim=8)
    embeddings = decoupler(torch.randn(4, 16))
    assert embeddings.text is embeddings.visual
    assert embeddings.text.shape == (4, 8)
    assert not decoupler.has_penalty and decoupler.subspace_maps() is None


def test_linear_decoupler_splits_into_two_embeddings() -> None:
    torch.manual_seed(0)
    decoupler = LinearOrthoDecoupler(in_dim=16, out_dim=8)
    embeddings = decoupler(torch.randn(4, 16))
    assert embeddings.text.shape == embeddings.visual.shape == (4, 8)
    assert not torch.allclose(embeddings.text, embeddings.visual)
    assert decoupler.has_penalty and not LinearDecoupler.has_penalty
    penalty = decoupler.orthogonality_penalty(embeddings)
    assert penalty.ndim == 0 and 0 < penalty.item() <= 1
    penalty.backward()
    assert decoupler.to_text.weight.grad.abs().sum() > 0


def test_batch_input_norm_removes_the_state_every_expression_shares() -> None:
    torch.manual_seed(0)
    shared, own = 10 * torch.randn(1, 16), 0.01 * torch.randn(4, 16)  # near-identical [SEG] states
    decoupler = LinearDecoupler(in_dim=16, out_dim=8, input_norm="batch")
    normalised = decoupler.norm(shared + own)
    assert normalised.mean(0).abs().max() < 1e-3
    assert normalised.std(0).min() > 0.5  # the expressions' own parts now carry the signal


def test_batch_input_norm_takes_a_training_batch_of_one_with_its_running_statistics() -> None:
    decoupler = LinearDecoupler(in_dim=16, out_dim=8, input_norm="batch").train()
    decoupler(torch.randn(4, 16))  # updates the running statistics
    single = torch.randn(1, 16)
    expected = (single - decoupler.norm.running_mean) / (
        decoupler.norm.running_var + decoupler.norm.eps
    ).sqrt()
    assert torch.allclose(decoupler.norm(single), expected, atol=1e-5)


def test_orthogonality_penalty_is_zero_for_orthogonal_and_one_for_parallel_embeddings() -> None:
    decoupler = LinearOrthoDecoupler(in_dim=2, out_dim=2)
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    orthogonal = decoupler.orthogonality_penalty(SegEmbeddings(text=text, visual=text.flip(-1)))
    parallel = decoupler.orthogonality_penalty(SegEmbeddings(text=text, visual=-3 * text))
    assert orthogonal.item() == pytest.approx(0.0)
    assert parallel.item() == pytest.approx(1.0)


def fake_output(target: torch.Tensor, lm_loss: torch.Tensor | None = None) -> DeSa2VAOutput:
    torch.manual_seed(0)
    embeddings = NoDecoupler(4, 4)(torch.randn(target.shape[0], 4))
    return DeSa2VAOutput(
        text_logits=torch.randn(target.shape),
        visual_logits=torch.randn(target.shape),
        fused_logits=torch.randn(target.shape),
        embeddings=embeddings,
        gate=None,
        lm_loss=lm_loss,
        text_heatmap=None,
        image_embeddings=torch.zeros(target.shape[0] * target.shape[1], 4, 2, 2),
    )


def triple(**weights: float) -> TripleSupervisionLoss:
    defaults = {"w_f": 1.0, "w_t": 0.5, "w_v": 0.5, "w_orth": 0.1, "w_lm": 0.1}
    return TripleSupervisionLoss(mask=MaskLoss(w_bce=2.0, w_dice=0.5), **{**defaults, **weights})


def test_triple_loss_is_the_weighted_sum_of_its_terms() -> None:
    target = torch.rand(2, 2, 8, 8) > 0.5
    loss = triple()
    result: LossTerms = loss(fake_output(target, lm_loss=torch.tensor(3.0)), target, torch.tensor(0.4))
    assert set(result.terms) == {"fused", "text", "visual", "orth", "lm"}
    expected = sum(loss.weights[name] * value for name, value in result.terms.items())
    torch.testing.assert_close(result.total, expected)


@pytest.mark.parametrize(("weight", "term"), [("w_t", "text"), ("w_v", "visual"), ("w_f", "fused")])
def test_a_zero_weight_drops_its_mask_term(weight: str, term: str) -> None:
    target = torch.rand(2, 2, 8, 8) > 0.5
    output = fake_output(target, lm_loss=torch.tensor(1.0))
    result = triple(**{weight: 0.0})(output, target, torch.tensor(0.1))
    assert term not in result.terms
    assert len(result.terms) == 4


def test_aux_masks_at_the_decoders_resolution_are_scored_against_the_targets_cover_of_each_cell() -> None:
    target = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    target[:, :, :2, :3] = True
    cover = covered_share(target, torch.Size((4, 4)))
    assert cover[0, 0, 0].tolist() == [1.0, 0.5, 0.0, 0.0] and cover[0, 0, 1:].sum() == 0
    output = fake_output(target, lm_loss=torch.tensor(1.0))
    output.text_logits = torch.randn(2, 2, 4, 4)
    output.visual_logits = torch.randn(2, 2, 4, 4)
    loss = triple(aux_resolution="decoder")
    assert loss.required_masks().aux_resolution == "decoder"
    result = loss(output, target, torch.tensor(0.1))
    torch.testing.assert_close(result.terms["text"], loss.mask(output.text_logits, cover))
    torch.testing.assert_close(result.terms["fused"], loss.mask(output.fused_logits, target))
    with pytest.raises(ValueError, match="differ"):
        triple()(output, target, torch.tensor(0.1))  # at the image's resolution the shapes must match


def test_an_unknown_aux_resolution_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="loss.aux_resolution is 'pixel'"):
        triple(aux_resolution="pixel")


def test_zero_orth_and_lm_weights_need_neither_input() -> None:
    target = torch.rand(2, 2, 8, 8) > 0.5
    result = triple(w_orth=0.0, w_lm=0.0)(fake_output(target), target, None)
    assert set(result.terms) == {"fused", "text", "visual"}


def test_missing_inputs_for_weighted_terms_raise() -> None:
    target = torch.rand(2, 2, 8, 8) > 0.5
    with pytest.raises(ValueError, match="w_lm"):
        triple(w_orth=0.0)(fake_output(target), target, None)
    undecoded = fake_output(target, lm_loss=torch.tensor(1.0))
    undecoded.text_logits = None
    with pytest.raises(ValueError, match="text mask"):
        triple()(undecoded, target, None)


def test_w_orth_weighs_nothing_for_a_decoupler_without_a_penalty() -> None:
    target = torch.rand(2, 2, 8, 8) > 0.5
    result = triple(w_lm=0.0)(fake_output(target), target, None)
    assert set(result.terms) == {"fused", "text", "visual"}


def test_all_zero_weights_raise() -> None:
    target = torch.rand(2, 2, 8, 8) > 0.5
    zeros = {"w_f": 0.0, "w_t": 0.0, "w_v": 0.0, "w_orth": 0.0, "w_lm": 0.0}
    with pytest.raises(ValueError, match="0"):
        triple(**zeros)(fake_output(target), target, None)


def test_mask_loss_is_near_zero_for_perfect_logits_and_high_for_inverted() -> None:
    target = torch.zeros(2, 3, 16, 16, dtype=torch.bool)
    target[0, :, 2:9, 3:12] = True
    target[1, :, 10:, :5] = True
    perfect = torch.where(target, 20.0, -20.0)
    loss = MaskLoss(w_bce=2.0, w_dice=0.5)
    assert loss(perfect, target).item() < 1e-3
    assert loss(-perfect, target).item() > 1.0
    assert loss(torch.zeros_like(perfect), target) > loss(perfect, target)


def test_mask_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ"):
        MaskLoss(w_bce=1.0, w_dice=1.0)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 8, 8))


def test_uncertain_points_are_picked_where_the_logits_are_least_certain() -> None:
    torch.manual_seed(0)
    logits = torch.full((2, 1, 32, 32), 10.0)
    logits[..., :16] = 0.0  # the left half is undecided
    num_points, importance = 100, 0.75
    points = uncertain_points(logits, num_points, oversample_ratio=3, importance_sample_ratio=importance)
    assert points.shape == (2, num_points, 2) and ((points >= 0) & (points <= 1)).all()
    chosen = int(importance * num_points)
    assert (points[:, :chosen, 0] < 0.5).all()  # x in [0, 1]: every importance point on the undecided half
    assert 0 < (points[:, chosen:, 0] < 0.5).float().mean() < 1  # the rest spread uniformly


def test_uniformly_point_sampled_mask_loss_estimates_the_dense_loss() -> None:
    torch.manual_seed(0)
    target = torch.zeros(2, 2, 32, 32, dtype=torch.bool)
    target[..., 8:20, 4:24] = True
    logits = torch.nn.functional.interpolate(3 * torch.randn(4, 1, 4, 4), size=(32, 32), mode="bilinear")
    logits = logits.view(2, 2, 32, 32).requires_grad_()
    dense = MaskLoss(w_bce=2.0, w_dice=0.5)(logits, target)
    sampled = MaskLoss(w_bce=2.0, w_dice=0.5, num_points=8192, importance_sample_ratio=0.0)(logits, target)
    assert sampled.item() == pytest.approx(dense.item(), rel=0.05)
    sampled.backward()
    assert logits.grad.abs().sum() > 0


def test_point_sampling_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        MaskLoss(w_bce=1.0, w_dice=1.0, num_points=10, importance_sample_ratio=1.5)
