"""training/model.py, hf.py, export.py: the MLCD ViT family and its exact HF conversion."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.core.config import ConfigError
from tests.conftest import torchrun
from training import export as ex
from training.hf import (
    config_from_hf,
    from_hf_state_dict,
    hf_config_dict,
    load_hf_folder,
    save_hf_folder,
    to_hf_state_dict,
)
from training.model import PRESETS, ModelConfig, build_model, num_params

TINY = ["vit_tiny_rope2d", "vit_tiny_clip"]
SHAPES = [(48, 48), (40, 64), (64, 32)]  # native, non-square, and off the native grid


def _auto_model(folder):
    from transformers import AutoModel
    return AutoModel.from_pretrained(folder, local_files_only=True).eval()


def _compare(ours, hf, x, rope2d):
    kw = {} if rope2d else {"interpolate_pos_encoding": True}  # HF CLIP needs it off 48x48
    with torch.no_grad():
        a = ours.vision_model(x, output_hidden_states=True)
        b = hf(pixel_values=x, output_hidden_states=True, **kw)
    assert len(a.hidden_states) == len(b.hidden_states) == ours.config.layers + 1
    pairs = [(a.last_hidden_state, b.last_hidden_state), (a.pooler_output, b.pooler_output),
             *zip(a.hidden_states, b.hidden_states)]
    for u, v in pairs:
        assert u.shape == v.shape
        torch.testing.assert_close(u, v, atol=1e-5, rtol=0)
    assert a.last_hidden_state.abs().mean() > 0.1  # not trivially equal (zeros)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Random-weight tiny models of both families and their HF export folders."""
    torch.manual_seed(0)
    out = {}
    for name in TINY:
        m = build_model(ModelConfig(name=name)).eval()
        with torch.no_grad():  # break symmetry the zero-bias init would hide
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        folder = save_hf_folder(m, m.config, tmp_path_factory.mktemp(name))
        out[name] = (m, folder)
    return out


def test_param_counts_match_published_models():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            m = build_model(ModelConfig(name=name))
        counts[name] = num_params(m.vision_model)
        print(f"{name}: backbone {counts[name] / 1e6:.2f}M params, head {num_params(m.head) / 1e6:.2f}M")
    assert abs(counts["vit_b32_224"] / 1e6 - 87.5) < 0.2
    assert abs(counts["vit_l14_336"] / 1e6 - 304) < 1.0
    assert abs(counts["vit_l14_rope2d_560"] / 1e6 - 304) < 1.5
    assert abs(counts["vit_bigG14_336"] / 1e9 - 1.84) < 0.02
    assert counts["vit_bigG14_448"] == counts["vit_bigG14_336"]  # RoPE: no resolution-tied params


def test_config_presets_and_errors():
    cfg = ModelConfig(name="vit_bigG14_448")
    assert cfg.width is None and cfg.resolved().width == 1664 and cfg.head_dim == 104
    assert ModelConfig(name="vit_tiny_clip", width=128).resolved().width == 128
    assert build_model(ModelConfig(name="vit_tiny_clip", embed_dim=0)).head.__class__.__name__ == "Identity"
    # asdict round trip: what trainer_state.json stores rebuilds the same model
    r = ModelConfig(**dataclasses.asdict(ModelConfig(name="vit_tiny_rope2d", layers=3)))
    assert r.resolved().layers == 3
    with pytest.raises(ConfigError, match="name"):
        ModelConfig(name="vit_huge")
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(name="vit_tiny_clip", heads=3)
    with pytest.raises(ConfigError, match="divisible by 4"):
        ModelConfig(name="vit_tiny_rope2d", width=72, heads=12)  # head_dim 6
    with pytest.raises(ConfigError, match="act"):
        ModelConfig(name="vit_tiny_rope2d", act="relu")
    m = build_model(ModelConfig(name="vit_tiny_rope2d"))
    with pytest.raises(ValueError, match="multiple of the patch"):
        m(torch.randn(1, 3, 50, 48))


@pytest.mark.parametrize("name", TINY)
def test_export_matches_hf_model(exported, name):
    """Our model vs the HF model loaded from our export, square and non-square inputs."""
    ours, folder = exported[name]
    hf = _auto_model(folder)
    assert type(hf).__name__ == ("MLCDVisionModel" if ours.config.rope2d else "CLIPVisionModel")
    torch.manual_seed(1)
    for h, w in SHAPES:
        _compare(ours, hf, torch.randn(2, 3, h, w), ours.config.rope2d)


