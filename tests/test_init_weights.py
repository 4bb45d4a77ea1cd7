"""Starting a run from earlier weights (training/init_weights.py): HF folders and our checkpoints
into the backbone, position tables resized for a new resolution, clear errors, the fine-tuning
param groups; and (slow) a tiny 32 px run continued at 48 px from its export, with its centers."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.config import ConfigError
from pipeline.core.dist import DistContext
from training.hf import save_hf_folder
from training.init_weights import FinetuneConfig, load_initial_weights, param_groups
from training.model import ModelConfig, build_model
from training.train import TrainConfig

TINY = dict(patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, embed_dim=16)


def tiny(name: str, image_size: int, **kw) -> ModelConfig:
    return ModelConfig(name=name, image_size=image_size, **{**TINY, **kw})


def source(tmp_path, name: str, image_size: int = 32, seed: int = 0):
    """A trained-looking source model (random, but not the target's init) saved as a HF folder."""
    torch.manual_seed(seed)
    model = build_model(tiny(name, image_size)).eval()
    folder = save_hf_folder(model, model.config, tmp_path / f"hf_{name}_{image_size}")
    return model, folder


def start(tmp_path, cfg: ModelConfig, init_from, seed: int = 1):
    torch.manual_seed(seed)  # a different init than the source: a load that does nothing shows
    model = build_model(cfg).eval()
    prov = load_initial_weights(model, TrainConfig(init_from=str(init_from), model=cfg), 10, DistContext(),
                                tmp_path)
    return model, prov


@pytest.mark.parametrize("name", ["vit_tiny_clip", "vit_tiny_rope2d"])
def test_same_resolution_reproduces_source_exactly(tmp_path, name):
    src, folder = source(tmp_path, name)
    model, prov = start(tmp_path, src.config, folder)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = src.vision_model(x), model.vision_model(x)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)
    # a HF folder carries no training head: it stays the target's fresh one
    assert not torch.equal(src.head.weight, model.head.weight)
    assert prov["kind"] == "hf_folder" and "head freshly initialized" in " ".join(prov["notes"])
    assert json.loads((tmp_path / "init_from.json").read_text())["init_from"] == str(folder)


@pytest.mark.parametrize("name", ["vit_tiny_clip", "vit_tiny_rope2d"])
def test_new_resolution(tmp_path, name):
    """32 px (4x4 grid) -> 48 px (6x6): CLIP's table is resized once, with the very op the source
    applies on the fly to off-size inputs, so the new model at 48 px equals the source fed 48 px;
    RoPE loads unchanged. The source is untouched by the round trip."""
    src, folder = source(tmp_path, name)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    model, prov = start(tmp_path, tiny(name, 48), folder)
    pos = "vision_model.embeddings.position_embedding.weight"
    if name == "vit_tiny_clip":
        assert model.state_dict()[pos].shape == (37, 32) and any("4x4 to a 6x6" in n for n in prov["notes"])
        torch.testing.assert_close(model.state_dict()[pos][0], before[pos][0], rtol=0, atol=0)  # class position
    else:
        assert pos not in model.state_dict() and prov["notes"] == ["the source has no training head: head "
                                                                   "freshly initialized"]
    x48, x32 = torch.randn(2, 3, 48, 48), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_model(x48).pooler_output, src.vision_model(x48).pooler_output,
                                   rtol=0, atol=0)
        ref32 = src.vision_model(x32).pooler_output
    assert all(torch.equal(v, before[k]) for k, v in src.state_dict().items())
    with torch.no_grad():
        assert torch.equal(src.vision_model(x32).pooler_output, ref32)


def test_bad_sources_one_line(tmp_path):
    src, folder = source(tmp_path, "vit_tiny_clip")
    with pytest.raises(ConfigError, match=r"init_from=.*nowhere: no such file"):
        start(tmp_path, src.config, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"init_from=.*hf_vit_tiny_clip_32: source width=32 but train.model.width=64"):
        start(tmp_path, tiny("vit_tiny_clip", 32, width=64), folder)
    # a bare state file has no config: the shape check names the key
    from safetensors.torch import save_file
    sd = {k: v for k, v in src.state_dict().items()}
    sd["vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(48, 32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match=r"bad.safetensors: key vision_model.encoder.layers.1.mlp.fc1.weight "
                                          r"has shape \(48, 32\)"):
        start(tmp_path, src.config, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="init_centers_from=.*not a training checkpoint"):
        load_initial_weights(src, TrainConfig(init_centers_from=str(folder)), 10, DistContext(), tmp_path)


def test_finetune_param_groups():
    with pytest.raises(ConfigError, match="layer_decay"):
        FinetuneConfig(layer_decay=0.0)
    model = build_model(tiny("vit_tiny_clip", 32))
    groups = param_groups(model, 0.2, FinetuneConfig(layer_decay=0.5, freeze_patch_embed=True))
    assert not model.vision_model.embeddings.patch_embedding.weight.requires_grad
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert id(named["vision_model.embeddings.patch_embedding.weight"]) not in scale
    assert scale[id(named["head.weight"])] == 1.0 and wd[id(named["head.weight"])] == 0.2
    assert scale[id(named["vision_model.encoder.layers.1.mlp.fc1.weight"])] == 0.5
    assert scale[id(named["vision_model.encoder.layers.0.mlp.fc1.bias"])] == 0.25
    assert scale[id(named["vision_model.embeddings.position_embedding.weight"])] == 0.125
    assert wd[id(named["vision_model.embeddings.position_embedding.weight"])] == 0.0
    assert len(scale) == sum(p.requires_grad for p in model.parameters())
    # off: the two classic groups, every scale 1
    plain = param_groups(build_model(tiny("vit_tiny_clip", 32)), 0.2)
    assert len(plain) == 2 and {g["lr_scale"] for g in plain} == {1.0}


