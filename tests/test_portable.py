"""A saved compressed folder loads in plain transformers with trust_remote_code=True, in a Python that cannot import
this project: the compressed parameter count, the project loader's logits, greedy generation, device_map="auto"
and sharded safetensors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from dipsvd_core.compressed import load_compressed, save_compressed
from dipsvd_core.models import count_params
from dipsvd_core.pipeline import Settings, Workbench
from dipsvd_core.portable import MODELING_FILE

# Run with `python -I` from an empty folder: no PYTHONPATH, no current directory on sys.path, no user site.
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    try:
        import dipsvd_core  # noqa: F401
        sys.exit("dipsvd_core is importable here; the check needs a Python without it")
    except ImportError:
        pass
    folder, ids_file, out = sys.argv[1:4]
    ids = torch.tensor(json.load(open(ids_file)))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    mapped = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                  device_map="auto")
    with torch.no_grad():
        tensors = {"logits": model(ids).logits, "mapped": mapped(ids).logits,
                   "generated": model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "class": type(model).__name__,
                      "low_rank": sum(type(m).__name__ == "LowRankLinear" for m in model.modules())}))
""")


@pytest.fixture(scope="module")
def bench(tiny_lm):
    return Workbench(tiny_lm, "wiki", calib_windows=4, seqlen=64, seed=0)


def test_plain_transformers_loads_the_saved_folder(tiny_lm, bench, tmp_path):
    res = bench.build(Settings(method="dipsvd", ratio=0.25))
    out = save_compressed(res.model, tmp_path / "saved", tiny_lm.tokenizer, {"method": "dipsvd"},
                          max_shard_size="300KB")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_dipsvd.DipSVDForCausalLM"}
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dipsvd_compression"]["portable"] is True
    assert (out / MODELING_FILE).is_file() and (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded
    ours = load_compressed(out)
    ids = bench.windows()[:2, :24]
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, str(out), str(tmp_path / "ids.json"),
                           str(tmp_path / "child.safetensors")], cwd=empty, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    child = load_file(tmp_path / "child.safetensors")
    assert info["class"] == "DipSVDForCausalLM"
    assert info["low_rank"] == len(config["dipsvd_compression"]["ranks"]) > 0
    assert info["params"] == count_params(ours.model) == count_params(res.model) < count_params(tiny_lm.model)
    with torch.no_grad():
        logits = ours.model(ids).logits
        generated = ours.model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert torch.allclose(child["logits"], logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(child["mapped"], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(child["generated"], generated)


def test_a_remapped_folder_says_why_it_is_not_portable(tiny_lm, bench, tmp_path):
    res = bench.build(Settings(method="svd", ratio=0.5))
    out = save_compressed(res.model, tmp_path / "r", tiny_lm.tokenizer, {"method": "svd", "remap": True})
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and not (out / MODELING_FILE).exists()
    assert "int8" in config["dipsvd_compression"]["portable"]


# The bundled model through the CLI, perplexity in the child: exp of the mean next-token loss over the windows.
PPL_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])  # run with -S: the minimal site is the only one
    import json, math
    try:
        import accelerate  # noqa: F401
        sys.exit("accelerate is importable here; the check needs only torch and transformers")
    except ImportError:
        pass
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    try:
        import dipsvd_core  # noqa: F401
        sys.exit("dipsvd_core is importable here; the check needs a Python without it")
    except ImportError:
        pass
    assert not any(m in sys.modules for m in ("accelerate", "datasets", "streamlit"))
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for window in json.load(open(sys.argv[2])):
            ids = torch.tensor([window])
            logits = model(ids).logits.float()
            nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    print(json.dumps({"ppl": math.exp(nll / n), "params": sum(p.numel() for p in model.parameters())}))
""")


def minimal_site(folder) -> str:
    """A folder of links to torch, transformers and what they require (markers evaluated, no extras), and nothing
    else of this environment: the packages of a fresh environment where only those two were installed."""
    from importlib import metadata
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, seen = ["torch", "transformers"], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    site = Path(folder)
    site.mkdir()
    for name in seen:
        dist = metadata.distribution(name)
        root = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (root / top).exists() and not (site / top).exists():
                (site / top).symlink_to(root / top)
    return str(site)


def test_modeling_file_imports_only_torch_and_transformers(tiny_lm, bench, tmp_path):
    import ast

    out = save_compressed(bench.build(Settings(method="svd", ratio=0.5)).model, tmp_path / "m", tiny_lm.tokenizer)
    tree = ast.parse((out / MODELING_FILE).read_text())
    roots = {n.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])}
    assert roots == {"torch", "transformers"}


@pytest.mark.slow
def test_the_bundled_model_saved_by_compress_loads_in_plain_transformers(smollm, tmp_path):
    from dipsvd_core.data import evaluation_windows
    from dipsvd_core.evaluate import perplexity

    out, report = tmp_path / "smol", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", "compress", "--model", "smollm2-135m", "--method",
                           "svd-llm", "--ratio", "0.2", "--calib-windows", "4", "--seqlen", "128", "--eval", "wiki",
                           "--eval-tokens", "512", "--no-eval-original", "--out", str(out), "--report", str(report),
                           "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    windows = evaluation_windows(smollm.tokenizer, "news", 128, 1024)
    (tmp_path / "w.json").write_text(json.dumps(windows.tolist()))
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    site = minimal_site(tmp_path / "site")
    child = subprocess.run([sys.executable, "-I", "-S", "-c", PPL_CHILD, str(out), str(tmp_path / "w.json"), site],
                           cwd=empty, env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["params"] == r["params"]["total_after"] < r["params"]["total_before"]
    ours = perplexity(load_compressed(out).model, windows)
    assert got["ppl"] == pytest.approx(ours, rel=1e-3)
