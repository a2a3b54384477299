"""The statistics pass's matmul precision: IEEE float32 for float32 activations, TF32 for 16-bit ones on CUDA,
which is exact for them."""
import pytest
import torch

from dipsvd_core.engine.stats import SIXTEEN_BIT, GramAccumulator, matmul_precision, stream_stats


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_sixteen_bit_values_are_exact_in_tf32(dtype):
    """TF32 keeps 10 of float32's 23 mantissa bits: a bfloat16 or float16 value cast to float32 has its low 13
    bits zero, subnormals included, so TF32's rounding leaves every input of the Gram product unchanged."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, generator=g) * torch.logspace(-6, 4, 4096)).to(dtype)
    x = torch.cat([x, torch.tensor([torch.finfo(dtype).tiny / 4, torch.finfo(dtype).max], dtype=dtype)])
    bits = x.float().view(torch.int32)
    assert int((bits & 0x1FFF).abs().max()) == 0
    assert int((torch.randn(4096, generator=g).view(torch.int32) & 0x1FFF).abs().max()) > 0  # float32 values are not


def test_the_precision_is_restored_and_a_gram_is_its_sum(tiny_lm):
    m = torch.backends.cuda.matmul
    before = m.fp32_precision
    with matmul_precision("tf32"):
        assert m.fp32_precision == "tf32"
    assert m.fp32_precision == before
    from dipsvd_core.run.pipeline import Workbench

    windows = Workbench(tiny_lm, "wiki", 2, 32).windows()
    stream_stats(tiny_lm.model, [t.name for t in tiny_lm.targets], windows)
    assert m.fp32_precision == before
    acc = GramAccumulator(8, torch.device("cpu"))
    xs = [torch.randn(1, 5, 8).to(torch.bfloat16) for _ in range(3)]
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    torch.testing.assert_close(acc.gram, X.T @ X, rtol=1e-6, atol=1e-6)


def test_partial_sums_reach_the_float64_sum_every_flush_and_nan_is_caught():
    """FLUSH windows are summed in float32 before the float64 sum; 20 windows (2 flushes and a rest) give the
    float64 sum to float32 rounding, and a NaN activation in any window is raised when its partial sum is flushed."""
    from dipsvd_core.engine.stats import NonFiniteActivations

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 32, 24, generator=g) * torch.linspace(0.1, 10, 24) for _ in range(2 * GramAccumulator.FLUSH + 4)]
    X = torch.cat([x.reshape(-1, 24) for x in xs]).double()
    acc = GramAccumulator(24, torch.device("cpu"))
    for x in xs:
        acc.add(x)
    scale = (X.T @ X).abs().max()
    torch.testing.assert_close(acc.gram, X.T @ X, rtol=0, atol=2e-6 * scale)
    assert acc.n == X.shape[0]
    torch.testing.assert_close(acc.abs_sum, X.abs().sum(0), rtol=1e-6, atol=0)
    bad = GramAccumulator(24, torch.device("cpu"))
    bad.add(xs[0])
    bad.add(torch.full((1, 32, 24), float("nan")))
    with pytest.raises(NonFiniteActivations):
        bad.finish()


def test_non_finite_activations_in_the_statistics_pass_name_the_block(tiny_model_dir):
    """A block whose activations overflow (an infinite weight in block 1's MLP) stops the pass with one message that
    names the block and the fix, however the windows fall into the partial sums."""
    from dipsvd_core.common.errors import DipSVDError
    from dipsvd_core.run.loading import load_model
    from dipsvd_core.run.pipeline import Workbench

    lm = load_model(tiny_model_dir, "cpu", "float32")
    with torch.no_grad():
        lm.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    windows = Workbench(lm, "wiki", 3, 32).windows()
    with pytest.raises(DipSVDError, match=r"NaN or infinite activations in decoder block 1; .*--dtype float32"):
        stream_stats(lm.model, [t.name for t in lm.targets], windows)


@pytest.mark.parametrize("dim", [255, 256, 601, 1030])
def test_upper_block_triangle_gram_equals_the_full_product(dim):
    """Gram products of TRIANGLE_MIN channels or more compute only the upper block triangle (upper_gram_add, 10 of 16
    blocks) and mirror it at the flush: across two flushes and uneven block widths the sum is X^T X to float32
    rounding and exactly symmetric; a NaN in any channel still reaches the partial sum."""
    from dipsvd_core.engine.stats import NonFiniteActivations, row_blocks, upper_gram_add

    blocks = row_blocks(dim)
    assert len(blocks) == (1 if dim < 256 else 4) and blocks[-1].stop == dim
    g = torch.Generator().manual_seed(dim)
    xs = [torch.randn(1, 40, dim, generator=g) * torch.linspace(0.1, 10, dim) for _ in range(GramAccumulator.FLUSH + 3)]
    X = torch.cat([x.reshape(-1, dim) for x in xs]).double()
    acc = GramAccumulator(dim, torch.device("cpu"))
    for x in xs:
        acc.add(x)
    full = X.T @ X
    torch.testing.assert_close(acc.gram, full, rtol=0, atol=2e-6 * full.abs().max())
    assert torch.equal(acc.gram, acc.gram.T)
    part = torch.zeros(dim, dim)
    upper_gram_add(part, X[:40].float())
    if dim >= 256:  # the block below the first diagonal block is not computed
        assert not part[blocks[1], :blocks[1].start].any()
    for channel in (0, dim - 1):  # the first and the last channel: one is only in block columns, one only in rows
        bad = GramAccumulator(dim, torch.device("cpu"))
        x = torch.randn(1, 8, dim, generator=g)
        x[0, 3, channel] = float("nan")
        bad.add(x)
        with pytest.raises(NonFiniteActivations):
            bad.finish()


def test_refine_multiplies_sixteen_bit_inputs_on_cuda_in_tf32_and_any_other_as_set():
    """refine's Grams follow the statistics pass: TF32 (exact) only where every input is 16-bit on CUDA; a float32
    input, which TF32 would round, or a CPU tensor keeps the precision as set."""
    from types import SimpleNamespace as T

    from dipsvd_core.refine.closed_form import gram_precision

    bf16, fp16 = T(dtype=torch.bfloat16, is_cuda=True), T(dtype=torch.float16, is_cuda=True)
    with matmul_precision("ieee"):
        assert gram_precision(bf16, fp16) == "tf32"
        assert gram_precision(bf16, T(dtype=torch.float32, is_cuda=True)) == "ieee"
        assert gram_precision(T(dtype=torch.bfloat16, is_cuda=False), bf16) == "ieee"
