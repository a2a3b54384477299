"""The plan: shapes from the config alone, the memory model's terms, the refusal, the CLI; and the
in-place surgery that batch runs use."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core import plan as P


@pytest.fixture(scope="module")
def config_only(tmp_path_factory, tiny_model_dir):
    """A folder that holds only the tiny model's config.json, as a user has before downloading."""
    folder = tmp_path_factory.mktemp("config-only")
    shutil.copy(f"{tiny_model_dir}/config.json", folder / "config.json")
    return folder


def test_shapes_from_the_config_alone(config_only, tiny_lm):
    config, gguf = P.load_config(str(config_only))
    sh = P.shapes_of(config)
    assert not gguf and sh.grouped_by == "meta forward"
    # Llama: q/k/v read one tensor, o another, gate/up one, down one (hidden 64, intermediate 128)
    assert sh.groups == [64, 64, 64, 128]
    assert sh.n_blocks == 2 and sh.hidden == 64
    real = [(t.block, t.out_features, t.in_features) for t in tiny_lm.targets]
    assert sh.matrices == real
    assert sh.params == sum(p.numel() for p in dict(tiny_lm.model.named_parameters()).values())


def test_memory_terms_are_the_documented_sums(config_only):
    config, _ = P.load_config(str(config_only))
    sh = P.shapes_of(config)
    run = P.run_of(method="dipsvd", allocation="uniform", refine="none", calib_windows=4, seqlen=32, ratio=0.25)
    runtime = 1000
    ph = P.memory(sh, run, cuda=False, runtime=runtime)
    weights = sh.params * 4
    # disk: every factor at full rank r = min(out, in): ut (r, out) and vs (r, in) in float32, sigma in float64
    assert ph["factors"].disk_bytes == sum(min(o, i) * (o + i) * 4 + min(o, i) * 8 for _, o, i in sh.matrices)
    # safetensors saved in the run's dtype are mapped on the CPU: loading copies none of them; at another dtype it
    # converts every weight; drawing the calibration windows tokenizes the text at once (P.DRAW_BYTES, measured)
    assert sh.stored_dtype == run.dtype == "float32" and P.DRAW_BYTES == 170 * 2**20
    assert ph["load"].host_bytes == runtime + P.DRAW_BYTES and ph["load"].device_bytes == 0
    converted = P.memory(sh, run.replace(dtype="bfloat16"), cuda=False, runtime=runtime)["load"]
    assert converted.host_bytes == runtime + P.DRAW_BYTES + sh.params * 2
    # save (compress --out): the compressed model (converted in place) and its largest tensor's bytes, the
    # embeddings here
    assert not ph["save"].needed
    saved = P.memory(sh, run.replace(save=True), cuda=False, runtime=runtime)["save"]
    kept = int(0.75 * sh.targeted)
    assert saved.needed and saved.host_bytes == runtime + (sh.params - sh.targeted + kept) * 4 + 49152 * 64 * 4
    # statistics: weights + activations + one block's float64 Grams (+ the output Gram and a window's product)
    grams = 8 * (3 * 64 ** 2 + 128 ** 2) + 8 * 64 ** 2 + 12 * 128 ** 2
    window = 32 * (4 * 64 + 3 * 128) * 4 + 4 * 32 * 32 * 4
    acts = 4 * 32 * 64 * 4 + 4 * 2 * 32 * 16 * 4 * 2 + window
    assert ph["statistics"].host_bytes == runtime + weights + acts + grams
    # bfloat16 factors halve the stored matrices (sigma stays float64)
    half = P.memory(sh, run.replace(factor_dtype="bfloat16"), False, runtime)["factors"].disk_bytes
    assert half == sum(min(o, i) * (o + i) * 2 + min(o, i) * 8 for _, o, i in sh.matrices)
    # Fisher is only needed by the allocations and the method that use it
    assert not ph["fisher"].needed
    assert P.memory(sh, run.replace(allocation="heuristic"), False, runtime)["fisher"].needed
    # refine: two activation sets and the compressed path's block inputs again (the held-out check), one block's
    # inputs of every group, the attention's output, one group's G^, C and numerator
    # (fit and held-out parts and their sum) and the original X X^T of both parts, its factoring, and every
    # refined factor on the host; only needed when asked for
    assert not ph["refine"].needed
    ref = P.memory(sh, run.replace(refine="sequential"), False, runtime)["refine"]
    factoring = max(2 * 128 ** 2 + 6 * 64 * 128, 5 * 128 ** 2) * 8 + sum(
        min(o, i) * (o + i) * 4 + min(o, i) * 8 for b, o, i in sh.matrices if b == 0)
    kept = int(0.75 * sh.targeted) * 4
    # the groups q/k/v, o, gate/up (64 wide; down's X is not kept: it writes the residual), and the attention's
    # output (64); the three sets share one set of kwargs (rotary) and run one window at a time
    taken = 4 * 32 * (3 * 64 + 64) * 4
    one_set = 4 * 32 * 64 * 4
    assert ref.needed and ref.host_bytes == (runtime + weights + (acts - one_set) + 3 * one_set + taken
                                             + 5 * 8 * 128 ** 2 + 8 * 64 * 128 + factoring + kept)
    # on a GPU the three sets and the groups' X wait on the host: one window's of them on the device
    gpu = P.memory(sh, run.replace(refine="sequential"), True, runtime)["refine"]
    assert gpu.host_bytes == runtime + kept + 3 * one_set + taken
    assert gpu.device_bytes == ref.host_bytes - runtime - kept - (3 * one_set + taken) * 3 // 4
    # a refined build starts from the unrefined factors (a block keeps them where refining does not pay), so it
    # runs the statistics and the factor pass whatever the allocation
    refined = {a: P.memory(sh, run.replace(refine="sequential", allocation=a), False, runtime)
               for a in ("uniform", "heuristic", "nested")}
    assert [(a, ph["statistics"].needed, ph["factors"].needed) for a, ph in refined.items()] == [
        ("uniform", True, True), ("heuristic", True, True), ("nested", True, True)]
    # refine "block" adds its tuning's time (forward and backward passes); its memory (the block's float32 masters,
    # their gradients and AdamW's two moments, and one window's autograd) is counted beyond the group's factoring
    for T in (run.seqlen, 512):
        block, seq = (P.memory(sh, run.replace(refine=r, seqlen=T), False, runtime)["refine"]
                      for r in ("block", "sequential"))
        layer_saved = T * (10 * sh.hidden + 4 * sh.window_width) * 4 + sh.heads * T * T * 4
        assert block.host_bytes == seq.host_bytes + max(0, 16 * sh.block_params + layer_saved - factoring)
    assert block.host_bytes > seq.host_bytes  # at 512 tokens a window the autograd outgrows the factoring
    assert ph["statistics"].needed and ph["factors"].needed  # unrefined uniform dipsvd: both


