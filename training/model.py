"""The MLCD ViT family, with HF transformers parameter names from day one.

Two architectures, one module tree (`vision_model.*` matches HF key for key):
- CLIP-style (MLCD B/32-224, L/14-336 as released: HF `CLIPVisionModel`): class token + learned
  absolute position embedding (`embeddings.position_embedding`), quick_gelu MLP.
- 2D-RoPE (MLCD bigG/14, RICE L/14: HF `MLCDVisionModel`): no absolute position embedding; q and k
  are rotated by head_dim/4 row + head_dim/4 column frequencies (duplicated to head_dim,
  rotate_half, in fp32); the class token gets learned angles `class_pos_emb`; exact GELU.
Both: patch conv without bias, pre-LN (`pre_layrnorm`, sic) after prepending the class token,
pre-norm blocks, `pooler_output` = post_layernorm(class token), last_hidden_state unnormalized.

Attention is `F.scaled_dot_product_attention` (flash/mem-efficient kernels on GPU). Any input size
that is a multiple of the patch works: RoPE natively (grid (H/p, W/p) as HF does), absolute
embeddings by bicubic interpolation exactly like HF's `interpolate_pos_encoding`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.core.config import check

_FIELDS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "rope2d", "act",
           "embed_dim")
_TABLE = {  # embed_dim: the training head's output (the classifier's embedding dim)
    #                   image patch width layers heads  mlp   rope2d  act          embed
    "vit_b32_224":        (224, 32,  768, 12, 12, 3072, False, "quick_gelu", 512),
    "vit_l14_336":        (336, 14, 1024, 24, 16, 4096, False, "quick_gelu", 768),
    "vit_bigG14_336":     (336, 14, 1664, 48, 16, 8192, True,  "gelu",       1280),
    "vit_bigG14_448":     (448, 14, 1664, 48, 16, 8192, True,  "gelu",       1280),
    "vit_l14_rope2d_560": (560, 14, 1024, 24, 16, 4096, True,  "gelu",       768),  # RICE L/14
    # debug sizes (tests, configs/debug.yaml): well under a second per step on 2 CPU cores
    "vit_tiny_rope2d":    (48,   8,   64,  2,  4,  128, True,  "gelu",       32),
    "vit_tiny_clip":      (48,   8,   64,  2,  4,  128, False, "quick_gelu", 32),
}
PRESETS: dict[str, dict] = {name: dict(zip(_FIELDS, row)) for name, row in _TABLE.items()}
ACTS = ("gelu", "quick_gelu")
# The pixel normalization every backbone here takes (OpenAI CLIP's): training/data.py applies it,
# training/hf.py writes it into the exported image processor; one definition keeps them equal.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ModelConfig:
    """`name` picks a preset; any field left None takes the preset's value (so overriding only
    `name` in a run file never inherits another preset's width). `resolved()` fills them in."""
    name: str = "vit_b32_224"
    image_size: int | None = None
    patch_size: int | None = None
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None
    rope2d: bool | None = None
    act: str | None = None  # gelu | quick_gelu
    embed_dim: int | None = None  # training head output; 0 = no head (use the pooled width)
    grad_checkpointing: bool = False  # recompute each block in backward: ~1/3 more compute
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check(self.name in PRESETS, "name", self.name, f"unknown model; known: {', '.join(PRESETS)}")
        r = self.resolved()
        for key in ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim"):
            check(getattr(r, key) > 0, key, getattr(r, key), "must be > 0")
        check(r.embed_dim >= 0, "embed_dim", r.embed_dim, "must be >= 0 (0 = no head)")
        check(r.act in ACTS, "act", r.act, f"must be one of {ACTS}")
        check(r.width % r.heads == 0, "heads", r.heads, f"must divide width={r.width}")
        check(r.image_size % r.patch_size == 0, "image_size", r.image_size,
              f"must be a multiple of patch_size={r.patch_size}")
        if r.rope2d:
            check((r.width // r.heads) % 4 == 0, "heads", r.heads,
                  f"2D RoPE needs head_dim=width/heads divisible by 4 (width={r.width})")
        check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        check(self.layer_norm_eps > 0, "layer_norm_eps", self.layer_norm_eps, "must be > 0")

    def resolved(self) -> Resolved:
        preset = PRESETS[self.name]
        fill = {k: v for k, v in preset.items() if getattr(self, k) is None}
        return cast("Resolved", _replace_no_init(self, fill) if fill else self)

    @property
    def head_dim(self) -> int:
        r = self.resolved()
        return r.width // r.heads


if TYPE_CHECKING:
    class Resolved(ModelConfig):
        """For the type checker only: a ModelConfig after ``resolved()``, no size left None (at
        run time it is a plain ModelConfig)."""
        image_size: int
        patch_size: int
        width: int
        layers: int
        heads: int
        mlp_dim: int
        rope2d: bool
        act: str
        embed_dim: int


def _replace_no_init(cfg: ModelConfig, fill: dict) -> ModelConfig:
    # dataclasses.replace would rerun __post_init__ (which calls resolved(): fine but wasteful).
    new = object.__new__(ModelConfig)
    new.__dict__.update(cfg.__dict__)
    new.__dict__.update(fill)
    return new


@dataclass
class VisionOutput:
    """Like HF's BaseModelOutputWithPooling (attribute access; hidden_states has layers + 1
    entries: the pre_layrnorm output fed to block 0, then each block's output)."""
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, i):
        return (self.last_hidden_state, self.pooler_output, self.hidden_states)[i]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, H, D); cos/sin (N, D) fp32. Rotated in fp32 (bf16 angles lose positions)."""
    xf = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class VisionRotaryEmbedding(nn.Module):
    """Axial 2D RoPE angles: head_dim/4 frequencies per axis, [rows, cols] then duplicated to
    head_dim (HF MLCDRotaryEmbedding). No buffers: inv_freq is recomputed in fp32 each call
    (head_dim/4 values), so meta-device init, `.to(bf16)` and ZeRO casts cannot corrupt it."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, grid_h: int, grid_w: int, device) -> torch.Tensor:
        spatial = self.head_dim // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=device)
                                         / spatial))
        hpos = torch.arange(grid_h, device=device).unsqueeze(1).expand(-1, grid_w).flatten()
        wpos = torch.arange(grid_w, device=device).unsqueeze(0).expand(grid_h, -1).flatten()
        fh = hpos[:, None].float() * inv_freq  # (N, D/4)
        fw = wpos[:, None].float() * inv_freq
        hw = torch.cat([fh, fw], dim=-1)  # (N, D/2)
        return torch.cat([hw, hw], dim=-1)  # (N, D) angles