@pytest.mark.slow
def test_continue_at_higher_resolution(tmp_path):
    """The paper's 224 -> 336 step in miniature: a 1-rank CLIP run at 32 px, exported; a 2-rank
    run at 48 px starts from the export (read on rank 0, broadcast; position table 4x4 -> 6x6)
    and from the first run's centers (re-sharded 1 -> 2, kept frozen), patch embedding frozen,
    layer-wise LR decay. A rerun of the second command resumes its own checkpoint instead of
    re-initializing; a bad init_from stops both ranks with one line."""
    from safetensors.torch import load_file
    from test_train import TINY as TRAIN_TINY
    from test_train import build_synthetic, read_metrics, run_train, synthetic_overrides

    from training.checkpoint import load_backbone_state_dict
    from training.export import export

    build_synthetic(tmp_path / "syn")
    data = synthetic_overrides(tmp_path / "syn")
    clip = ["train.model.name=vit_tiny_clip", "train.checkpoint.every=100", "train.checkpoint.keep=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(a, 1, data + clip + ["train.steps=4"])
    hf = export(a / "train", tmp_path / "a_hf")
    ft = clip + ["train.model.image_size=48", f"train.init_from={hf}", f"train.init_centers_from={a / 'train'}",
                 "train.finetune.freeze_centers=true", "train.finetune.freeze_patch_embed=true",
                 "train.finetune.layer_decay=0.8"]
    p = run_train(b, 2, data + ft + ["train.steps=3"])
    assert "backbone initialized from" in p.stderr + p.stdout
    prov = json.loads((b / "train" / "init_from.json").read_text())
    assert prov["kind"] == "hf_folder" and any("4x4 to a 6x6" in n for n in prov["notes"])
    ka, kb = a / "train" / "checkpoints" / "step_00000004", b / "train" / "checkpoints" / "step_00000003"
    assert json.loads((kb / "trainer_state.json").read_text())["init_from"]["init_from"] == str(hf)
    centers_b = torch.cat([load_file(kb / "partial_fc" / f"rank{r}_of2.safetensors")["weight"] for r in (0, 1)])
    torch.testing.assert_close(centers_b, load_file(ka / "partial_fc" / "rank0_of1.safetensors")["weight"],
                               rtol=0, atol=0)
    sa, sb = load_backbone_state_dict(ka), load_backbone_state_dict(kb)
    patch = "vision_model.embeddings.patch_embedding.weight"
    torch.testing.assert_close(sb[patch], sa[patch], rtol=0, atol=0)
    assert sb["vision_model.embeddings.position_embedding.weight"].shape == (37, 32)
    fc = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert 0 < float((sb[fc] - sa[fc]).detach().abs().max()) < 0.5  # trained on from A's weights
    m = read_metrics(b)
    assert sorted(m) == [1, 2, 3] and all(torch.isfinite(torch.tensor(m[s]["loss"])) for s in m)
    p = run_train(b, 2, data + ft + ["train.steps=4", "train.extend_schedule=true"])
    out = p.stderr + p.stdout
    assert f"resumed from {kb}" in out and "backbone initialized from" not in out
    assert sorted(read_metrics(b)) == [1, 2, 3, 4]
    from conftest import torchrun
    bad = torchrun(["-m", "training.train", f"run.out_dir={tmp_path / 'c'}", *TRAIN_TINY, *data, *clip,
                    f"train.init_from={tmp_path / 'nowhere'}"], 2, check=False, timeout=300)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("config error:")]
    assert bad.returncode != 0 and len(errors) == 1, bad.stderr[-3000:]  # rank 0 reports the error all ranks share
    assert all(f"train.init_from={tmp_path / 'nowhere'}: no such file or folder" in e for e in errors)


def test_full_clip_model_folder_matches_transformers(tmp_path):
    """A transformers-written CLIPModel folder (vision + text towers, like OpenAI's releases):
    the vision tower and visual_projection load; outputs match transformers at the native size
    and, after our one-time resize, its interpolate_pos_encoding at a new size."""
    transformers = pytest.importorskip("transformers")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act="quick_gelu")
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    torch.manual_seed(0)
    conf = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
    hf = transformers.CLIPModel(conf).eval()
    hf.save_pretrained(tmp_path / "clip")
    for size in (32, 48):
        model, prov = start(tmp_path, tiny("vit_tiny_clip", size), tmp_path / "clip")
        assert prov["notes"] == ([] if size == 32 else ["position embedding resized from a 4x4 to a 6x6 patch "
                                                        "grid (bicubic)"])
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = hf.vision_model(pixel_values=x, interpolate_pos_encoding=size != 32)
            ours = model.vision_model(x)
            torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(x), hf.visual_projection(ref.pooler_output), rtol=1e-5, atol=1e-5)