def test_plan_on_cuda_splits_host_and_device(config_only):
    config, _ = P.load_config(str(config_only))
    sh = P.shapes_of(config)
    run = P.run_of(dtype="bfloat16")
    gpu = P.memory(sh, run, cuda=True, runtime=0)
    off = P.memory(sh, run.replace(offload=True), cuda=True, runtime=0)
    weights = sh.params * 2
    assert gpu["statistics"].device_bytes > weights and gpu["statistics"].host_bytes == 0
    # offload, every block streamed: the blocks on the host and the pinned copy of the one sent ahead; the
    # embeddings, the head, the block computing and the next one (sent ahead, offload.Ahead) on the device
    block = sh.block_params * 2
    blocks = sh.n_blocks * block
    assert sh.n_blocks == 2
    assert off["statistics"].host_bytes == blocks + block
    assert off["statistics"].device_bytes == gpu["statistics"].device_bytes - blocks + 2 * block
    # of the 2 blocks, 1 kept on the device and 1 on disk: that block on the device instead of ahead, none on the
    # host but the staging copy, 1 in the offload folder; both on the device: none streams, the same device bytes
    kept = P.memory(sh, run.replace(offload=True, device_blocks=1, disk_blocks=1), cuda=True, runtime=0)
    assert kept["statistics"].device_bytes == off["statistics"].device_bytes
    assert kept["statistics"].host_bytes == block
    assert kept["load"].disk_bytes == off["load"].disk_bytes + sh.block_params * 2
    every = P.memory(sh, run.replace(offload=True, device_blocks=2), cuda=True, runtime=0)
    assert every["statistics"].device_bytes == kept["statistics"].device_bytes
    # Fisher on a GPU: every block's saved inputs wait in host memory, one block's come back to the device
    heur = run.replace(allocation="heuristic")
    fisher, on_cpu = P.memory(sh, heur, cuda=True, runtime=0)["fisher"], P.memory(sh, heur, cuda=False, runtime=0)["fisher"]
    one = run.calib_windows * run.seqlen * sh.hidden * 2
    assert fisher.host_bytes == (sh.n_blocks + 1) * one
    assert fisher.device_bytes == on_cpu.host_bytes - sh.n_blocks * one


