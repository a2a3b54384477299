"""Plotly figures for the app (and for anyone with a notebook): plain arrays in, go.Figure out.

Each function draws one thing the Studio shows; none computes anything the core has not already
computed, beyond a log10 for display. No Streamlit import here: the pages place the figures.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

BLUE, ORANGE, GREEN, GREY, RED = "#1f6feb", "#f0883e", "#2da44e", "#8b949e", "#cf222e"


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 380) -> go.Figure:
    # Legend below the plot: the top right belongs to plotly's toolbar.
    fig.update_layout(title={"text": title, "x": 0.0, "font": {"size": 15}}, height=height,
                      margin={"l": 70, "r": 20, "t": 48, "b": 40}, xaxis_title=x, yaxis_title=y,
                      template="plotly_white", legend={"orientation": "h", "x": 0, "y": -0.18, "yanchor": "top"})
    return fig


def _blocks(n: int) -> list[int]:
    return list(range(n))


def alpha_heatmap(alpha: np.ndarray, group: str) -> go.Figure:
    """Channel importance alpha (blocks x channels) on a log10 colour scale."""
    a = np.asarray(alpha, dtype=np.float64)
    z = np.log10(np.maximum(a, np.finfo(np.float64).tiny))
    fig = go.Figure(go.Heatmap(z=z, x=list(range(a.shape[1])), y=_blocks(a.shape[0]), colorscale="Viridis",
                               colorbar={"title": "log10 α"},
                               hovertemplate="block %{y}, channel %{x}<br>log10 α = %{z:.2f}<extra></extra>"))
    return _layout(fig, f"Channel importance α — input of {group}", "input channel", "block", height=420)


def sorted_alpha(alpha: np.ndarray, n_top: int, block: int, group: str) -> go.Figure:
    """One block's alpha sorted high to low, with the top-`bar` cut (n_top channels) marked."""
    a = np.sort(np.asarray(alpha, dtype=np.float64))[::-1]
    rank = np.arange(1, a.size + 1)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=rank, y=a, mode="lines", name="α, sorted", line={"color": BLUE}))
    if n_top > 0:
        fig.add_trace(go.Scatter(x=rank[:n_top], y=a[:n_top], mode="markers", name=f"protected ({n_top})",
                                 marker={"color": ORANGE, "size": 5}))
        # On a log axis plotly reads an annotation's x as log10 of the value (a shape's x as the value itself):
        # add_vline's annotation_text at x = n_top + 0.5 stretched the axis to 10^(n_top + 0.5), so the cut's
        # label is placed by hand
        cut = n_top + 0.5
        fig.add_vline(x=cut, line={"color": ORANGE, "dash": "dash"})
        fig.add_annotation(x=float(np.log10(cut)), y=1, yref="paper", text=f"top {n_top} channels", showarrow=False,
                           xanchor="left", yanchor="bottom", font={"color": ORANGE})
    # the protected head is a few percent of the channels: a log axis gives it room; it ends at the channel count
    fig.update_xaxes(type="log", range=[0, float(np.log10(max(a.size, 2)))])
    fig.update_yaxes(type="log")
    return _layout(fig, f"Sorted α — block {block}, input of {group}", "channel rank (log)", "α (log)")


def per_block(values: np.ndarray, title: str, y: str, color: str = BLUE, name: str | None = None) -> go.Figure:
    """A bar per decoder block (Fisher sensitivity S_l, effective rank R_l, ...)."""
    v = np.asarray(values, dtype=np.float64)
    fig = go.Figure(go.Bar(x=_blocks(v.size), y=v, marker_color=color, name=name or y))
    return _layout(fig, title, "block", y)


def energy_shares(top1: np.ndarray, topk: np.ndarray, k: int, tau: float) -> go.Figure:
    """Where each block output's energy goes: the share of its largest hidden dimension (bars) and of its k largest
    (line), against tau; where the k largest hold tau, the effective rank counts at most k directions."""
    x = _blocks(len(top1))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=np.asarray(top1), name="largest hidden dimension", marker_color=ORANGE))
    fig.add_trace(go.Scatter(x=x, y=np.asarray(topk), mode="lines+markers", name=f"{k} largest",
                             line={"color": BLUE}))
    fig.add_hline(y=tau, line={"color": GREY, "dash": "dash"}, annotation_text=f"τ = {tau:g}",
                  annotation_position="bottom right")
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, "Share of each block output's energy in its largest hidden dimensions", "block",
                   "share of Σ‖h‖²")


def importance_q(s_norm: np.ndarray, r_norm: np.ndarray, q: np.ndarray, beta: float) -> go.Figure:
    """Normalised S and R with their combination Q_l = S~^beta R~^(1-beta) (the paper's Figure 2)."""
    x = _blocks(len(q))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=np.asarray(s_norm), mode="lines+markers", name="S̃ (Fisher, normalised)",
                             line={"color": BLUE}))
    fig.add_trace(go.Scatter(x=x, y=np.asarray(r_norm), mode="lines+markers", name="R̃ (effective rank, normalised)",
                             line={"color": GREEN}))
    fig.add_trace(go.Scatter(x=x, y=np.asarray(q), mode="lines+markers", name=f"Q (β = {beta:g})",
                             line={"color": ORANGE, "width": 3}))
    return _layout(fig, "Layer importance Q_l from sensitivity and effective rank", "block", "normalised value")


