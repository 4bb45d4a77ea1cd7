"""Collectives go through DistContext (pipeline/core/dist.py), which stages tensors on the backend's
device: NCCL has no CPU backend, and CI (gloo, CPU) cannot see a CPU tensor reaching NCCL. So the
rule is checked statically here, and every collective of the context runs under real torchrun."""
import ast
import json
from pathlib import Path

import pytest
from conftest import ROOT, torchrun

PACKAGES = ("pipeline", "clustering", "training", "launch")
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
    "all_to_all", "all_to_all_single", "gather", "gather_object", "scatter", "scatter_object_list",
    "reduce", "send", "recv", "isend", "irecv", "batch_isend_irecv", "_all_gather_base",
    "_reduce_scatter_base",
}
# The only direct callers allowed: the context itself, and the autograd Functions whose forward
# and backward are collectives (their backward runs inside autograd, with tensors already on
# the device of the forward's inputs).
ALLOWED_FILES = {"pipeline/core/dist.py"}
AUTOGRAD_FILES = {"training/partial_fc.py", "training/loss.py"}


def _dist_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to the torch.distributed module, and collectives imported by name."""
    mods, funcs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    mods.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch":
                mods |= {a.asname or a.name for a in node.names if a.name == "distributed"}
            elif node.module == "torch.distributed":
                funcs |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    return mods, funcs


def _is_dist_module(node: ast.AST, mods: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in mods
    # torch.distributed.<fn> written out
    return (isinstance(node, ast.Attribute) and node.attr == "distributed"
            and isinstance(node.value, ast.Name) and node.value.id == "torch")


def _is_autograd_function(cls: ast.ClassDef) -> bool:
    return any((isinstance(b, ast.Attribute) and b.attr == "Function") or
               (isinstance(b, ast.Name) and b.id == "Function") for b in cls.bases)


def direct_collective_calls(path: Path, allow_autograd: bool) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods, funcs = _dist_names(tree)
    found = []

    def visit(node: ast.AST, inside_fn: bool) -> None:
        if isinstance(node, ast.ClassDef) and allow_autograd and _is_autograd_function(node):
            inside_fn = True
        if isinstance(node, ast.Call) and not inside_fn:
            f = node.func
            if ((isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and _is_dist_module(f.value, mods))
                    or (isinstance(f, ast.Name) and f.id in funcs)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(f)}(...)")
        for child in ast.iter_child_nodes(node):
            visit(child, inside_fn)
    visit(tree, False)
    return found


def test_rule_checker_sees_every_spelling(tmp_path):
    """The checker itself: aliases, from-imports and the full dotted name are caught; an
    autograd Function is allowed only where allowed."""
    src = ("import torch\nimport torch.distributed as d\nfrom torch import distributed as dd\n"
           "from torch.distributed import all_reduce as ar, barrier\n"
           "d.all_reduce(x)\ndd.broadcast(x, 0)\nar(x)\nbarrier()\ntorch.distributed.all_gather(a, x)\n"
           "d.get_rank()\nd.ReduceOp.SUM\n"
           "class F(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x):\n"
           "        d.all_reduce(x)\n        return x\n")
    p = ROOT / "tests" / f"_tmp_rule_{tmp_path.name}.py"
    try:
        p.write_text(src)
        strict = direct_collective_calls(p, allow_autograd=False)
        loose = direct_collective_calls(p, allow_autograd=True)
    finally:
        p.unlink()
    assert [s.split(": ", 1)[1] for s in strict] == [
        "d.all_reduce(...)", "dd.broadcast(...)", "ar(...)", "barrier(...)",
        "torch.distributed.all_gather(...)", "d.all_reduce(...)"]
    assert len(loose) == 5


def test_no_direct_collectives_outside_dist_context():
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED_FILES:
                continue
            offenders += direct_collective_calls(path, allow_autograd=rel in AUTOGRAD_FILES)
    assert not offenders, ("torch.distributed collectives called directly (use the DistContext "
                           "methods in pipeline/core/dist.py, which stage tensors on ctx.device):\n  "
                           + "\n  ".join(offenders))


COLLECTIVE_SCRIPT = """
import json, os, sys
import torch
from pipeline.core.dist import init_distributed, destroy
ctx = init_distributed()
r, w = ctx.rank, ctx.world_size
out = {"backend": ctx.backend, "comm_device": str(ctx.comm_device)}
devs = ["cpu", str(ctx.device)]   # a CPU tensor and a device tensor (the same here under gloo)
for dev in devs:
    t = torch.tensor([r + 1.0, -r], device=dev)
    out[f"sum_{dev}"] = ctx.all_reduce_(t).tolist()
    out[f"sum_same_obj_{dev}"] = ctx.all_reduce_(t.clone(), "sum").device.type == torch.device(dev).type
    out[f"max_{dev}"] = ctx.all_reduce_(torch.tensor([r], device=dev), "max").tolist()
    out[f"min_{dev}"] = ctx.all_reduce_(torch.tensor([r + 5], device=dev), "min").tolist()
    out[f"avg_{dev}"] = ctx.all_reduce_(torch.tensor([2.0 * r], device=dev), "avg").tolist()
    out[f"i64_{dev}"] = ctx.all_reduce_(torch.tensor([2**40 + r], dtype=torch.int64, device=dev)).tolist()
    g = ctx.all_gather(torch.full((2, 3), float(r), device=dev))
    out[f"gather_{dev}"] = [g.shape[0], g[:, 0].tolist(), g.device.type]
    rs = ctx.reduce_scatter(torch.arange(2.0 * w, device=dev) * (r + 1))
    out[f"rs_{dev}"] = rs.tolist()
    b = ctx.broadcast_(torch.tensor([10.0 * r, 1.0], device=dev), src=w - 1)
    out[f"bcast_{dev}"] = b.tolist()
ctx.barrier()
out["objs"] = ctx.all_gather_object({"rank": r})
out["bobj"] = ctx.broadcast_object({"from": r} if r == 1 else None, src=1)
try:
    ctx.reduce_scatter(torch.zeros(2 * w + 1))
    out["rs_error"] = None
except ValueError as e:
    out["rs_error"] = str(e)
open(os.path.join(sys.argv[1], f"r{r}.json"), "w").write(json.dumps(out))
destroy(ctx)
"""


@pytest.mark.slow
def test_every_collective_of_the_context_under_torchrun(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVE_SCRIPT)
    torchrun([str(script), str(tmp_path)], nproc=2, timeout=300)
    for r in range(2):
        o = json.loads((tmp_path / f"r{r}.json").read_text())
        assert o["backend"] == "gloo" and o["comm_device"] == "cpu"
        for dev in ("cpu",):
            assert o[f"sum_{dev}"] == [3.0, -1.0] and o[f"sum_same_obj_{dev}"]
            assert o[f"max_{dev}"] == [1] and o[f"min_{dev}"] == [5] and o[f"avg_{dev}"] == [1.0]
            assert o[f"i64_{dev}"] == [2**41 + 1]
            assert o[f"gather_{dev}"] == [4, [0.0, 0.0, 1.0, 1.0], "cpu"]
            # sum over ranks of arange(4) * (rank + 1) = 3 * arange(4); rank r keeps block r
            assert o[f"rs_{dev}"] == [[0.0, 3.0], [6.0, 9.0]][r]
            assert o[f"bcast_{dev}"] == [10.0, 1.0]
        assert o["objs"] == [{"rank": 0}, {"rank": 1}] and o["bobj"] == {"from": 1}
        assert "must divide by the world size" in o["rs_error"]