def test_predicted_factor_disk_matches_the_store(tiny_lm):
    """The plan's factor disk against the files the engine writes (safetensors headers aside)."""
    from dipsvd_core.run.pipeline import Settings, Workbench

    config, _ = P.load_config(tiny_lm.source)
    sh = P.shapes_of(config)
    bench = Workbench(tiny_lm, "wiki", 4, 64)
    factors = bench.factors(Settings(method="svd-llm").spec)
    files = {f.file for f in factors.values()}
    written = sum(__import__("os").path.getsize(f) for f in files)
    predicted = P.memory(sh, P.run_of(method="svd-llm"), False, 0)["factors"].disk_bytes
    assert predicted <= written <= predicted * 1.05


def test_refusal_names_the_option_that_fits(config_only, monkeypatch):
    run = P.run_of(calib_windows=8192, seqlen=256)  # the activations dominate
    plan = P.make_plan(str(config_only), "cpu", run, bench=False)
    # the runtime: this process's imports (over 100 MB with torch and transformers) and the tokenizer of this
    # vocabulary (2.7 KB an entry), the modeling code and the calibration text (121 MB)
    overhead = 2_700 * plan.shape.vocab + 121 * 2**20
    assert P.run_overhead(plan.shape) == overhead and plan.runtime_bytes > overhead + 100 * 2**20
    half = P.memory(plan.shape, run.replace(calib_windows=4096), False, plan.runtime_bytes)
    plan.free_host_bytes = max(p.host_bytes for p in half.values() if p.needed) + 1
    assert plan.peak_host_bytes > plan.free_host_bytes
    with pytest.raises(DipSVDError, match=r"does not fit: predicted peak host memory .* --calib-windows 4096 would fit"):
        P.check_fits(plan)
    plan.free_host_bytes = 1
    with pytest.raises(DipSVDError, match="no single option makes it fit"):
        P.check_fits(plan)
    plan.free_host_bytes = plan.peak_host_bytes
    P.check_fits(plan)  # exactly enough: no error


def test_microbenchmark_times_every_phase(config_only):
    plan = P.make_plan(str(config_only), "cpu", P.run_of(calib_windows=2, seqlen=64, calib="mix:wiki=1,self=1"),
                       bench=True)
    for name, phase in plan.phases.items():
        assert phase.seconds is not None and phase.seconds >= 0, name
    assert plan.phases["statistics"].seconds > 0 and plan.phases["evaluation"].seconds > 0
    assert plan.phases["writing"].needed and plan.phases["writing"].seconds > 0


def test_the_microbenchmark_times_a_decode_step_and_the_sampling(config_only, llama8b_config):
    """The writing phase's rates: one block's decode step for a group against a key/value cache, and the group's
    top-p sampling over the whole vocabulary; the cache counted at the key/value heads' width (Llama-3-8B: 8 x 128)."""
    config, _ = P.load_config(str(config_only))
    sh = P.shapes_of(config)
    r = P.microbenchmark(config, sh, P.run_of(seqlen=64, calib="mix:wiki=1,self=1"), torch.device("cpu"))
    assert r.decode_block_s > 0 and r.sample_s > 0
    quiet = P.microbenchmark(config, sh, P.run_of(seqlen=64, calib="wiki"), torch.device("cpu"))
    assert quiet.decode_block_s is None and quiet.sample_s == 0  # a run that writes no text times neither
    assert P.shapes_of(P.load_config(llama8b_config)[0]).kv_width == 8 * 128


