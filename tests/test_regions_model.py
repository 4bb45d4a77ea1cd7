"""training/regions.py: the Region Transformer sees only its box, one embedding per region."""
import sys

import pytest
import torch
from conftest import torchrun

from pipeline.core.config import ConfigError
from training.model import ModelConfig, build_model
from training.regions import MLCDRegionEncoder, RegionHead, RegionHeadConfig, box_mask

TINY = ["vit_tiny_clip", "vit_tiny_rope2d"]  # 48 px, patch 8: a 6 x 6 grid


def _model(name, layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = MLCDRegionEncoder(ModelConfig(name=name, **kw), RegionHeadConfig(layers=layers))
    with torch.no_grad():  # break the symmetry of the zero-bias init
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def _boxes():
    # image 0: region 0 = top-left 16x16 (patch cells rows 0-1, cols 0-1), region 1 = right half,
    # region 2 invalid (NaN box: must not leak). image 1: one tiny box, rest invalid.
    boxes = torch.tensor([[[0, 0, 16, 16], [24, 0, 48, 48], [float("nan")] * 4],
                          [[20, 20, 21, 21], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float32)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    return boxes, valid


def test_box_mask_cells():
    boxes, valid = _boxes()
    m = box_mask(boxes, valid, 6, 6, 8).reshape(2, 3, 6, 6)
    expect = torch.zeros(6, 6, dtype=torch.bool)
    expect[:2, :2] = True
    assert torch.equal(m[0, 0], expect)  # edge at 16 touches cell 2 with zero area: not included
    expect = torch.zeros(6, 6, dtype=torch.bool)
    expect[:, 3:] = True
    assert torch.equal(m[0, 1], expect)
    for b, r in ((0, 2), (1, 1), (1, 2)):  # invalid rows: the dummy patch 0 only
        assert m[b, r].sum() == 1 and m[b, r, 0, 0]
    assert m[1, 0].sum() == 1 and m[1, 0, 2, 2]  # 1 px box at (20, 20): its center's cell
    # a degenerate box (zero area) still sees its center cell; one out of the image, the edge cell
    odd = torch.tensor([[[30, 10, 30, 10], [100, 100, 120, 130]]], dtype=torch.float32)
    m2 = box_mask(odd, torch.ones(1, 2, dtype=torch.bool), 6, 6, 8).reshape(2, 6, 6)
    assert m2[0].sum() == 1 and m2[0, 1, 3]
    assert m2[1].sum() == 1 and m2[1, 5, 5]


def _head_inputs(m, x, boxes, valid):
    """What MLCDRegionEncoder.forward hands its region head."""
    out = m.vision_model(x)
    h = out.last_hidden_state
    return h[:, 0], h[:, 1:], box_mask(boxes, valid, 6, 6, 8), m.vision_model.rope(6, 6, x.device)


@pytest.mark.parametrize("name", TINY)
def test_region_sees_only_its_box(name):
    # The backbone mixes all patches, so "outside the box" is tested where the mask acts: on the
    # patch tokens the region head reads. With one head layer (the default) that is exact; with
    # more, patch tokens mix with each other between layers, as in the backbone.
    m = _model(name, layers=1)
    boxes, valid = _boxes()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        img, reg = m(x, boxes, valid)
        assert img.shape == (2, 32) and reg.shape == (6, 32)
        assert torch.isfinite(reg).all() and torch.isfinite(img).all()  # NaN box rows masked out
        cls, patches, mask, rope = _head_inputs(m, x, boxes, valid)
        reg = m.region_head(cls, patches, mask, rope)
        torch.testing.assert_close(reg.reshape(6, -1), m(x, boxes, valid)[1], atol=0, rtol=0)
        grid = torch.zeros(6, 6, dtype=torch.bool)
        grid[:2, :2] = True  # region 0 of image 0: cells rows 0-1, cols 0-1
        inside = grid.flatten()
        # perturb every patch token of image 0 outside region 0's box (region 1's cells included)
        p2 = patches.clone()
        p2[0, ~inside] += torch.randn_like(p2[0, ~inside])
        r2 = m.region_head(cls, p2, mask, rope)
        torch.testing.assert_close(r2[0, 0], reg[0, 0], atol=1e-6, rtol=0)
        assert (r2[0, 1] - reg[0, 1]).abs().max() > 1e-3  # region 1 sees them
        torch.testing.assert_close(r2[1], reg[1], atol=1e-6, rtol=0)  # other image untouched
        # one patch token inside the box changes region 0
        p3 = patches.clone()
        p3[0, 7] += torch.randn_like(p3[0, 7])  # cell (1, 1); not a constant: LayerNorm hides it
        r3 = m.region_head(cls, p3, mask, rope)
        assert (r3[0, 0] - reg[0, 0]).abs().max() > 1e-3
        # and through the whole model, pixels inside the box change the region's embedding
        z = x.clone()
        z[0, :, 4:12, 4:12] += torch.randn_like(z[0, :, 4:12, 4:12])
        _, r4 = m(z, boxes, valid)
        assert (r4.view(2, 3, -1)[0, 0] - reg[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", TINY)
def test_regions_independent_of_each_other(name):
    m = _model(name)
    boxes, valid = _boxes()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        _, a = m(x, boxes, valid)
        b2 = boxes.clone()
        b2[0, 1] = torch.tensor([8.0, 8.0, 40.0, 30.0])  # move region 1 (overlapping region 0 now)
        v2 = valid.clone()
        v2[1, 1] = True  # and turn a padding row of image 1 into a real region
        b2[1, 1] = torch.tensor([0.0, 0.0, 48.0, 48.0])
        _, b = m(x, b2, v2)
        a, b = a.view(2, 3, -1), b.view(2, 3, -1)
        torch.testing.assert_close(b[0, 0], a[0, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(b[1, 0], a[1, 0], atol=1e-6, rtol=0)
        assert (b[0, 1] - a[0, 1]).abs().max() > 1e-3
        # same box in another slot, different R: same embedding
        _, c = m(x, boxes[:, :1], valid[:, :1])
        torch.testing.assert_close(c.view(2, 1, -1)[:, 0], a[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_image_emb_equals_plain_encoder(name):
    m = _model(name)
    plain = build_model(ModelConfig(name=name)).eval()
    missing = plain.load_state_dict(
        {k: v for k, v in m.state_dict().items() if not k.startswith("region_head.")}, strict=True)
    assert not missing.missing_keys
    assert all(k.startswith(("vision_model.", "head.", "region_head.")) for k in m.state_dict())
    assert set(m.state_dict()) - set(plain.state_dict()) == {k for k in m.state_dict()
                                                             if k.startswith("region_head.")}
    boxes, valid = _boxes()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        img, _ = m(x, boxes, valid)
        torch.testing.assert_close(img, plain(x), atol=0, rtol=0)


def test_same_seed_backbone_init_unchanged():
    # the region head is built after the backbone: a seeded fresh model's backbone is the plain one
    torch.manual_seed(3)
    m = MLCDRegionEncoder(ModelConfig(name="vit_tiny_rope2d"))
    torch.manual_seed(3)
    plain = build_model(ModelConfig(name="vit_tiny_rope2d"))
    for k, v in plain.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("ckpt", [False, True])
def test_gradients_flow(name, ckpt):
    m = _model(name, grad_checkpointing=ckpt).train()
    assert m.region_head.grad_checkpointing is ckpt
    boxes, valid = _boxes()
    x = torch.randn(2, 3, 48, 48)
    img, reg = m(x, boxes, valid)
    (reg.view(2, 3, -1)[valid].pow(2).sum() + 0 * img.sum()).backward()
    for k, p in m.named_parameters():
        if k.startswith("head."):  # only the image embedding uses the image head
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    g = dict(m.named_parameters())
    assert g["region_head.region_embedding"].grad.abs().sum() > 0
    assert g["vision_model.embeddings.patch_embedding.weight"].grad.abs().sum() > 0
    if m.config.rope2d:  # region tokens use the class token's angles
        assert g["vision_model.class_pos_emb"].grad.abs().sum() > 0


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_same_gradients(name):
    grads = []
    boxes, valid = _boxes()
    x = torch.randn(2, 3, 48, 48)
    for ckpt in (False, True):
        m = _model(name).train()
        m.set_grad_checkpointing(ckpt)
        img, reg = m(x, boxes, valid)
        (reg.view(2, 3, -1)[valid].sum() + img.sum()).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_bf16(name):
    m = _model(name)
    boxes, valid = _boxes()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        _, r32 = m(x, boxes, valid)
        img, r16 = m.to(torch.bfloat16)(x, boxes, valid)  # fp32 pixels, as the loader gives them
    assert img.dtype == r16.dtype == torch.bfloat16 and r32.dtype == torch.float32
    assert torch.isfinite(r16).all()
    cos = torch.nn.functional.cosine_similarity(r16.float(), r32, dim=-1)
    assert cos[valid.flatten()].min() > 0.99, cos


def test_config_validation():
    with pytest.raises(ConfigError, match="layers"):
        RegionHeadConfig(layers=0)
    with pytest.raises(ConfigError, match="heads"):
        RegionHead(64, 5, 128, 1, 32)
    m = _model("vit_tiny_clip")
    with pytest.raises(ConfigError, match="boxes"):
        m(torch.randn(2, 3, 48, 48), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="valid"):
        m(torch.randn(2, 3, 48, 48), torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))


def check_zero3_step(ctx) -> None:
    """2 ranks x 2 images through DeepSpeed ZeRO-3 (+ activation checkpointing) == one plain SGD
    step on the 4 images: the region head's parameters and the class token's RoPE angles (read
    again outside vision_model's forward) get their exact gradients, set up as the trainer does."""
    import deepspeed

    from training.trainer import zero3_register_direct_params
    name = "vit_tiny_rope2d"

    def build():
        torch.manual_seed(0)
        return MLCDRegionEncoder(ModelConfig(name=name, grad_checkpointing=True), RegionHeadConfig(layers=2))

    torch.manual_seed(1)
    x = torch.randn(4, 3, 48, 48)
    boxes = torch.tensor([[[0, 0, 16, 16], [8, 8, 40, 40]]] * 4, dtype=torch.float32)
    valid = torch.tensor([[True, True], [True, False], [False, False], [True, True]])

    def loss_of(model, i):
        img, reg = model(x[i], boxes[i], valid[i])
        return reg.view(len(i), 2, -1)[valid[i]].pow(2).mean() + img.pow(2).mean()

    ref = build()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for i in (torch.arange(0, 2), torch.arange(2, 4)):  # ZeRO averages the ranks' gradients
        (loss_of(ref, i) / 2).backward()
    opt.step()
    model = build()
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
           "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                   config=cfg, dist_init_required=False)
    zero3_register_direct_params(eng.module)
    eng.backward(loss_of(eng, torch.arange(2 * ctx.rank, 2 * ctx.rank + 2)))
    eng.step()
    want = dict(ref.named_parameters())
    for n, p in eng.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            torch.testing.assert_close(p.detach(), want[n].detach(), rtol=1e-4, atol=1e-6, msg=n)
    start = dict(build().named_parameters())
    for n in ("vision_model.class_pos_emb", "region_head.region_embedding", "region_head.layers.1.mlp.fc2.weight"):
        assert (want[n] - start[n]).abs().max() > 1e-4, n  # the step moved them


@pytest.mark.slow
def test_zero3_step_exact():
    p = torchrun(["tests/test_regions_model.py"], 2, timeout=240)
    assert all(f"REGIONS_ZERO3_OK {r}" in p.stdout for r in range(2)), p.stdout[-2000:]


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from pipeline.core.dist import init_distributed
    check_zero3_step(init_distributed())
    print(f"REGIONS_ZERO3_OK {__import__('os').environ['RANK']}", flush=True)
