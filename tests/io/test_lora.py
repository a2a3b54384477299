"""LoRA healing of a saved compressed folder with peft: the low-rank pairs' factors (u, v) are ordinary Linears that
peft wraps, and a few steps on calibration text lower the loss. peft's default targets (q_proj, v_proj) name the
pairs themselves, which peft refuses as modules it does not support."""
from __future__ import annotations

import pytest
import torch

from dipsvd_core.io.compressed import load_compressed, save_compressed
from dipsvd_core.lowrank.surgery import LowRankLinear
from dipsvd_core.run.pipeline import Settings, Workbench

peft = pytest.importorskip("peft")


def test_lora_on_the_factors_of_a_loaded_folder_trains(tiny_lm, tmp_path):
    bench = Workbench(tiny_lm, "wiki", 4, 64)
    out = save_compressed(bench.build(Settings(method="svd-llm", ratio=0.3)).model, tmp_path / "c", tiny_lm.tokenizer,
                          {"method": "svd-llm"})
    model = load_compressed(out).model
    pairs = sum(isinstance(m, LowRankLinear) for m in model.modules())
    with pytest.raises(ValueError, match="not supported"):  # the default targets are the pairs, not Linears
        peft.get_peft_model(load_compressed(out).model, peft.LoraConfig(r=4, task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["u", "v"],
                                                       task_type="CAUSAL_LM"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(wrapped) == 2 * pairs > 0
    ids = bench.windows()[:4]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.02, losses