class Embeddings(nn.Module):
    def __init__(self, cfg: Resolved):
        super().__init__()
        self.patch_size, self.image_size, self.rope2d = cfg.patch_size, cfg.image_size, cfg.rope2d
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        if not cfg.rope2d:
            self.grid = cfg.image_size // cfg.patch_size
            self.position_embedding = nn.Embedding(self.grid ** 2 + 1, cfg.width)

    def pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """(1 + gh*gw, width): the table itself at the native grid, else resized (resize_pos_embed)."""
        w = self.position_embedding.weight
        if (gh, gw) == (self.grid, self.grid):
            return w
        return resize_pos_embed(w, gh, gw)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        if not self.rope2d:
            x = x + self.pos_embed(gh, gw).to(x.dtype)
        return x


def resize_pos_embed(table: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """A CLIP position table (1 + g*g, width) for a square g x g patch grid -> (1 + gh*gw, width):
    the patch part resized bicubically on its grid (HF CLIP's interpolate_pos_encoding: same op
    and order, computed in fp32, cast back), the class position kept as is. Used on the fly for
    off-size inputs and once when a run starts from weights trained at another resolution."""
    n, dim = table.shape[0] - 1, table.shape[-1]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position table has {n} patch rows: not a square grid")
    if (gh, gw) == (g, g):
        return table
    patch = table[1:].float().reshape(1, g, g, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(gh * gw, dim).to(table.dtype)
    return torch.cat([table[:1], patch], dim=0)


class Attention(nn.Module):
    def __init__(self, cfg: Resolved):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.width // cfg.heads
        # HF's registration order (k, v, q): state_dict order matches HF's too.
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: optional bool (B or 1, 1, N, N), True = may attend (training/regions.py)."""
        B, N, C = x.shape
        # Three GEMMs, not one on concatenated weights: under ZeRO-3 a child Linear's weight is
        # only gathered when that child's forward runs, so q/k/v must be called as modules.
        shape = (B, N, self.heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, cfg: Resolved):
        super().__init__()
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Resolved):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), None if cos is None else (cos, sin), mask)
        return x + self.mlp(self.layer_norm2(x))


@torch.no_grad()
def init_block(layer: EncoderLayer, width: int, depth: int) -> None:
    """HF's CLIP/MLCD init of one block's linears (depth: blocks in its stack); LayerNorms are
    reset by the caller."""
    a, m = layer.self_attn, layer.mlp
    for lin in (a.q_proj, a.k_proj, a.v_proj):
        nn.init.normal_(lin.weight, std=width ** -0.5 * (2 * depth) ** -0.5)
    nn.init.normal_(a.out_proj.weight, std=width ** -0.5)
    nn.init.normal_(m.fc1.weight, std=(2 * width) ** -0.5)
    nn.init.normal_(m.fc2.weight, std=width ** -0.5 * (2 * depth) ** -0.5)
    for lin in (a.q_proj, a.k_proj, a.v_proj, a.out_proj, m.fc1, m.fc2):
        nn.init.zeros_(lin.bias)


class Encoder(nn.Module):
    def __init__(self, cfg: Resolved):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)])


class VisionTransformer(nn.Module):
    """HF-named backbone: its state_dict keys are HF's minus the `vision_model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        self.grad_checkpointing = cfg.grad_checkpointing
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.rope2d:
            self.vision_rotary_embedding = VisionRotaryEmbedding(cfg.head_dim, cfg.rope_theta)
            self.class_pos_emb = nn.Parameter(torch.empty(1, cfg.head_dim // 2))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HF's CLIP/MLCD init (so fresh models and HF-initialized ones are alike)."""
        cfg, w, L = self.config, self.config.width, self.config.layers
        nn.init.normal_(self.embeddings.class_embedding, std=w ** -0.5)
        nn.init.normal_(self.embeddings.patch_embedding.weight, std=0.02)
        if not cfg.rope2d:
            nn.init.normal_(self.embeddings.position_embedding.weight, std=0.02)
        else:
            nn.init.normal_(self.class_pos_emb, std=(cfg.head_dim // 2) ** -0.5)
        for layer in self.encoder.layers:
            init_block(cast(EncoderLayer, layer), w, L)
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def rope(self, gh: int, gw: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.config.rope2d:
            return None
        angles = self.vision_rotary_embedding(gh, gw, device)
        cls = self.class_pos_emb.float()
        cls = torch.cat([cls, cls], dim=-1)  # (1, D)
        angles = torch.cat([cls, angles], dim=0)  # (1 + N, D), fp32
        return angles.cos(), angles.sin()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> VisionOutput:
        H, W = pixel_values.shape[-2:]
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        cos_sin = self.rope(H // p, W // p, x.device) or (None, None)
        hidden = [x] if output_hidden_states else None
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layers:
            if ckpt:
                x = checkpoint(layer, x, *cos_sin, use_reentrant=False)
            else:
                x = layer(x, *cos_sin)
            if hidden is not None:
                hidden.append(x)
        pooled = self.post_layernorm(x[:, 0])
        return VisionOutput(x, pooled, tuple(hidden) if hidden is not None else None)


class MLCDEncoder(nn.Module):
    """Backbone + training head. forward -> (B, embed_dim) unnormalized embeddings (the loss
    normalizes); the head (width -> embed_dim, no bias) stays out of the HF export by default."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.head: nn.Module = nn.Identity()
        if cfg.embed_dim:
            self.head = head = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
            nn.init.normal_(head.weight, std=cfg.width ** -0.5)

    @property
    def out_dim(self) -> int:
        return self.config.embed_dim or self.config.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision_model.grad_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision_model(pixel_values).pooler_output)


def build_model(cfg: ModelConfig) -> MLCDEncoder:
    """Builds on the current default device: `with torch.device("meta"): build_model(cfg)` costs
    no memory (parameter counts of bigG), `torch.device("cuda")` skips the CPU init."""
    return MLCDEncoder(cfg)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- sizes and FLOPs (one place)
# Counted from the architecture above, without building it: launch/cost_model.py plans with
# them, training/bench_model.py and launch/gpu_check.py turn measured step times into MFU, and a
# test holds analytic_params equal to the built module's count. Formulas: docs/SCALING.md.

def num_tokens(cfg: ModelConfig) -> int:
    c = cfg.resolved()
    return (c.image_size // c.patch_size) ** 2 + 1  # patches + the class token


def analytic_params(cfg: ModelConfig) -> int:
    """Parameters of build_model(cfg): per block qkv + out projections with biases, MLP, two
    LayerNorms; patch conv, class embedding, position embedding (2D RoPE: a class_pos_emb of
    head_dim/2 instead), pre/post LayerNorms, the bias-free head."""
    c = cfg.resolved()
    d, m = c.width, c.mlp_dim
    per_layer = 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d
    pos = d // c.heads // 2 if c.rope2d else num_tokens(c) * d
    embed = 3 * c.patch_size ** 2 * d + d + pos
    return c.layers * per_layer + embed + 4 * d + d * c.embed_dim


def forward_flops(cfg: ModelConfig, head: bool = True) -> float:
    """Forward FLOPs per image: 2 per multiply-accumulate of every matmul (projections, MLP,
    attention scores and mixing, patch embedding, optionally the head). A training step is 3x
    (backward = 2x forward), 4x with activation checkpointing."""
    c = cfg.resolved()
    d, m, n = c.width, c.mlp_dim, num_tokens(c)
    per_layer = n * (8 * d * d + 4 * d * m) + 4 * n * n * d
    patch = 2 * 3 * c.patch_size ** 2 * d * (n - 1)
    return c.layers * per_layer + patch + (2 * d * c.embed_dim if head else 0)

