"""The packed MoMKE forward equals the method computed literally, and masks hide what they must.

`_literal` below is the yardstick: docs/method.md computed on the padded (B, L) grid, one expert
and one modality at a time, written from the model's parameters with explicit matmuls and softmax.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from MoMKE.layout import LONG_ROW, PackedRows, TokenLayout
from MoMKE.model import MODALITIES, Attention, BitDropout, ModelConfig, MoMKE

B, L = 5, 7
DIMS = (5, 6, 7)
VARIANTS = [{}, {"router": "uniform"}, {"experts": "self"}]


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


@pytest.fixture(params=["in rows", "per conversation"])
def attention_path(request, monkeypatch) -> str:
    """Both ways attention is computed: these rows are short, so the per-conversation path (for
    long rows) is taken by lowering its threshold."""
    if request.param == "per conversation":
        monkeypatch.setattr("MoMKE.layout.LONG_ROW", 0)
    return request.param


# ----------------------------------------------------------------------------- the literal method

def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _literal_layer(layer, x: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """One expert layer over padded x (B, L, D) whose valid keys are `keys` (B, L)."""
    batch, length, hidden = x.shape
    head_dim = hidden // heads
    w, b = layer.attention.qkv.weight, layer.attention.qkv.bias
    q, k, v = (x @ w[j * hidden:(j + 1) * hidden].T + b[j * hidden:(j + 1) * hidden]
               for j in range(3))  # separate q, k, v projections
    split = lambda t: t.view(batch, length, heads, head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)  # (B, H, L, hd)
    logits = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
    valid = keys[:, None, None, :]
    attention = logits.masked_fill(~valid, torch.finfo(logits.dtype).min).softmax(dim=-1)
    attention = attention * valid.any(dim=-1, keepdim=True)  # no valid key: zeros
    z = (attention @ v).transpose(1, 2).reshape(batch, length, hidden)
    return z + _linear(layer.fc2, F.gelu(_linear(layer.fc1, z)))


def _literal_expert(model: MoMKE, e: str, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    for layer in model.experts[e].layers:
        x = x + _literal_layer(layer, x, keys, model.config.num_heads)
    return x


def _literal(model: MoMKE, features, available, padding, stage: int) -> dict[str, torch.Tensor]:
    """Padded (B, L, C) predictions: stage 1 {m}, stage 2 {"fused"} and {"router_<m>"}."""
    observed = available & ~padding[..., None]  # (B, L, M)
    h = {m: _linear(model.projections[m], features[m] * observed[..., i, None])
         for i, m in enumerate(MODALITIES)}  # missing inputs are zeros
    if stage == 1:
        return {m: _linear(model.unimodal_heads[m],
                           _literal_expert(model, m, h[m], observed[..., i]))
                for i, m in enumerate(MODALITIES)}
    out, mixed = {}, []
    for i, m in enumerate(MODALITIES):
        if model.config.experts == "self":
            z = _literal_expert(model, m, h[m], observed[..., i])
            weights = F.one_hot(torch.tensor(i), 3).float().expand(B, L, 3)
        else:
            per_expert = torch.stack([_literal_expert(model, e, h[m], observed[..., i])
                                      for e in MODALITIES], dim=2)  # (B, L, E, D)
            router = model.routers[m]
            weights = torch.full((B, L, 3), 1 / 3) if model.config.router == "uniform" else \
                _linear(router.fc2, F.gelu(_linear(router.fc1, h[m]))).softmax(dim=-1)
            z = (weights[..., None] * per_expert).sum(dim=2)
        mixed.append(z * observed[..., i, None])  # zero where m is missing or padded
        out[f"router_{m}"] = weights
    z = torch.cat(mixed, dim=-1)  # (B, L, 3D)
    out["fused"] = _linear(model.head, z + torch.relu(_linear(model.fusion.linear, z)))
    return out


def _compare(output, literal, available, padding, stage, **tolerance) -> None:
    """The packed outputs against the literal ones at the tokens they predict."""
    observed = available & ~padding[..., None]
    if stage == 1:
        for i, m in enumerate(MODALITIES):
            torch.testing.assert_close(output.unimodal[m], literal[m][observed[..., i]],
                                       **tolerance)
        return
    torch.testing.assert_close(output.fused, literal["fused"][~padding], **tolerance)
    for i, m in enumerate(MODALITIES):
        torch.testing.assert_close(output.router_weights[m],
                                   literal[f"router_{m}"][observed[..., i]], **tolerance)


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stage", [1, 2])
def test_forward_equals_the_literal_computation(stage, variant, attention_path):
    model = _model(**variant).eval()
    features, available, padding = _inputs(1)
    output = model(features, TokenLayout.from_masks(available, padding), stage)
    _compare(output, _literal(model, features, available, padding, stage), available, padding,
             stage, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_shared_and_own_rows_give_the_same_outputs_and_gradients(stage, attention_path):
    """The CPU's packing (conversations share rows) and the GPU's (one padded row each)."""
    features, available, padding = _inputs(7)
    results = []
    for packing in ("shared", "own"):
        model = _model()  # training mode, no dropout: deterministic
        layout = TokenLayout.from_masks(available, padding, packing)
        output = model(features, layout, stage)
        predictions = torch.cat(list(output.unimodal.values())) if stage == 1 else output.fused
        predictions.square().sum().backward()
        results.append((predictions.detach(), layout.row_counts,
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (shared, shared_rows, shared_grads), (own, own_rows, own_grads) = results
    assert sum(shared_rows.values()) < sum(own_rows.values())  # sharing saves rows here
    torch.testing.assert_close(own, shared, atol=1e-6, rtol=1e-5)
    assert shared_grads.keys() == own_grads.keys()
    for name in shared_grads:
        torch.testing.assert_close(own_grads[name], shared_grads[name], atol=1e-6, rtol=1e-5,
                                   msg=name)


def test_a_layout_is_planned_from_host_masks_only():
    features, available, padding = _inputs(1)
    with pytest.raises(ValueError, match="host masks"):
        TokenLayout.from_masks(available.to("meta"), padding)


@pytest.mark.parametrize("stage", [1, 2])
def test_modalities_with_very_unequal_token_counts_equal_the_literal_computation(stage,
                                                                               attention_path):
    model = _model().eval()
    features, available, padding = _inputs(3)
    available[..., 2] = False
    available[0, 0, 2] = True  # visual observed once in the whole batch
    output = model(features, TokenLayout.from_masks(available, padding), stage)
    _compare(output, _literal(model, features, available, padding, stage), available, padding,
             stage, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_equal_the_literal_computation(stage, variant, attention_path):
    model = _model(**variant)  # training mode, no dropout: both paths are deterministic
    features, available, padding = _inputs(2)
    observed = available & ~padding[..., None]
    output = model(features, TokenLayout.from_masks(available, padding), stage)
    packed = sum(o.square().sum() for o in output.unimodal.values()) if stage == 1 \
        else output.fused.square().sum()
    packed.backward()
    fast = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    literal = _literal(model, features, available, padding, stage)
    loss = sum(literal[m][observed[..., i]].square().sum() for i, m in enumerate(MODALITIES)) \
        if stage == 1 else literal["fused"][~padding].square().sum()
    loss.backward()
    slow = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-4, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- masks

def test_missing_and_padded_features_do_not_change_predictions():
    model = _model().eval()
    features, available, padding = _inputs(3)
    before = model(features, TokenLayout.from_masks(available, padding), 2).fused
    changed = {m: x.clone() for m, x in features.items()}
    for i, m in enumerate(MODALITIES):
        hidden = ~available[..., i] | padding  # what the model must not see
        changed[m][hidden] = torch.randn(int(hidden.sum()), changed[m].shape[-1]) * 100
    torch.testing.assert_close(before, model(changed, TokenLayout.from_masks(available, padding), 2).fused)


def test_a_missing_modality_does_not_change_another_modalitys_expert_output():
    model = _model().eval()
    features, available, padding = _inputs(4, missing=0.0)
    full = model(features, TokenLayout.from_masks(available, padding), 1).unimodal["t"]
    without_audio = available.clone()
    without_audio[..., 0] = False
    torch.testing.assert_close(full, model(features, TokenLayout.from_masks(without_audio, padding), 1).unimodal["t"])


def test_attention_gives_zeros_to_queries_without_valid_keys():
    attention = Attention(ModelConfig(input_dims=DIMS, num_outputs=1, hidden=8, num_heads=2))
    x = torch.randn(8, 8, requires_grad=True)  # two rows of four tokens
    attend = torch.ones(2, 4, 4, dtype=torch.bool)
    attend[1, 2] = False  # query 2 of row 1 (token 6) may attend to no key
    z = attention(x, PackedRows(torch.arange(8), attend))
    assert torch.all(z[6] == 0) and torch.isfinite(z).all() and torch.all(z[5] != 0)
    z.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("attention_path", ["in rows", "per conversation"], indirect=True)
def test_only_rows_attended_in_place_have_a_square_mask(attention_path):
    features, available, padding = _inputs(1)
    layout = TokenLayout.from_masks(available, padding)
    rows = layout.packed_rows(list(MODALITIES))
    assert rows.per_conversation == (attention_path == "per conversation")
    assert all((mask is None) == rows.per_conversation for mask in layout.attend.values())
    assert sum(rows.segments) == len(rows.slots) and 0 not in rows.segments


def test_a_long_conversations_layout_grows_linearly():
    length = LONG_ROW + 1
    padding = torch.zeros(2, length, dtype=torch.bool)
    padding[1, 10:] = True  # with a short conversation beside it
    layout = TokenLayout.from_masks(torch.ones(2, length, 3, dtype=torch.bool), padding, "own")
    rows = layout.packed_rows(list(MODALITIES))
    assert rows.per_conversation and rows.segments == (length, 10) * 3
    kept = [t for d in (layout.observed, layout.slots, layout.valid_position) for t in d.values()]
    assert max(t.numel() for t in kept) <= length + 10


@pytest.mark.parametrize("attention_path", ["in rows", "per conversation"], indirect=True)
def test_attention_dropout_drops_and_keeps_the_mean(attention_path):
    torch.manual_seed(0)
    attention = Attention(ModelConfig(input_dims=DIMS, num_outputs=1, hidden=8, num_heads=2,
                                      attn_drop_rate=0.5))
    x = torch.randn(6, 8, requires_grad=True)  # one conversation of six tokens in one row
    rows = TokenLayout.from_masks(torch.ones(1, 6, 3, dtype=torch.bool),
                                  torch.zeros(1, 6, dtype=torch.bool)).packed_rows(["a"])
    expected = attention.eval()(x, rows)
    attention.train()
    draws = torch.stack([attention(x, rows) for _ in range(2000)])
    assert not torch.allclose(draws[0], expected) and not torch.allclose(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(dim=0), expected, atol=0.1, rtol=0.1)
    draws.sum().backward()
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- routers

def _force_routers(model: MoMKE, expert: dict[str, int]) -> None:
    with torch.no_grad():
        for m, e in expert.items():
            model.routers[m].fc2.weight.zero_()
            model.routers[m].fc2.bias.copy_(torch.full((3,), -1e4).index_fill(0, torch.tensor(e),
                                                                               1e4))


def test_router_forced_to_own_expert_equals_self_only_experts():
    model = _model().eval()
    features, available, padding = _inputs(5)
    _force_routers(model, {m: e for e, m in enumerate(MODALITIES)})
    forced = model(features, TokenLayout.from_masks(available, padding), 2)
    for e, m in enumerate(MODALITIES):
        assert torch.all(forced.router_weights[m][:, e] == 1.0)
    self_only = _model(experts="self").eval()
    self_only.load_state_dict(model.state_dict())
    torch.testing.assert_close(forced.fused, self_only(features, TokenLayout.from_masks(available, padding), 2).fused)


def test_router_forced_to_another_expert_uses_that_experts_output():
    model = _model().eval()
    features, available, padding = _inputs(6)
    _force_routers(model, {m: 2 for m in MODALITIES})  # every modality to the visual expert
    got = model(features, TokenLayout.from_masks(available, padding), 2).fused
    observed = available & ~padding[..., None]
    mixed = []
    for i, m in enumerate(MODALITIES):
        h = _linear(model.projections[m], features[m] * observed[..., i, None])
        mixed.append(_literal_expert(model, "v", h, observed[..., i]) * observed[..., i, None])
    z = torch.cat(mixed, dim=-1)
    want = _linear(model.head, z + torch.relu(_linear(model.fusion.linear, z)))
    torch.testing.assert_close(got, want[~padding], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- parts

def test_checkpoint_keys_read_like_the_modules():
    keys = set(_model().state_dict())
    assert {"projections.a.weight", "experts.a.layers.0.attention.qkv.weight",
            "experts.v.layers.1.fc2.bias", "routers.t.fc2.weight", "fusion.linear.weight",
            "unimodal_heads.a.weight", "head.bias"} <= keys
    assert not any(k.startswith("experts.experts.") for k in keys)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_bit_dropout_keeps_one_minus_p_and_scales_like_nn_dropout(p):
    torch.manual_seed(0)
    drop = BitDropout(p)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 3e-3  # 1e6 draws: sd 5e-4
    both = (kept[:, :-1] & kept[:, 1:]).float().mean().item()  # neighbours share a byte
    assert abs(both - (1 - p) ** 2) < 3e-3
    assert torch.all(y[kept] == 1 / (1 - p))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the same mask and scale for the gradient
    drop.eval()
    assert torch.equal(drop(x), x)


def test_features_read_through_a_function_of_positions_equal_padded_features():
    """`Batch.packed_features` hands the model functions that read only the real tokens."""
    model = _model().eval()
    features, available, padding = _inputs(8)
    rows = {m: (lambda index, x=x: x.reshape(-1, x.shape[-1])[index]) for m, x in features.items()}
    torch.testing.assert_close(model(rows, TokenLayout.from_masks(available, padding), 2).fused,
                               model(features, TokenLayout.from_masks(available, padding), 2).fused)
