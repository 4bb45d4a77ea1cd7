"""RICE's Region Transformer: one embedding per region of an image, in one forward pass.

RICE (Region-based Cluster Discrimination, arXiv 2507.20025) puts a few transformer layers on top
of the ViT. For each image the sequence is [R region tokens | N patch tokens]: region token r
starts as the backbone's final class token plus a learned region embedding and attends only to
itself and to the patch tokens whose patch cell overlaps its box; patch tokens attend to patch
tokens only. So a region's output depends on its own box and the image, never on the other
regions of the image, and all regions of all images go through one batched SDPA call per layer
(a boolean mask, (B, 1, R+N, R+N): ~2.6 MB per image at L/14-560 with R=10). Blocks are the
backbone's own pre-norm EncoderLayer (training/model.py) with its optional attention mask; on
2D-RoPE models the region tokens take the class token's angles, patch tokens their own.

Cost: with one head layer the patch tokens' update is computed and thrown away (their outputs feed
no region); it is one more block over N+R tokens, ~1/L of the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.core.config import check
from training.model import ACTS, EncoderLayer, MLCDEncoder, ModelConfig, init_block


@dataclass
class RegionHeadConfig:
    """The head's own settings; its width/heads/MLP/activation are the backbone's. R (regions per
    image) is the data's business: any R works, fixed per batch."""
    layers: int = 1  # Region Transformer layers

    def __post_init__(self):
        check(isinstance(self.layers, int) and self.layers >= 1, "layers", self.layers, "must be an int >= 1")


@dataclass(frozen=True)
class _BlockShape:  # what EncoderLayer reads from a ModelConfig
    width: int
    heads: int
    mlp_dim: int
    act: str
    layer_norm_eps: float


def box_mask(boxes: torch.Tensor, valid: torch.Tensor, grid_h: int, grid_w: int, patch: int) -> torch.Tensor:
    """boxes (B, R, 4) [x0, y0, x1, y1] in input pixels, valid (B, R) bool -> (B, R, grid_h*grid_w)
    bool, row-major patch order (the patch conv's flatten): True where the patch cell overlaps the
    box with positive area. On each axis the cell holding the box center (clamped into the grid)
    is always included, so a box thinner than a patch, or outside the image, still sees one cell.
    Invalid rows see patch 0 only, so SDPA never gets an all-masked row."""
    v = valid.bool()
    b = torch.where(v[..., None], boxes.float(), torch.zeros((), device=boxes.device)) / patch
    x0, y0, x1, y1 = b.unbind(-1)
    cols = torch.arange(grid_w, device=boxes.device, dtype=torch.float32)
    rows = torch.arange(grid_h, device=boxes.device, dtype=torch.float32)
    in_x = (x0[..., None] < cols + 1) & (x1[..., None] > cols)  # (B, R, gw)
    in_y = (y0[..., None] < rows + 1) & (y1[..., None] > rows)  # (B, R, gh)
    cx = ((x0 + x1) / 2).floor().clamp(0, grid_w - 1).long()
    cy = ((y0 + y1) / 2).floor().clamp(0, grid_h - 1).long()
    in_x = in_x | F.one_hot(cx, grid_w).bool()
    in_y = in_y | F.one_hot(cy, grid_h).bool()
    m = (in_y[..., :, None] & in_x[..., None, :]).flatten(-2)  # (B, R, gh*gw)
    dummy = torch.zeros_like(m)
    dummy[..., 0] = True
    return torch.where(v[..., None], m, dummy)


