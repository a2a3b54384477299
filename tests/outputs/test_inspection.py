"""The pure views of inspection.py the app shows in words: the quality verdict's bands and its advice."""
from __future__ import annotations

import numpy as np
import pytest

from dipsvd_core.methods.settings import Settings
from dipsvd_core.outputs.inspection import VERDICT_BANDS, quality_verdict
from dipsvd_core.refine.choices import DistillConfig


def ppl(wiki: float, news: float) -> dict:
    return {"original": {"wiki": 10.0, "news": 20.0}, "compressed": {"wiki": 10.0 * wiki, "news": 20.0 * news}}


@pytest.mark.parametrize("wiki, news, level, color", [
    (1.05, 1.2, "close", "green"),        # 1.2x exactly is still within
    (1.1, 1.21, "worse", "orange"),       # the worst set decides
    (2.0, 1.5, "worse", "orange"),        # 2x exactly is the top of the middle band
    (4.1, 3.58, "far", "red"),            # issue 36's 11.77 -> 48.27
])
def test_verdict_bands_follow_the_worst_set(wiki, news, level, color):
    v = quality_verdict(ppl(wiki, news), Settings(ratio=0.2), 32 * 512)
    assert (v["level"], v["color"]) == (level, color)
    name, x = v["worst"]
    assert x == pytest.approx(max(wiki, news)) and name == ("wiki" if wiki >= news else "news")
    assert [b[0] for b in VERDICT_BANDS] == [1.2, 2.0, float("inf")]


def test_no_verdict_without_both_models_on_one_set():
    assert quality_verdict({"original": {"wiki": 10.0}}, Settings(), 4096) is None
    assert quality_verdict({"original": {"wiki": 10.0}, "compressed": {"news": 30.0}}, Settings(), 4096) is None


def test_advice_reads_the_settings():
    far = ppl(3.0, 3.0)
    assert quality_verdict(ppl(1.1, 1.1), Settings(ratio=0.3), 2048)["help"] == []  # close: nothing to advise
    small = quality_verdict(far, Settings(method="dipsvd", allocation="heuristic", refine="none", ratio=0.2),
                           8 * 256)["help"]
    assert [h.split(" ")[0] for h in small] == ["refine", "distillation", "another", "more", "a"]
    offloaded = quality_verdict(far, Settings(method="dipsvd", allocation="heuristic", refine="none", ratio=0.2),
                                8 * 256, offloaded=True)["help"]
    assert [h.split(" ")[0] for h in offloaded] == ["refine", "another", "more", "a"]  # it cannot be distilled
    assert "heuristic" not in small[2].split(":")[1] and "uniform" in small[2]
    assert "2,048 tokens now" in small[3] and "16,384 advised" in small[3]
    done = quality_verdict(far, Settings(allocation="heuristic", refine="sequential", ratio=0.1,
                                         distill=DistillConfig(epochs=4)), 32 * 512)["help"]
    assert [h.split(" ")[0] for h in done] == ["another"]  # refined, distilled, advised calibration, ratio <= 0.1


def test_refine_summary_and_table_give_the_gain_one_sign():
    from dipsvd_core.refine.sequential import refine_table, summary

    info = {"seconds": 1.0, "fit_windows": 6, "held_windows": [3, 7],
            "blocks": [{"block": b, "refined": True, "choice": "refined", "gain": g, "matrices": {}}
                       for b, g in enumerate((0.02, 0.03, 0.05))]}
    assert "median held-out gain +3%" in summary(info)
    assert [r["block gain"] for r in refine_table(info)] == ["+2.0%", "+3.0%", "+5.0%"]


def test_calibration_advice_names_no_repository_file_and_no_cached_time():
    from dipsvd_core.refine.sequential import calibration_advice

    cached = calibration_advice(8, 256, {"statistics": 0.01, "fisher": 0.02})
    assert "RESULTS.md" not in cached and " 0 s" not in cached
    assert "statistics, fisher under 0.5 s here: read from the cache or too small to time" in cached
    timed = calibration_advice(8, 256, {"statistics": 0.01, "fisher": 12.0})
    assert ": about 96 s for fisher, timed here at 12 s (statistics under 0.5 s here" in timed
    assert calibration_advice(32, 512, {}) is None