def spectra(sigmas: dict[str, np.ndarray], matrix: str) -> go.Figure:
    """Singular values of one matrix under each factorization, on a log scale."""
    colors = {"svd": GREY, "svd-llm": BLUE, "dipsvd": ORANGE}
    fig = go.Figure()
    for label, s in sigmas.items():
        s = np.asarray(s, dtype=np.float64)
        fig.add_trace(go.Scatter(x=np.arange(1, s.size + 1), y=s / s[0], mode="lines", name=label,
                                 line={"color": colors.get(label.split(" ")[0])}))
    fig.update_yaxes(type="log")
    return _layout(fig, f"Singular values of {matrix} (each divided by its largest)", "index", "σ_i / σ_1 (log)")


def keep_ratios(p_blocks: np.ndarray, p_uniform: np.ndarray, label: str, tied: list[int] | None = None) -> go.Figure:
    """Per-block keep ratio p_l of an allocation against the uniform one; `tied` blocks (Q ties, inspection.q_ties)
    are hatched and named in the legend."""
    p = np.asarray(p_blocks, dtype=np.float64)
    x = _blocks(p.size)
    fig = go.Figure()
    tied = sorted(set(tied or []))
    free = [b for b in x if b not in tied]
    fig.add_trace(go.Bar(x=free, y=p[free], name=label, marker_color=ORANGE))
    if tied:
        fig.add_trace(go.Bar(x=tied, y=p[tied], name=f"{label}: Q tied (R_l at its minimum), Fisher S̃ decides",
                             marker={"color": ORANGE, "pattern": {"shape": "/"}, "opacity": 0.6}))
    fig.add_trace(go.Scatter(x=x, y=np.asarray(p_uniform), mode="lines", name="uniform (reference)",
                             line={"color": GREY, "dash": "dash"}))
    fig.update_yaxes(range=[0, max(1.0, float(p.max()) * 1.05)])
    return _layout(fig, "Keep ratio p_l per block", "block", "p_l (fraction kept)")


def predicted_loss(loss: np.ndarray, loss_uniform: np.ndarray, label: str) -> go.Figure:
    """Predicted whitened loss per block, sum over the block's matrices of L_m(k_m)^2."""
    x = _blocks(len(loss))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=np.asarray(loss), name=label, marker_color=BLUE))
    fig.add_trace(go.Scatter(x=x, y=np.asarray(loss_uniform), mode="lines+markers", name="uniform (reference)",
                             line={"color": GREY, "dash": "dash"}))
    fig.update_yaxes(type="log")
    return _layout(fig, "Predicted whitened loss per block", "block", "Σ L² (log)")


def convergence(values: list[float], best: list[float], objective: str, title: str = "Bayesian optimization",
                step: str = "call") -> go.Figure:
    """A search (Bayesian optimization, refined-kl): every call's objective and the best so far."""
    x = list(range(1, len(values) + 1))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=values, mode="markers", name=step, marker={"color": GREY}))
    fig.add_trace(go.Scatter(x=x, y=best, mode="lines", name="best so far", line={"color": ORANGE, "width": 3}))
    return _layout(fig, title, step, objective, height=300)


def dobi_training(history: list[dict]) -> go.Figure:
    """Dobi-SVD: task loss and total loss (with the ratio penalty) at every training step."""
    x = [h["step"] for h in history]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=[h["task"] for h in history], mode="lines+markers", name="task loss",
                             line={"color": BLUE}))
    fig.add_trace(go.Scatter(x=x, y=[h["loss"] for h in history], mode="lines", name="task + λ·|ratio − target|",
                             line={"color": ORANGE, "dash": "dot"}))
    return _layout(fig, "Dobi-SVD training", "step", "loss", height=300)


def ppl_vs_ratio(curves: dict[str, tuple[list[float], list[float]]], original: float | None,
                 dataset: str) -> go.Figure:
    """Perplexity against ratio removed, one line per method."""
    colors = {"svd": GREY, "svd-llm": BLUE, "dipsvd": ORANGE}
    fig = go.Figure()
    for method, (ratios, ppl) in curves.items():
        fig.add_trace(go.Scatter(x=ratios, y=ppl, mode="lines+markers", name=method,
                                 line={"color": colors.get(method)}))
    if original is not None:
        fig.add_hline(y=original, line={"color": GREEN, "dash": "dot"}, annotation_text=f"original {original:.1f}")
    fig.update_yaxes(type="log")
    return _layout(fig, f"Perplexity on {dataset} against ratio removed", "ratio removed", "perplexity (log)")