def region_attn_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, R, N) box mask -> (B, 1, R+N, R+N) SDPA mask (True = may attend): region r sees itself
    and its patches, patches see all patches and no region."""
    B, R, N = mask.shape
    full = torch.zeros(B, R + N, R + N, dtype=torch.bool, device=mask.device)
    full[:, :R, :R] = torch.eye(R, dtype=torch.bool, device=mask.device)
    full[:, :R, R:] = mask
    full[:, R:, R:] = True
    return full[:, None]


class RegionHead(nn.Module):
    """Region Transformer layers + LayerNorm + bias-free projection to the embedding dim.
    State-dict keys: region_embedding, layers.{i}.* (EncoderLayer's), norm.*, proj.weight."""

    def __init__(self, width: int, heads: int, mlp_dim: int, layers: int, embed_dim: int,
                 act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        for name, val in (("width", width), ("heads", heads), ("mlp_dim", mlp_dim), ("layers", layers)):
            check(val >= 1, name, val, "must be >= 1")
        check(width % heads == 0, "heads", heads, f"must divide width={width}")
        check(embed_dim >= 0, "embed_dim", embed_dim, "must be >= 0 (0 = no projection)")
        check(act in ACTS, "act", act, f"must be one of {ACTS}")
        self.spec = {"width": width, "heads": heads, "mlp_dim": mlp_dim, "layers": layers,
                     "embed_dim": embed_dim, "act": act, "eps": eps}  # region_head.json
        shape = _BlockShape(width, heads, mlp_dim, act, eps)
        self.grad_checkpointing = False
        self.region_embedding = nn.Parameter(torch.empty(width))
        self.layers = nn.ModuleList([EncoderLayer(shape) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, embed_dim, bias=False) if embed_dim else nn.Identity()
        self.out_dim = embed_dim or width
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The backbone's init (class-embedding-like region embedding, HF block init, head-like
        projection), so a fresh head starts at the backbone's scale."""
        w = self.spec["width"]
        nn.init.normal_(self.region_embedding, std=w ** -0.5)
        for layer in self.layers:
            init_block(layer, w, len(self.layers))
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=w ** -0.5)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """cls (B, C) the backbone's final class token, patches (B, N, C) its final patch tokens,
        mask (B, R, N) from box_mask, rope the backbone's (cos, sin) of (1 + N, head_dim) or None
        -> (B, R, out_dim)."""
        B, R, N = mask.shape
        C = patches.shape[-1]
        regions = (cls[:, None, :] + self.region_embedding.to(cls.dtype)).expand(B, R, C)
        x = torch.cat([regions, patches], dim=1)
        attn = region_attn_mask(mask)
        cos = sin = None
        if rope is not None:  # region tokens take the class token's angles (row 0)
            cos, sin = (torch.cat([t[:1].expand(R, -1), t[1:]], dim=0) for t in rope)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                x = checkpoint(layer, x, cos, sin, attn, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn)
        return self.proj(self.norm(x[:, :R]))


class MLCDRegionEncoder(MLCDEncoder):
    """MLCDEncoder (backbone `vision_model.*` and `head.*` unchanged: export and init_from see the
    same keys) plus `region_head.*`. forward(pixel_values (B, 3, H, W), boxes (B, R, 4) in input
    pixels, valid (B, R) bool) -> (image_emb (B, D), region_emb (B*R, D)), plain tensors (ZeRO-3
    hooks only see tensors). Invalid rows get a finite, meaningless embedding: mask them in the
    loss."""
    output_names = ("image", "region")  # what the loss heads read (training/heads.py model_outputs)

    def __init__(self, cfg: ModelConfig, region: RegionHeadConfig | None = None):
        super().__init__(cfg)
        c = self.config
        self.region_config = region or RegionHeadConfig()
        self.region_head = RegionHead(c.width, c.heads, c.mlp_dim, self.region_config.layers,
                                      c.embed_dim, c.act, c.layer_norm_eps)
        self.region_head.grad_checkpointing = c.grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.region_head.grad_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor, boxes: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check(boxes.ndim == 3 and boxes.shape[-1] == 4 and boxes.shape[0] == pixel_values.shape[0],
              "boxes", tuple(boxes.shape), f"must be (B={pixel_values.shape[0]}, R, 4)")
        check(tuple(valid.shape) == tuple(boxes.shape[:2]), "valid", tuple(valid.shape),
              f"must be {tuple(boxes.shape[:2])}")
        out = self.vision_model(pixel_values)
        image_emb = self.head(out.pooler_output)
        region = region_embeddings(self.vision_model, self.region_head, out.last_hidden_state, pixel_values,
                                   boxes, valid, self.config.patch_size)
        return image_emb, region.reshape(-1, region.shape[-1])


def region_embeddings(vision_model, head: RegionHead, hidden: torch.Tensor, pixel_values: torch.Tensor,
                      boxes: torch.Tensor, valid: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, R, out_dim) region embeddings from the backbone's last_hidden_state ``hidden`` (class
    token first): what training's region loss reads, and what eval-regions probes."""
    gh, gw = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    mask = box_mask(boxes, valid, gh, gw, patch)
    # class_pos_emb is read again here, outside vision_model's forward; under ZeRO-3 the
    # trainer registers it on the root (zero3_register_direct_params; tested exact).
    return head(hidden[:, 0], hidden[:, 1:], mask, vision_model.rope(gh, gw, hidden.device))