def test_rope_grid_is_rows_then_columns(exported):
    """Non-square RoPE uses the (H/p, W/p) grid like HF; DeepGlint's original swapped h and w.
    A swapped grid must be detectably different, so the parity test above has teeth."""
    ours, _ = exported["vit_tiny_rope2d"]
    vm = ours.vision_model
    x = torch.randn(1, 3, 40, 64)
    with torch.no_grad():
        ref = vm(x).last_hidden_state
        orig = vm.vision_rotary_embedding.forward
        vm.vision_rotary_embedding.forward = lambda gh, gw, dev: orig(gw, gh, dev)
        swapped = vm(x).last_hidden_state
        vm.vision_rotary_embedding.forward = orig
    assert (ref - swapped).abs().max() > 1e-3


def test_export_folder_layout_and_processor(exported):
    from PIL import Image
    from transformers import AutoProcessor
    _, folder = exported["vit_tiny_rope2d"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("vision_model.") for k in keys)  # 4.5x layout
    assert not any(k.startswith("head.") for k in keys)  # head left out by default
    conf = json.loads((folder / "config.json").read_text())
    for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
              "num_channels", "architectures", "torch_dtype"):
        assert k in conf, k  # everything 4.5x's config class reads
    assert conf["model_type"] == "mlcd" and conf["rope_parameters"]["rope_theta"] == 1e4
    proc = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert type(proc).__name__.startswith("CLIPImageProcessor")
    img = Image.new("RGB", (90, 60), (255, 0, 0))
    px = proc(images=img, return_tensors="pt")["pixel_values"]
    assert px.shape == (1, 3, 48, 48)
    red = (1.0 - 0.48145466) / 0.26862954
    assert abs(px[0, 0].mean().item() - red) < 1e-2  # CLIP mean/std normalisation


def test_prefixed_keys_load_in_5x_like_native_save(exported, tmp_path):
    """5.x maps our prefixed file on load (its in-memory names have no prefix), and its own
    save_pretrained writes the very same prefixed layout back: one file for both generations."""
    _, folder = exported["vit_tiny_clip"]
    hf = _auto_model(folder)
    native = tmp_path / "native"
    hf.save_pretrained(native)
    with safe_open(str(native / "model.safetensors"), "pt") as f:
        nkeys = set(f.keys())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        pkeys = set(f.keys())
    assert nkeys == pkeys
    assert {"vision_model." + k for k in hf.state_dict()} == pkeys
    hf2 = _auto_model(native)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output,
                                   hf2(pixel_values=x).pooler_output, atol=0, rtol=0)


@pytest.mark.parametrize("name,with_head", [("vit_tiny_rope2d", False), ("vit_tiny_clip", False),
                                            ("vit_tiny_clip", True)])
def test_round_trip_hf_ours_hf_bit_identical(name, with_head, tmp_path):
    """HF model (HF's own random init) -> ours -> HF: the same keys, dtypes and bits."""
    import transformers
    cfg = ModelConfig(name=name).resolved()
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg, with_head=with_head)))
    conf = transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    torch.manual_seed(2)
    hf = getattr(transformers, conf.architectures[0])(conf)
    sd = hf.state_dict()
    prefixed = next(iter(sd)).startswith("vision_model.")  # 5.x: only ...WithProjection keeps it
    assert prefixed == with_head
    ours = build_model(config_from_hf(conf.to_dict(), embed_dim=cfg.embed_dim if with_head else 0))
    ours.load_state_dict(from_hf_state_dict(sd), strict=True)
    back = to_hf_state_dict(ours.state_dict(), prefixed=prefixed, with_head=with_head)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


