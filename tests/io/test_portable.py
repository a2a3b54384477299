"""A saved compressed folder names a model type of ours, so plain transformers refuses it without
trust_remote_code=True (never a dense Llama with random weights) and loads it with the flag, in a Python that cannot
import this project: the compressed parameter count, the project loader's logits, greedy generation, AutoModel,
pipeline, device_map="auto" and sharded safetensors. The project's loader reads folders saved before that model
type too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from dipsvd_core.io.compressed import load_compressed, save_compressed
from dipsvd_core.io.portable import CONFIG_FILE, MODELING_FILE
from dipsvd_core.model.models import count_params
from dipsvd_core.run.pipeline import Settings, Workbench

# Run with `python -I` from an empty folder: no PYTHONPATH, no current directory on sys.path, no user site.
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

    try:
        import dipsvd_core  # noqa: F401
        sys.exit("dipsvd_core is importable here; the check needs a Python without it")
    except ImportError:
        pass
    folder, ids_file, out = sys.argv[1:4]
    refusals = {}
    for name, load in (("causal", lambda: AutoModelForCausalLM.from_pretrained(folder)),
                       ("auto", lambda: AutoModel.from_pretrained(folder)),
                       ("pipeline", lambda: pipeline("text-generation", model=folder))):
        try:
            load()
            refusals[name] = "loaded"
        except ValueError as e:
            refusals[name] = str(e)
    ids = torch.tensor(json.load(open(ids_file)))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    code = sys.modules[type(model).__module__]  # the folder's modeling file: its u layout hands the old pages back
    handed, hand_back = [], code._drop_file_pages
    code._drop_file_pages = lambda w, maps: handed.append(hand_back(w, maps)) or handed[-1]
    mapped = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                  device_map="auto")
    code._drop_file_pages = hand_back
    base = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    pipe = pipeline("text-generation", model=folder, trust_remote_code=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    prompt = tok.decode(ids[0, :8])
    with torch.no_grad():
        tensors = {"logits": model(ids).logits, "mapped": mapped(ids).logits, "hidden": base(ids).last_hidden_state,
                   "generated": model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    text = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    print()  # after transformers' unanswered prompt, which has no newline
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "class": type(model).__name__,
                      "base_class": type(base).__name__, "refusals": refusals, "prompt": prompt, "pipeline": text,
                      "backend_compatible": type(base).is_backend_compatible(),
                      "low_rank": sum(type(m).__name__ == "LowRankLinear" for m in model.modules()),
                      "fused": sum(getattr(m, "siblings", None) is not None for m in model.modules()),
                      "column_major": sum(m.u.weight.stride(0) == 1 for m in model.modules()
                                          if type(m).__name__ == "LowRankLinear"),
                      "handed_back": handed}))
""")


def run_isolated(script: str, *args, tmp_path) -> subprocess.CompletedProcess:
    """`script` in a Python that cannot import this project (-I, an empty folder), offline, with its own hub
    cache and no terminal to answer transformers' trust_remote_code prompt."""
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-I", "-c", script, *map(str, args)], cwd=empty, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def bench(tiny_lm):
    return Workbench(tiny_lm, "wiki", calib_windows=4, seqlen=64, seed=0)


