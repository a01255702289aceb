"""The optimised MoMKE forward equals the literal SPEC computation, and masks hide what they must."""
from __future__ import annotations

import pytest
import torch

from dataloader.batch import TokenLayout
from MoMKE.model import MODALITIES, ModelConfig, MoMKE
from MoMKE.reference import reference_forward

B, L = 5, 7
DIMS = (5, 6, 7)


def _inputs(seed: int, missing: float = 0.4):
    generator = torch.Generator().manual_seed(seed)
    features = {m: torch.randn(B, L, d, generator=generator) for m, d in zip(MODALITIES, DIMS)}
    lengths = torch.tensor([7, 3, 5, 1, 6])
    padding = torch.arange(L)[None, :] >= lengths[:, None]
    available = torch.rand(B, L, 3, generator=generator) >= missing
    available[..., 1] |= ~available.any(dim=-1)  # at least one modality per utterance
    available[3, :, 0] = False  # a conversation where audio is missing throughout
    return features, available, padding


def _model(**overrides) -> MoMKE:
    torch.manual_seed(0)
    config = dict(input_dims=DIMS, num_outputs=3, hidden=8, depth=2, num_heads=2, drop_rate=0.0)
    return MoMKE(ModelConfig(**{**config, **overrides}))


def _packed_reference(reference, layout, stage):
    if stage == 1:
        return {m: reference[m].reshape(B * L, -1)[layout.observed[m]] for m in MODALITIES}
    return reference["fused"].reshape(B * L, -1)[layout.valid]


@pytest.mark.parametrize("variant", [{}, {"router": "uniform"}, {"experts": "self"}])
@pytest.mark.parametrize("stage", [1, 2])
def test_packed_forward_equals_reference(stage, variant):
    model = _model(**variant).eval()
    features, available, padding = _inputs(1)
    layout = TokenLayout.from_masks(available, padding)
    output = model(features, layout, stage)
    expected = _packed_reference(reference_forward(model, features, available, padding, stage),
                                 layout, stage)
    if stage == 1:
        for m in MODALITIES:
            torch.testing.assert_close(output.unimodal[m], expected[m], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(output.fused, expected, atol=1e-5, rtol=1e-5)


def test_stage1_experts_with_unequal_token_counts_equal_reference():
    """Stage 1 stacks experts whose modalities have different token counts: the shorter ones get
    filler tokens in spare grid rows (here more than one row of them), which must change nothing."""
    model = _model().eval()
    features, available, padding = _inputs(3)
    available[..., 2] = False
    available[0, 0, 2] = True  # visual observed once in the whole batch
    layout = TokenLayout.from_masks(available, padding)
    assert max(layout.count(m) for m in MODALITIES) - layout.count("v") > L
    output = model(features, layout, 1)
    expected = _packed_reference(reference_forward(model, features, available, padding, 1),
                                 layout, 1)
    for m in MODALITIES:
        torch.testing.assert_close(output.unimodal[m], expected[m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_packed_gradients_equal_reference(stage):
    model = _model()  # training mode, no dropout: both paths are deterministic
    features, available, padding = _inputs(2)
    layout = TokenLayout.from_masks(available, padding)
    output = model(features, layout, stage)
    packed = sum(o.square().sum() for o in output.unimodal.values()) if stage == 1 \
        else output.fused.square().sum()
    packed.backward()
    fast = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    reference = reference_forward(model, features, available, padding, stage)
    literal = sum(reference[m].square().sum() for m in MODALITIES) if stage == 1 \
        else reference["fused"].square().sum()
    literal.backward()
    slow = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-4, rtol=1e-4, msg=name)


def test_missing_and_padded_features_do_not_change_predictions():
    model = _model().eval()
    features, available, padding = _inputs(3)
    layout = TokenLayout.from_masks(available, padding)
    before = model(features, layout, 2).fused
    changed = {m: x.clone() for m, x in features.items()}
    for i, m in enumerate(MODALITIES):
        hidden = ~available[..., i] | padding  # what the model must not see
        changed[m][hidden] = torch.randn(int(hidden.sum()), changed[m].shape[-1]) * 100
    after = model(changed, layout, 2).fused
    torch.testing.assert_close(before, after)


def test_a_missing_modality_does_not_change_another_modalitys_expert_output():
    model = _model().eval()
    features, available, padding = _inputs(4, missing=0.0)
    full = model(features, TokenLayout.from_masks(available, padding), 1).unimodal["t"]
    without_audio = available.clone()
    without_audio[..., 0] = False
    partial = model(features, TokenLayout.from_masks(without_audio, padding), 1).unimodal["t"]
    torch.testing.assert_close(full, partial)


def test_router_forced_to_own_expert_equals_self_only_experts():
    model = _model().eval()
    features, available, padding = _inputs(5)
    layout = TokenLayout.from_masks(available, padding)
    for e, m in enumerate(MODALITIES):
        router = model.routers[m]
        with torch.no_grad():
            router.fc2.weight.zero_()
            router.fc2.bias.copy_(torch.tensor([-1e4, -1e4, -1e4]).index_fill(0, torch.tensor(e),
                                                                              1e4))
    forced = model(features, layout, 2)
    for e, m in enumerate(MODALITIES):
        assert torch.all(forced.router_weights[m][:, e] == 1.0)
    self_only = _model(experts="self").eval()
    self_only.load_state_dict(model.state_dict())
    torch.testing.assert_close(forced.fused, self_only(features, layout, 2).fused)


def test_router_forced_to_another_expert_uses_that_experts_output():
    model = _model().eval()
    features, available, padding = _inputs(6)
    layout = TokenLayout.from_masks(available, padding)
    with torch.no_grad():
        for m in MODALITIES:  # every modality routed to the visual expert
            model.routers[m].fc2.weight.zero_()
            model.routers[m].fc2.bias.copy_(torch.tensor([-1e4, -1e4, 1e4]))
    got = model(features, layout, 2).fused
    from MoMKE.reference import _expert  # the literal expert of SPEC §4.2
    observed = available & ~padding[..., None]
    mixed = []
    for i, m in enumerate(MODALITIES):
        h = model.projections[m](features[m] * observed[..., i, None])
        mixed.append(_expert(model, 2, h, observed[..., i]) * observed[..., i, None])
    fused = torch.cat(mixed, dim=-1)
    want = model.head(fused + torch.relu(model.fusion(fused)))
    torch.testing.assert_close(got, want.reshape(B * L, -1)[layout.valid], atol=1e-5, rtol=1e-5)


def test_reference_zeroes_queries_without_valid_keys():
    model = _model().eval()
    features, available, padding = _inputs(7)
    reference = reference_forward(model, features, available, padding, 1)
    assert torch.all(reference["a"][3] == 0)  # conversation 3 has no audio at all
    assert torch.isfinite(reference["a"]).all()