def test_cli_plan_json_on_a_config_only_folder(config_only):
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", "plan", "--model", str(config_only), "--json",
                           "--no-bench", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["phases"]) == set(P.phases_in_order())
    for phase in out["phases"].values():
        assert set(phase) >= {"host_bytes", "device_bytes", "disk_bytes", "seconds"}
    assert out["peak_host_bytes"] == max(p["host_bytes"] for p in out["phases"].values() if p["needed"])
    assert out["disk_bytes"] > 0 and out["peak_device_bytes"] == 0


def test_cli_plan_for_a_gpu_without_one(config_only):
    """A user plans a GPU run from a laptop: memory predicted, time not."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", "plan", "--model", str(config_only), "--device",
                           "cuda", "--dtype", "bfloat16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here: memory is predicted, time is not" in proc.stdout


def test_compress_refuses_up_front(tiny_model_dir):
    """A run the plan says will not fit stops before loading anything, with one line naming the fix."""
    code = ("import sys; from dipsvd_core.plan import plan; plan.free_host_bytes = lambda: 1; "
            "from dipsvd_core.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "compress", "--model", tiny_model_dir, "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: this run does not fit: predicted peak host memory" in proc.stderr
    assert "--ignore-plan" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_of_a_compressed_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dipsvd_compression": {"ranks": {}}}))
    from dipsvd_core.io.compressed import is_compressed_folder

    if not is_compressed_folder(tmp_path):
        pytest.skip("compressed folders are recognised by other files")
    with pytest.raises(DipSVDError, match="compressed model already"):
        P.load_config(str(tmp_path))


def test_inplace_surgery_equals_the_copy_and_releases_the_dense_pages(tiny_model_dir, monkeypatch):
    """compress --no-eval-original converts the loaded model itself; same model, and the replaced
    matrices' file-mapped pages are released."""
    from dipsvd_core.engine.evaluate import perplexity
    from dipsvd_core.lowrank import surgery
    from dipsvd_core.run.loading import load_model
    from dipsvd_core.run.pipeline import Settings, Workbench

    settings = Settings(method="svd-llm", ratio=0.3)
    lm = load_model(tiny_model_dir, "cpu", "float32")
    bench = Workbench(lm, "wiki", 4, 64)
    ev = bench.eval_windows("wiki", 512)
    copy = bench.build(settings)
    ref = perplexity(copy.model, ev)
    original = perplexity(lm.model, ev)

    lm2 = load_model(tiny_model_dir, "cpu", "float32")
    released = []
    real = surgery._drop_file_pages
    monkeypatch.setattr(surgery, "_drop_file_pages",
                        lambda w, m: released.append((tuple(w.shape), real(w, m))) or released[-1][1])
    bench2 = Workbench(lm2, "wiki", 4, 64)
    res = bench2.build(settings, inplace=True)
    assert res.model is lm2.model
    assert perplexity(res.model, ev) == pytest.approx(ref, rel=1e-6)
    assert perplexity(lm.model, ev) == original  # the copy path left its original alone
    factored = [n for n, k in res.allocation.ranks.items() if k is not None]
    dense = [b for shape, b in released if shape in {tuple(lm.model.get_submodule(n).weight.shape) for n in factored}
             and b > 0]  # the dense matrices' pages (the u factors laid out after are no file's: 0 bytes)
    assert len(dense) == len(factored)
    with pytest.raises(DipSVDError, match="converted in place"):
        bench2.build(settings)



def test_a_memory_budget_replaces_the_free_memory_the_plan_is_checked_against(config_only, llama8b_config,
                                                                              monkeypatch):
    """--device-memory / --host-memory: the plan is checked against the budget, not what is free now; a budget
    that fits passes, one below the peak is refused naming an option that would fit. (Offloaded, a GPU holds the
    block computing and the next one sent ahead: for the tiny 2-block model that is all of it, so offload cannot
    help there, and no single option does.) The cache folder's free disk is set to 1 TiB, so the outcome does not
    hang on the test machine's disk (8B's factors need about 36 GiB there)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 0, 2**40))
    run = P.run_of(dtype="bfloat16", calib_windows=8, seqlen=64, allocation="uniform", refine="none")
    for config, fix in ((config_only, "no single option makes it fit"), (llama8b_config, "would fit")):
        plan = P.make_plan(str(config), "cuda", run, bench=False, budgets={"device": 2**40, "host": 2**40})
        assert plan.free_device_bytes == plan.free_host_bytes == 2**40
        assert any("the budget --device-memory" in n for n in plan.notes)
        P.check_fits(plan)
        tight = P.make_plan(str(config), "cuda", run, bench=False,
                            budgets={"device": plan.peak_device_bytes - 1, "host": 2**40})
        with pytest.raises(DipSVDError, match=f"predicted peak device memory .*{fix}"):
            P.check_fits(tight)


@pytest.fixture(scope="module")
def llama8b_config(tmp_path_factory):
    """Llama-3-8B's config.json (its shapes; no weights)."""
    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp("llama-3-8b")
    AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("device_gib,host_gib", [(24, 64), (24, 20), (40, 64), (80, 64)])