def test_plain_transformers_refuses_without_the_flag_and_loads_with_it(tiny_lm, bench, tmp_path):
    res = bench.build(Settings(method="dipsvd", ratio=0.25))
    out = save_compressed(res.model, tmp_path / "saved", tiny_lm.tokenizer, {"method": "dipsvd"},
                          max_shard_size="300KB")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_dipsvd.DipSVDConfig",
                                  "AutoModel": "modeling_dipsvd.DipSVDModel",
                                  "AutoModelForCausalLM": "modeling_dipsvd.DipSVDForCausalLM"}
    assert config["model_type"] == "dipsvd_llama" and config["architectures"] == ["DipSVDForCausalLM"]
    entry = config["dipsvd_compression"]
    assert entry["portable"] is True
    assert entry["base"] == {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert (out / MODELING_FILE).is_file() and (out / CONFIG_FILE).is_file()
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1  # sharded
    ours = load_compressed(out)
    ids = bench.windows()[:2, :24]
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    proc = run_isolated(CHILD, out, tmp_path / "ids.json", tmp_path / "child.safetensors", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, message in info["refusals"].items():  # loud, naming the flag, for every entry point
        assert "trust_remote_code=True" in message, (name, message)
    child = load_file(tmp_path / "child.safetensors")
    assert info["class"] == "DipSVDForCausalLM" and info["base_class"] == "DipSVDModel"
    assert info["backend_compatible"] is True  # what vLLM's Transformers backend asks of auto_map's AutoModel
    assert info["low_rank"] == len(entry["ranks"]) > 0
    assert info["fused"] == sum(map(len, entry["siblings"])) > 0  # the listed siblings fused in plain transformers
    assert info["column_major"] == len(entry["ranks"])  # every u factor laid out for the CPU's products there too
    # and the old layout's pages of the mapped file handed back, where a u spans a whole page
    assert len(info["handed_back"]) == len(entry["ranks"])
    assert sum(info["handed_back"]) > 0 or sys.platform != "linux"
    assert info["params"] == count_params(ours.model) == count_params(res.model) < count_params(tiny_lm.model)
    with torch.no_grad():
        logits = ours.model(ids).logits
        hidden = ours.model.model(ids).last_hidden_state
        generated = ours.model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert torch.allclose(child["logits"], logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(child["mapped"], logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(child["hidden"], hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(child["generated"], generated)
    expected = ours.tokenizer.decode(ours.model.generate(ours.tokenizer(info["prompt"], return_tensors="pt").input_ids,
                                                         max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True)
    assert info["pipeline"] == expected != info["prompt"]


def save_the_old_way(model, folder, tokenizer, info: dict) -> None:
    """A folder as save_compressed wrote it before our model type: the base's config.json (model type llama) with
    the entry and an auto_map of AutoModelForCausalLM alone, the weights, the tokenizer."""
    from dipsvd_core.lowrank.surgery import module_ranks

    cfg = model.config
    cfg.dipsvd_compression = dict(info, ranks=module_ranks(model), portable=True)
    cfg.auto_map = {"AutoModelForCausalLM": "modeling_dipsvd.DipSVDForCausalLM"}
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        del cfg.dipsvd_compression, cfg.auto_map
    tokenizer.save_pretrained(folder)


def test_folders_saved_before_our_model_type_still_load(tiny_lm, bench, tmp_path):
    from dipsvd_core.run.loading import load_model

    res = bench.build(Settings(method="svd-llm", ratio=0.3))
    save_the_old_way(res.model, tmp_path / "old", tiny_lm.tokenizer, {"method": "svd-llm"})
    assert json.loads((tmp_path / "old" / "config.json").read_text())["model_type"] == "llama"
    new = save_compressed(res.model, tmp_path / "new", tiny_lm.tokenizer, {"method": "svd-llm"})
    ids = bench.windows()[:2, :32]
    with torch.no_grad():
        want = res.model(ids).logits
        for folder in (tmp_path / "old", new):
            lm = load_model(str(folder), device="cpu", dtype="float32")
            assert count_params(lm.model) == count_params(res.model)
            assert type(lm.model).__name__ == "LlamaForCausalLM"
            assert torch.allclose(lm.model(ids).logits, want, atol=1e-6, rtol=1e-6)


REMAP_CHILD = textwrap.dedent("""
    import json, sys
    from transformers import AutoModelForCausalLM

    out = {}
    for flag in (False, True):
        try:
            AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=flag)
            out[str(flag)] = "loaded"
        except ValueError as e:
            out[str(flag)] = str(e)
    print()
    print(json.dumps(out))
""")


def test_a_remapped_folder_refuses_in_plain_transformers_and_says_why(tiny_lm, bench, tmp_path):
    res = bench.build(Settings(method="svd", ratio=0.5))
    out = save_compressed(res.model, tmp_path / "r", tiny_lm.tokenizer, {"method": "svd", "remap": True})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dipsvd_llama" and config["architectures"] == ["DipSVDForCausalLM"]
    assert "int8" in config["dipsvd_compression"]["portable"]
    proc = run_isolated(REMAP_CHILD, out, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "trust_remote_code=True" in said["False"]
    assert "int8" in said["True"] and "dipsvd_core" in said["True"]
    assert count_params(load_compressed(out).model) == count_params(res.model)  # our loader dequantizes it


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
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
        refusal = "loaded"
    except ValueError as e:
        refusal = str(e)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for window in json.load(open(sys.argv[2])):
            ids = torch.tensor([window])
            logits = model(ids).logits.float()
            nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    print()
    print(json.dumps({"ppl": math.exp(nll / n), "params": sum(p.numel() for p in model.parameters()),
                      "refusal": refusal}))
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


def test_modeling_file_imports_only_torch_transformers_and_the_standard_library(tiny_lm, bench, tmp_path):
    import ast

    out = save_compressed(bench.build(Settings(method="svd", ratio=0.5)).model, tmp_path / "m", tiny_lm.tokenizer)
    tree = ast.parse((out / MODELING_FILE).read_text())
    roots = {n.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) or
             isinstance(node, ast.ImportFrom) and node.level == 0
             for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])}
    assert roots - sys.stdlib_module_names == {"torch", "transformers"}
    assert roots & sys.stdlib_module_names == {"ctypes", "mmap"}  # the hand-back of the mapped file's pages
    local = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert local == {CONFIG_FILE.removesuffix(".py")}  # its only neighbour, which imports transformers alone
    config_tree = ast.parse((out / CONFIG_FILE).read_text())
    assert {node.module for node in ast.walk(config_tree) if isinstance(node, ast.ImportFrom)} == {"transformers"}


@pytest.mark.slow
def test_the_bundled_model_saved_by_compress_loads_in_plain_transformers(smollm, tmp_path):
    from dipsvd_core.engine.data import evaluation_windows
    from dipsvd_core.engine.evaluate import perplexity

    out, report = tmp_path / "smol", tmp_path / "r.json"
    # plain SVD in float32: no statistics, and the factors in a third of svd-llm's float64 time (65 s to 25 s on one
    # thread); the saved format is every factor method's
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", "compress", "--model", "smollm2-135m", "--method",
                           "svd", "--compute-dtype", "float32", "--ratio", "0.2", "--calib-windows", "4", "--seqlen",
                           "128", "--eval", "wiki",
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
                           cwd=empty, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert "trust_remote_code=True" in got["refusal"]  # never a dense model with random weights
    assert got["params"] == r["params"]["total_after"] < r["params"]["total_before"]
    ours = perplexity(load_compressed(out).model, windows)
    assert got["ppl"] == pytest.approx(ours, rel=1e-3)
