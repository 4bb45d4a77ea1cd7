"""The CLIP baseline (train.objective=clip, training/clip_head.py).

- The head's loss on a rank's shard equals a float64 reference of the symmetric InfoNCE over the
  whole (gathered) batch, and its gradients (image rows after DeepSpeed's 1/W average; the text
  tower and logit scale after the head's rank average) equal the reference gradients: in one
  process, and on 2 ranks under real torchrun/gloo (each rank holds half the batch).
- A real `mlcd train` run with the clip objective on synthetic captioned shards trains, resumes
  its text tower from the checkpoint, and its export loads in transformers.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, torchrun

N, DIM = 8, 16  # global batch, embedding width


def reference(img: torch.Tensor, tokens: torch.Tensor, head) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """float64 symmetric InfoNCE over the full batch, written out (no open_clip): (loss, text-tower
    grads by name, image-feature grad)."""
    tower = copy.deepcopy(head.tower).double()
    img = img.detach().double().requires_grad_()
    txt = tower.text(tokens)
    a = img / img.norm(dim=-1, keepdim=True)
    b = txt / txt.norm(dim=-1, keepdim=True)
    logits = tower.logit_scale.exp().clamp(max=100.0) * a @ b.T
    idx = torch.arange(len(img))
    loss = -(logits.log_softmax(1)[idx, idx].mean() + logits.log_softmax(0)[idx, idx].mean()) / 2
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()}, img.grad


def check_loss_and_grads(ctx) -> None:
    from training.clip_head import tokenize
    from training.config import ClipConfig, OptimConfig
    from training.data import Batch
    from training.heads import ClipHead
    torch.manual_seed(0)
    img = torch.randn(N, DIM)
    captions = ["a red apple", "smiling face with heart eyes", "grinning cat", "flag of france",
                "blue car", "cloud with rain", "green tree", "a black cat on a mat"]
    cfg = ClipConfig(width=32, layers=1, heads=2, context_length=12)
    tokens = tokenize(captions, cfg.context_length)
    head = ClipHead(cfg)
    head.build(DIM, ctx, seed=3, device="cpu", optim=OptimConfig())
    with torch.no_grad():
        head.tower.logit_scale.fill_(2.5)  # not the init: the scale's gradient is checked too
    ref_loss, ref_grads, ref_img_grad = reference(img, tokens, head)

    w, r = ctx.world_size, ctx.rank
    rows = slice(r * N // w, (r + 1) * N // w)
    mine = img[rows].clone().requires_grad_()
    batch = Batch(images=torch.zeros(N // w, 3, 4, 4), labels=torch.zeros(N // w, 1, dtype=torch.long),
                  texts=tokens[rows])
    loss, terms = head.loss({"image": mine}, batch, 0)
    loss.backward()
    head.average_grads()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    assert set(terms) == {"clip_loss", "clip_logit_scale"}
    # DeepSpeed averages the backbone's gradient over ranks: that average is the reference's
    torch.testing.assert_close(mine.grad.double() / w, ref_img_grad[rows], rtol=1e-4, atol=1e-7)
    for n, p in head.tower.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_grads[n], rtol=1e-3, atol=1e-6, msg=n)
    assert ref_grads["logit_scale"].abs() > 1e-6  # the temperature learns
    print(f"CLIP_OK {r}", flush=True)


def test_loss_matches_float64_reference_one_process():
    from pipeline.core.dist import DistContext
    check_loss_and_grads(DistContext())


@pytest.mark.slow
def test_loss_matches_float64_reference_two_ranks():
    p = torchrun(["tests/test_clip_objective.py"], 2, timeout=240)
    assert all(f"CLIP_OK {r}" in p.stdout for r in range(2)), p.stdout[-2000:]


def test_captions_travel_in_the_batch(tmp_path):
    from test_train import build_synthetic

    from training.clip_head import CaptionStream, tokenize
    from training.data import TrainDataConfig, find_parts, loader
    build_synthetic(tmp_path, shards=1, per_shard=20)
    cfg = TrainDataConfig(shards=str(tmp_path / "data/train/00000.tar"), store=str(tmp_path / "store"),
                          labels=str(tmp_path / "clusters/labels"), batch_size=4, workers=0, shuffle_buffer=4)
    ds = CaptionStream(find_parts(cfg, 3), cfg, 16, 3, 24, 0, 0, 0, 2, context_length=10)
    got = list(loader(ds, cfg))
    assert len(got) == 2 and all(b.texts is not None and b.texts.shape == (4, 10) for b in got)
    assert all(b.texts.dtype == torch.long and (b.texts[:, 0] == 49406).all() for b in got)  # BOS
    first = got[0]
    # build_synthetic writes "class c" captions; the key's sample must carry its own caption
    assert any(torch.equal(first.texts[0], tokenize([f"class {c}"], 10)[0]) for c in range(24))


def test_config_refuses_unknown_objective():
    from pipeline.core.config import ConfigError
    from training.config import ClipConfig, TrainConfig
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="simclr")
    with pytest.raises(ConfigError, match="width"):
        ClipConfig(width=30, heads=4)


@pytest.mark.slow
def test_clip_train_resume_and_export_loads_in_transformers(tmp_path):
    from test_train import TINY, build_synthetic, synthetic_overrides
    build_synthetic(tmp_path / "syn")
    common = [f"run.out_dir={tmp_path / 'run'}", *TINY, *synthetic_overrides(tmp_path / "syn"),
              "train.objective=clip", "train.clip.width=32", "train.clip.layers=1", "train.clip.heads=2",
              "train.clip.context_length=8", "train.checkpoint.every=3"]
    spec = {"a": [*common, "train.steps=3"], "b": [*common, "train.steps=6", "train.extend_schedule=true"]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    p = torchrun(["tests/test_train.py", str(tmp_path / "spec.json")], 1, timeout=400)
    out = tmp_path / "run" / "train"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all("clip_loss" in m and "loss_pos" not in m for m in metrics)  # the image head is out
    assert "resumed from" in p.stdout + p.stderr
    from safetensors.torch import load_file

    from training.clip_head import INIT_LOGIT_SCALE
    saved = load_file(out / "checkpoints" / "step_00000006" / "clip_text" / "text.safetensors")
    assert abs(float(saved["model.logit_scale"]) - INIT_LOGIT_SCALE) > 1e-5  # the temperature trained
    assert "opt.logit_scale.exp_avg" in saved and int(saved["opt.logit_scale.step"]) == 6  # moments resumed
    exp = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "training.export", str(out), str(exp)], cwd=ROOT,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
                                                            "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    from transformers import AutoModel
    hf = AutoModel.from_pretrained(exp).eval()
    with torch.no_grad():
        y = hf(pixel_values=torch.randn(1, 3, 32, 32))
    assert torch.isfinite(y.pooler_output).all()


if __name__ == "__main__":  # worker: python tests/test_clip_objective.py under torchrun
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.core.dist import init_distributed
    ctx = init_distributed()
    try:
        check_loss_and_grads(ctx)
    finally:
        from pipeline.core.dist import destroy
        destroy(ctx)