def test_offload_places_blocks_by_the_budgets(llama8b_config, device_gib, host_gib):
    """The best path at 8B in bfloat16: as many blocks stay on the GPU as the device budget leaves room for beside
    the working set, the others go to the host while it holds them, the rest to disk. The plan then fits both
    budgets, and one block more on the GPU would not."""
    run = P.run_of(dtype="bfloat16", offload=True, method="dipsvd", allocation="nested", refine="sequential")
    budgets = {"device": device_gib * P.GiB, "host": host_gib * P.GiB}
    plan = P.make_plan(llama8b_config, "cuda", run, bench=False, budgets=budgets)
    at = plan.placement
    assert at.device + at.host + at.disk == 32 and plan.run.device_blocks == at.device
    assert plan.peak_device_bytes <= budgets["device"]
    block = plan.shape.block_params * 2
    if at.device < 32:
        more = P.memory(plan.shape, plan.run.replace(device_blocks=at.device + 1), True, plan.runtime_bytes)
        # the CUDA context and workspaces (plan.DEVICE_RUNTIME) count beside the phases' tensors
        assert plan.device_runtime_bytes == P.DEVICE_RUNTIME == P.GiB
        # and the placement leaves DEVICE_HEADROOM of the budget free beyond them
        assert max(p.device_bytes for p in more.values() if p.needed) + P.DEVICE_RUNTIME + P.DEVICE_HEADROOM \
            > budgets["device"]
        assert plan.peak_device_bytes + P.DEVICE_HEADROOM <= budgets["device"]
    if at.disk:
        assert plan.peak_host_bytes <= budgets["host"] < plan.peak_host_bytes + block
        assert plan.phases["load"].disk_bytes >= at.disk * block
    # the device side does not depend on this process's runtime (the host side does: it is measured)
    # 24 GiB: 1 before refine let go of two sums, 5 before the next block was sent ahead (one block more streamed)
    assert at.device == {24: 4, 40: 32, 80: 32}[device_gib]
    assert (at.disk > 0) == (host_gib == 20)


@pytest.mark.parametrize("n, gib_digits, text", [
    (0, 1, "0 B"), (1023, 1, "1023 B"), (1024, 1, "1.0 KiB"), (64 * 2**10, 2, "64.0 KiB"),
    (1536 * 2**10, 1, "1.5 MiB"), (2**30 * 7.256, 2, "7.26 GiB"), (2**30 * 7.256, 1, "7.3 GiB"),
    (-3 * 2**20, 1, "-3.0 MiB"),
])
def test_binary_size_takes_the_largest_unit_of_at_least_one(n, gib_digits, text):
    assert P.binary_size(n, gib_digits) == text
    if n > 0 and not text.endswith(" B"):  # and memory_size reads it back to within its rounding
        assert P.memory_size(text.replace(" ", "")) == pytest.approx(n, rel=0.01)


def test_free_device_memory_is_read_after_the_cached_blocks_are_given_back(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: calls.append("mem_get_info") or (7 * P.GiB, 0))
    assert P.free_device_bytes(torch.device("cuda")) == 7 * P.GiB
    assert calls == ["empty_cache", "mem_get_info"]