def test_output_summary_keeps_the_energy_per_dimension_and_the_spectrum_without_massive_ones():
    import torch

    from dipsvd_core.engine.stats import MASSIVE_FACTOR, massive_dims, output_summary

    g = torch.Generator().manual_seed(0)
    H = torch.randn(400, 16, generator=g, dtype=torch.float64)
    H[:, 5] *= 100.0  # energy 1e4 x the others': a massive dimension
    gram = H.T @ H
    eigs, energy, trimmed = output_summary(gram)
    assert torch.allclose(energy, (H ** 2).sum(0))
    assert massive_dims(energy).tolist() == [5] and MASSIVE_FACTOR < 1e4
    keep = [j for j in range(16) if j != 5]
    assert torch.allclose(trimmed, torch.linalg.eigvalsh(H[:, keep].T @ H[:, keep]))
    assert torch.allclose(eigs, torch.linalg.eigvalsh(gram))


def test_energy_shares_bound_the_effective_rank():
    import torch

    from dipsvd_core.allocation.importance import effective_rank, energy_shares

    energy = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.5, 97.0, 1.0, 1.5])]
    shares = energy_shares(energy, k=2)
    assert shares["top1"].tolist() == pytest.approx([0.25, 0.97]) and shares["dim"].tolist() == [0, 1]
    assert shares["topk"].tolist() == pytest.approx([0.5, 0.985])
    # Ky Fan: a diagonal Gram's top-2 share >= tau bounds R_l by 2
    assert effective_rank(torch.diag(energy[1]), 0.95) <= 2


def test_rank_words_and_q_ties_name_the_blocks_and_the_rule():
    from dipsvd_core.allocation.importance import combined_score, minmax
    from dipsvd_core.outputs.inspection import block_ranges, q_ties, rank_words

    assert block_ranges([11, 2, 12, 13, 5]) == "2, 5, 11-13"
    R = np.array([200.0, 150.0, 1.0, 1.0, 1.0, 2.0])
    shares = {"top1": np.array([0.1, 0.3, 0.98, 0.97, 0.96, 0.9]), "dim": np.array([3, 507, 507, 507, 507, 507])}
    words = rank_words(R, shares, 0.95)
    assert words.startswith("In blocks 2-5 R_l is only 1-2") and "dimension 507 alone holds 90-98%" in words
    assert rank_words(np.array([100.0, 90.0]), shares, 0.95) is None
    S = np.array([1.0, 0.5, 0.2, 0.4, 0.3, 0.1])
    ties = q_ties(R, minmax(S), combined_score(S, R, 0.25), 0.25)
    assert ties["blocks"] == [2, 3, 4] and ties["floor"] == pytest.approx(1e-6 ** 0.75)
    assert "Blocks 2-4 share R_l = 1" in ties["words"] and "(block 5, R_l = 2)" in ties["words"]
    assert q_ties(np.array([3.0, 1.0, 2.0]), np.ones(3), np.ones(3), 0.25) is None


def test_rank_of_picks_the_spectrum_the_heuristic_reads():
    import types

    import torch

    from dipsvd_core.allocation.importance import effective_ranks, rank_spectra
    from dipsvd_core.common.errors import DipSVDError

    massive = torch.tensor([0.001, 0.001, 0.001, 1.0])  # one direction holds 99.7%
    rest = torch.tensor([0.25, 0.25, 0.25])  # the same output, its massive dimension set aside
    stats = types.SimpleNamespace(block_spectra=[massive], trimmed_spectra=[rest])
    assert effective_ranks(rank_spectra(stats), 0.95).tolist() == [1.0]  # the paper's R_l: the default
    assert effective_ranks(rank_spectra(stats, "trimmed"), 0.95).tolist() == [3.0]
    assert Settings().rank_of == "output" and Settings(rank_of="trimmed").check().rank_of == "trimmed"
    with pytest.raises(DipSVDError, match="unknown rank_of 'input'; use one of output, trimmed"):
        Settings(rank_of="input").check()