def test_import_local_hf_folder(exported, tmp_path):
    ours, folder = exported["vit_tiny_rope2d"]
    m = load_hf_folder(folder, embed_dim=16)
    assert m.config.rope2d and m.out_dim == 16
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(m.vision_model(x).pooler_output,
                                   ours.vision_model(x).pooler_output, atol=0, rtol=0)
    # CLIP with its head: exported as CLIPVisionModelWithProjection, imported back with the head
    clip, _ = exported["vit_tiny_clip"]
    out = save_hf_folder(clip, clip.config, tmp_path / "withhead", with_head=True)
    from transformers import CLIPVisionModelWithProjection  # AutoModel gives the bare backbone
    hf = CLIPVisionModelWithProjection.from_pretrained(out, local_files_only=True).eval()
    back = load_hf_folder(out)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(back(x), clip(x), atol=0, rtol=0)
        torch.testing.assert_close(hf(pixel_values=x).image_embeds, clip(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_from_bare_state_file(exported, tmp_path, suffix, capsys):
    ours, _ = exported["vit_tiny_rope2d"]
    state = tmp_path / f"model{suffix}"
    sd = {k: v.contiguous() for k, v in ours.state_dict().items()}
    save_file(sd, str(state)) if suffix == ".safetensors" else torch.save(sd, state)
    out = tmp_path / "export"
    assert ex.main([str(state), str(out), "--model", "vit_tiny_rope2d"]) == 0
    _compare(ours, _auto_model(out), torch.randn(1, 3, 40, 64), True)
    info = json.loads((out / "mlcd_export.json").read_text())
    assert info["model_config"]["embed_dim"] == ours.config.embed_dim
    # mistakes are one clear line, exit code 2
    assert ex.main([str(state), str(tmp_path / "x")]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert ex.main([str(state), str(tmp_path / "x"), "--model", "vit_tiny_clip"]) == 2
    assert "do not match model vit_tiny_clip" in capsys.readouterr().err
    assert ex.main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 2


def test_grad_checkpointing_gives_same_grads():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 40, 48)
    grads = []
    for gc in (False, True):
        torch.manual_seed(4)
        m = build_model(ModelConfig(name="vit_tiny_rope2d", grad_checkpointing=gc)).train()
        m(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)
    assert grads[0]["vision_model.class_pos_emb"].abs().sum() > 0  # RoPE angles are trained


@pytest.mark.parametrize("name", TINY)
def test_bf16_forward_backward(name):
    torch.manual_seed(5)
    m = build_model(ModelConfig(name=name))
    x = torch.randn(2, 3, 48, 48)
    ref = m(x).detach()
    mb = m.to(torch.bfloat16)
    y = mb(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()


DS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import deepspeed, torch
    from dataclasses import asdict
    from safetensors.torch import save_file
    from training.model import ModelConfig, build_model
    out = sys.argv[1]
    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_tiny_clip", embed_dim=24)
    model = build_model(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    loss = engine(torch.randn(2, 3, 48, 48)).square().mean()
    engine.backward(loss); engine.step()
    ck = os.path.join(out, "checkpoints")
    tag = "step_00000001"
    engine.save_checkpoint(ck, tag=tag)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # all ranks
        ref = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    if engine.global_rank == 0:
        json.dump({"step": 1, "samples_seen": 2, "model_config": asdict(cfg), "complete": True},
                  open(os.path.join(ck, tag, "trainer_state.json"), "w"))
        save_file(ref, os.path.join(out, "reference.safetensors"))
""")


@pytest.mark.slow
def test_export_deepspeed_checkpoint(tmp_path):
    """A real DeepSpeed ZeRO-3 checkpoint (2 gloo ranks; parameters partitioned, so the model must
    call its submodules for their weights to be gathered) -> zero_to_fp32 -> HF folder."""
    from safetensors.torch import load_file
    script = tmp_path / "ds_save.py"
    script.write_text(DS_SCRIPT)
    run = tmp_path / "run"
    torchrun([str(script), str(run)], nproc=2, env={"DS_ACCELERATOR": "cpu"}, timeout=300)
    out = tmp_path / "export"
    assert ex.main([str(run), str(out), "--with-head"]) == 0  # run folder -> latest step
    ref = load_file(str(run / "reference.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert set(got) == set(to_hf_state_dict(ref, with_head=True))
    for k, v in to_hf_state_dict(ref, with_head=True).items():
        assert torch.equal(got[k], v), k
    info = json.loads((out / "mlcd_export.json").read_text())
    assert info["step"] == 1
    hf = _auto_model(out)
    assert hf.config.projection_dim == 24
    # an incomplete checkpoint is refused
    state = run / "checkpoints/step_00000001/trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "complete": False}))
    assert ex.main([str(run), str(tmp_path / "x")]) == 2


TF4_CHECK = textwrap.dedent("""
    import sys, torch, transformers
    from transformers import AutoModel, AutoProcessor
    assert transformers.__version__.startswith("4."), transformers.__version__
    folder, x_path = sys.argv[1], sys.argv[2]
    x = torch.load(x_path, weights_only=True)
    m = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    AutoProcessor.from_pretrained(folder, local_files_only=True)
    kw = {} if type(m).__name__ == "MLCDVisionModel" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        o = m(pixel_values=x, output_hidden_states=True, **kw)
    torch.save({"pool": o.pooler_output, "hs": torch.stack(o.hidden_states)}, x_path + ".out")
""")


@pytest.mark.skipif(not os.environ.get("MLCD_TRANSFORMERS4_PATH"),
                    reason="set MLCD_TRANSFORMERS4_PATH to a `pip install --target` of transformers "
                           "4.5x (+ huggingface_hub<1, tokenizers<0.23) to check the LLaVA-era loader")
@pytest.mark.parametrize("name", TINY)
def test_export_loads_in_transformers_4x(exported, name, tmp_path):
    """Checked with 4.52.4 (first release with MLCD) and 4.57.1: outputs identical."""
    ours, folder = exported[name]
    x = torch.randn(2, 3, 40, 64)
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "check.py").write_text(TF4_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.environ["MLCD_TRANSFORMERS4_PATH"]}
    p = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(folder), str(tmp_path / "x.pt")],
                       check=False,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "x.pt.out", weights_only=True)
    with torch.no_grad():
        a = ours.vision_model(x, output_hidden_states=True)
    torch.testing.assert_close(got["pool"], a.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["hs"], torch.stack(a.hidden_states), atol=1e-5, rtol=0)


def test_export_folder_is_usable_by_others(exported, tmp_path, capsys):
    """Modes follow the umask, config.json is clean, README.md is a model card, and
    --push-to-hub is refused (before any work) unless run.allow_upload=true."""
    ours, _ = exported["vit_tiny_clip"]
    state = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(state))
    results = tmp_path / "results.md"
    results.write_text("| model | colours linear |\n|---|---|\n| tiny | 97.5 |\n")
    out = tmp_path / "export"
    old = os.umask(0o022)
    try:
        assert ex.main([str(state), str(out), "--model", "vit_tiny_clip", "--dtype", "bfloat16",
                        "--eval", str(results)]) == 0
    finally:
        os.umask(old)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "config.json", "mlcd_export.json", "model.safetensors",
                     "preprocessor_config.json"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    # what any written file gets under umask 022 (safetensors replaces the atomic temp with a 0600
    # file: pipeline/core/io.py sets the mode after the block)
    assert set(modes.values()) == {"0o644"}, modes
    conf = json.loads((out / "config.json").read_text())
    assert "dtype" not in conf and None not in conf.values() and conf["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: other")
    r = ours.config.resolved()
    assert f"| width / layers / heads | {r.width} / {r.layers} / {r.heads} |" in card
    assert "| tiny | 97.5 |" in card and f"mlcd export {state} {out}" in card
    assert "no training record" in card  # a bare state file: nothing about its training is claimed
    assert _auto_model(out).config.hidden_size == r.width  # transformers still reads it
    # push-to-hub: refused in one line, exit 2, nothing written
    assert ex.main([str(state), str(tmp_path / "up"), "--model", "vit_tiny_clip",
                    "--push-to-hub", "me/tiny"]) == 2
    assert "refused unless run.allow_upload=true" in capsys.readouterr().err
    assert not (tmp_path / "up").exists()


def test_model_card_of_a_training_checkpoint():
    from training.model_card import model_card
    state = {"step": 120, "samples_seen": 3840, "num_classes": 500, "global_batch": 32, "world_size": 2,
             "config": {"train": {"loss": {"mode": "mlcd", "scale": 64.0, "margin": 0.3, "margin_type": "arc",
                                           "num_labels": 8},
                                  "data": {"shards": "/d/{00000..00009}.tar", "labels": "/r/clusters/labels"}}}}
    info = {"model_config": dataclasses.asdict(ModelConfig(name="vit_tiny_rope2d").resolved()),
            "source": "/r/train", "step": 120, "dtype": "float32", "params": 123456}
    card = model_card(info, state, None, "mlcd export /r/train /e")
    for row in ("| K (classes) | 500 |", "| l (labels per image) | 8 |", "| steps | 120 |",
                "| loss | mlcd (scale 64.0, margin 0.3 arc) |", "| data (shards) | /d/{00000..00009}.tar |",
                "| position encoding | 2D RoPE (MLCD) |", "| backbone parameters | 0.12 M |"):
        assert row in card, row
    assert "No eval results were found" in card and "mlcd export /r/train /e" in card