def test_an_offloaded_in_place_build_counts_its_pairs_and_the_cuda_runtime(llama8b_config):
    """Llama-3-8B, best path, 24 GiB, offloaded: after surgery every streamed block's low-rank pair stays on the
    device (0.8 of the targeted bf16 weights of the streamed blocks, 9.96 GiB here), and the peak counts the
    CUDA context and workspaces beside the phases."""
    run = P.run_of(dtype="bfloat16", offload=True, method="dipsvd", allocation="nested", refine="sequential")
    plan = P.make_plan(llama8b_config, "cuda", run, bench=False, budgets={"device": 24 * P.GiB, "host": 64 * P.GiB})
    sh, streamed = plan.shape, 32 - plan.placement.device
    pairs = int(0.8 * sh.targeted) * 2 * streamed // 32
    ph = plan.phases
    assert pairs / P.GiB == pytest.approx(0.8 * 6.98e9 * 2 * streamed / 32 / P.GiB, rel=0.01)
    # evaluation: the original's turn streamed one block, the compressed one's holds the pairs instead
    assert ph["evaluation"].device_bytes - ph["load"].device_bytes >= pairs - sh.block_params * 2
    assert ph["surgery"].device_bytes > pairs
    assert plan.peak_device_bytes == max(p.device_bytes for p in ph.values() if p.needed) + P.DEVICE_RUNTIME
    assert "device left free at the peak" in plan.table()


def test_a_calibration_the_model_writes_adds_the_writing_phase(tiny_model_dir, capsys):
    """A calibration that names `self` plans the model's writing: one group's key/value cache and logits beside the
    weights, and a decode step per written token of enough groups for the self windows and the held-out ones."""
    import math

    from dipsvd_core.engine.data import mix_plan
    from dipsvd_core.engine.self_text import BATCH, NEW_TOKENS

    config, _ = P.load_config(tiny_model_dir)
    sh = P.shapes_of(config)
    run = P.Run(calib="mix:wiki=1,self=1", calib_windows=8, seqlen=128)
    plain, written = P.memory(sh, P.Run(calib="wiki"), False, 0), P.memory(sh, run, False, 0)
    assert not plain["writing"].needed and written["writing"].needed
    assert P.phases_in_order()[:3] == ("load", "writing", "statistics")
    kv_width = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert sh.kv_width == kv_width
    kv = 2 * sh.n_blocks * kv_width * BATCH * (NEW_TOKENS + 64) * 4
    assert written["writing"].host_bytes == sh.params * 4 + kv + 3 * BATCH * sh.vocab * 4
    P.timing(written, sh, run, P.Rates(1.0, 1.0, 1.0, 1.0, 1e12, 1e9))
    groups = math.ceil((mix_plan(8, {"wiki": 1, "self": 1}).count("self") + run.bo_windows) * 128 / (BATCH * NEW_TOKENS))
    step = max(sh.params * 4 / 1e9, 2 * sh.params * BATCH / 1e12)
    assert written["writing"].seconds == pytest.approx(groups * NEW_TOKENS * step)
    # with a measured decode step: every block's, the lm_head's products at the model's rate, and the sampling
    P.timing(written, sh, run, P.Rates(1.0, 1.0, 1.0, 1.0, 1e12, 1e9, model_flops=1e11, decode_block_s=0.01,
                                       sample_s=0.02))
    step = sh.n_blocks * 0.01 + 2 * BATCH * sh.hidden * sh.vocab / 1e11 + 0.02
    assert written["writing"].seconds == pytest.approx(groups * NEW_TOKENS * step)
    from dipsvd_core.cli import main  # the plan command takes the calibration too

    for calib, needed in (("mix:wiki=1,self=1", True), ("wiki", False)):
        assert main(["plan", "--model", tiny_model_dir, "--calib", calib, "--no-bench", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["phases"]["writing"]["needed"] is needed


def test_the_plan_says_what_block_tuning_trains_in_the_offloaded_blocks(llama8b_config):
    """Llama-3-8B on 24 GiB, offloaded, with block tuning: the plan names how many blocks train their factors and
    norms (the streamed ones) and how many every parameter; without tuning, or tuning the factors alone, it says nothing."""
    from dipsvd_core.refine.choices import TuneConfig

    budgets = {"device": 24 * P.GiB, "host": 64 * P.GiB}
    run = P.run_of(dtype="bfloat16", offload=True, allocation="nested", refine="block")
    plan = P.make_plan(llama8b_config, "cuda", run, bench=False, budgets=budgets)
    at = plan.placement
    assert at.host + at.disk == 32 - at.device > 0
    said = [n for n in plan.notes if n.startswith("block tuning")]
    assert said == [f"block tuning: the {32 - at.device} offloaded blocks train their low-rank factors and norms, "
                    "not their dense matrices (tuned, those would be held on the device); the "
                    f"{at.device} held blocks train every parameter"]
    for other in (run.replace(refine="sequential"), run.replace(tune=TuneConfig(scope="factors"))):
        plan = P.make_plan(llama8b_config, "cuda", other, bench=False, budgets=budgets)
        assert not [n for n in plan.notes if n.startswith("block tuning")]


def test_cli_plan_takes_the_settings_flags_compress_takes(config_only, capsys):
    """`plan` plans the run that `compress` with the same flags would make: a method's own options too (block
    tuning's epochs set refine's time), and a bad one is refused as compress refuses it."""
    from dipsvd_core.cli import main

    seconds = {}
    for epochs in ("2", "25"):
        assert main(["plan", "--model", str(config_only), "--device", "cpu", "--json", "--refine", "block",
                     "--tune-epochs", epochs, "--compensate", "outputs", "--bo-calls", "3"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["settings"]["options"]["tune"]["epochs"] == int(epochs) and out["settings"]["compensate"] == "outputs"
        seconds[epochs] = out["phases"]["refine"]["seconds"]
    assert 0 < seconds["2"] < seconds["25"]
    with pytest.raises(SystemExit) as refused:
        main(["plan", "--model", str(config_only), "--no-bench", "--tune-error", "mse"])
    assert refused.value.code == 2 and "--tune-error" in capsys.readouterr().err


def test_fisher_time_counts_four_block_forwards_and_two_of_the_top(config_only):
    """Fisher's seconds per window: every block's saved-input pass, its forward with autograd, its input gradient and
    its hooks' weight gradient (four block-forwards), and the lm_head's forward and input gradient (two)."""
    config, _ = P.load_config(str(config_only))
    sh = P.shapes_of(config)
    run = P.run_of(allocation="heuristic", refine="none", calib_windows=8, seqlen=64)
    phases = P.memory(sh, run, False, 0)
    block_s, matmul = 0.5, 1e9  # block_forward_s; the model dtype's matmul rate times the lm_head
    P.timing(phases, sh, run, P.Rates(1.0, block_s, 1.0, 1.0, matmul, 1e9))
    lm_head = 2 * 64 * sh.hidden * sh.vocab / matmul
    assert phases["fisher"].seconds == pytest.approx(8 * (4 * sh.n_blocks * block_s + 2 * lm_head))


def test_a_distillation_that_does_not_fit_is_told_what_would(llama8b_config):
    """Llama-3-8B in bfloat16 distilling its norms at 256 x 2,048 on a 40 GiB card: recomputing the activations is
    the one option that fits (the plan: 52 GiB -> 33 GiB), offered before less calibration. With it, a 28 GiB card
    is not told to offload, as it once was (distillation refuses an offloaded model)."""
    from dipsvd_core.refine.choices import DistillConfig

    run = P.run_of(dtype="bfloat16", method="dipsvd", allocation="nested", refine="sequential", calib_windows=256,
                   seqlen=2048, distill=DistillConfig(epochs=4, scope="norms"))
    plan = P.make_plan(llama8b_config, "cuda", run, bench=False, budgets={"device": 40 * P.GiB, "host": 2**40})
    assert plan.phases["distill"].device_bytes > 40 * P.GiB
    with pytest.raises(DipSVDError, match="--distill-recompute would fit"):
        P.check_fits(plan)
    fixed = P.make_plan(llama8b_config, "cuda", run.replace(distill=DistillConfig(epochs=4, scope="norms",
                                                                                  recompute=True)),
                        bench=False, budgets={"device": 40 * P.GiB, "host": 2**40})
    assert fixed.phases["distill"].device_bytes < 34 * P.GiB
    P.check_fits(fixed)
    small = P.make_plan(llama8b_config, "cuda", fixed.run, bench=False, budgets={"device": 28 * P.GiB, "host": 2**40})
    with pytest.raises(DipSVDError, match="no single option makes it fit"):
        P.check_fits(small)
