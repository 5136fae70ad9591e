"""Layer-wise CKA block selection (METHOD.md section 7; the layer-wise LoRA with CKA paper).

Linear CKA (Kornblith et al., 2019) between ``hidden_states[i]`` and ``hidden_states[i+1]``, i.e.
the input and output of transformer block ``i``, over calibration examples, taking one token per
example: the first token for encoders (the [CLS] position) and the last non-pad token for decoders.
A low CKA means the block changes the representation a lot; the ``floor(ratio * L)`` blocks with
the lowest CKA keep LoRA (training restricts the target matrices to them through
``find_targets(layers=...)``) and the sensitivity budget is allocated among them.

Notes on the reference code (github.com/c2d-usp/Layer-wise-LoRA-with-CKA): it uses the model's
``hidden_states`` as returned, so for LLaMA-style decoders the last entry is *after* the final norm
(the same here); its decoder script takes ``attention_mask.sum() - 1`` as the last token (right
padding only; here any padding side works); its encoder script skips the single lowest-CKA block
(``sorted[1:k+1]``), which ``select_layers(..., skip_lowest=1)`` reproduces; the default keeps the
lowest, as the paper and its decoder script do.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.errors import SensloraError
from ..core.timing import sync_device, time_forward

TOKEN_CHOICES = ("auto", "first", "last")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``x`` (n, d1) and ``y`` (n, d2), computed in float64.

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F) with column-centred Xc, Yc. The
    feature-space form (d x d products) is used unless the n x n Gram form is cheaper (n < d).
    Returns 0 when a denominator is 0 (a constant representation).
    """
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"linear_cka needs 2-D (n, d) inputs, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    x = x.detach().to(torch.float64)
    y = y.detach().to(torch.float64)
    # Centre every feature (column): equivalent to H K H with the centring matrix H.
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, d1 = x.shape
    d2 = y.shape[1]
    if n * n * (d1 + d2) < n * (d1 * d2 + d1 * d1 + d2 * d2):
        # Gram form: <K, L>_F / (||K||_F ||L||_F) with K = Xc Xc^T, L = Yc Yc^T (equal by tr identities).
        k = x @ x.T
        l_ = y @ y.T
        num = (k * l_).sum()
        den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
    else:
        # Feature form: cross-covariance Yc^T Xc (d2, d1) and the two auto-covariances.
        num = torch.linalg.matrix_norm(y.T @ x).square()
        den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    den_f = float(den)
    if den_f == 0.0 or not math.isfinite(den_f):
        return 0.0
    return float(num) / den_f


def _is_decoder(model: torch.nn.Module) -> bool:
    """True for causal LMs and for decoder-only architectures under another head."""
    from ..data.models import model_kind

    if model_kind(model) == "causal-lm":
        return True
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - very old / new transformers
        return False
    # A model type with a causal-LM head but no masked-LM head is decoder-only (llama, gpt2, qwen2 ...);
    # BERT-like encoders have both.
    model_type = getattr(config, "model_type", None)
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def token_positions(attention_mask: torch.Tensor, token: str) -> torch.Tensor:
    """Per row, the index of the first (``"first"``) or last (``"last"``) non-pad token.

    Works with left and right padding; a row without any real token gives index 0.
    """
    mask = attention_mask.to(torch.long)
    if token == "first":
        # argmax returns the first maximal index: the first 1 of the mask.
        return mask.argmax(dim=1)
    # Weight each real position by its index; the largest weighted index is the last real token.
    idx = torch.arange(mask.shape[1], device=mask.device)
    return (mask * idx).argmax(dim=1)


def _hidden_states(output: object) -> Sequence[torch.Tensor] | None:
    if isinstance(output, Mapping):
        return output.get("hidden_states")
    return getattr(output, "hidden_states", None)


@torch.no_grad()
def collect_block_representations(
    model: torch.nn.Module,
    batches: Sequence[Mapping],
    *,
    device=None,
    progress: bool = True,
    token: str = "auto",
) -> list[torch.Tensor]:
    """One token per example from every hidden state: L+1 float32 CPU tensors of shape (n, hidden).

    ``token="auto"`` takes the first non-pad token for encoders and the last non-pad token for
    decoders (read from ``attention_mask``, any padding side); ``"first"`` / ``"last"`` force one.
    """
    from tqdm.auto import tqdm

    from ..core.losses import model_inputs, move_batch

    if token not in TOKEN_CHOICES:
        raise SensloraError(f"unknown CKA token choice {token!r}; use one of {', '.join(TOKEN_CHOICES)}")
    if token == "auto":
        token = "last" if _is_decoder(model) else "first"
    device = device or next(model.parameters()).device
    per_state: list[list[torch.Tensor]] | None = None
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="CKA hidden states", unit="batch", disable=not progress):
            inputs = model_inputs(move_batch(batch, device))
            states = _hidden_states(model(**inputs, output_hidden_states=True))
            if not states:
                raise SensloraError(
                    f"model {type(model).__name__} does not return hidden states; CKA layer selection needs output_hidden_states"
                )
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            # Pick one position per example, then gather it from every hidden state.
            pos = token_positions(mask, token).to(states[0].device)
            rows = torch.arange(ids.shape[0], device=pos.device)
            picked = [h[rows, pos].float().cpu() for h in states]
            if per_state is None:
                per_state = [[] for _ in picked]
            elif len(picked) != len(per_state):
                raise SensloraError(
                    f"the model returned {len(picked)} hidden states for one batch and {len(per_state)} for another"
                )
            for acc, p in zip(per_state, picked, strict=True):
                acc.append(p)
    finally:
        model.train(was_training)
    if per_state is None:
        raise SensloraError("the calibration set is empty; CKA layer selection needs at least 2 examples")
    return [torch.cat(acc, dim=0) for acc in per_state]


def cka_from_representations(reps: Sequence[torch.Tensor]) -> list[float]:
    """CKA of consecutive representations: block i maps reps[i] to reps[i+1]."""
    if len(reps) < 2:
        raise SensloraError(
            "the model returned fewer than 2 hidden states; it has no transformer block to score"
        )
    if reps[0].shape[0] < 2:
        raise SensloraError(f"CKA needs at least 2 calibration examples, got {reps[0].shape[0]}; pass more")
    return [linear_cka(reps[i], reps[i + 1]) for i in range(len(reps) - 1)]


def layer_cka(
    model: torch.nn.Module,
    batches: Sequence[Mapping],
    *,
    device=None,
    progress: bool = True,
    token: str = "auto",
) -> list[float]:
    """CKA between the input and output of every block, ``[CKA(h[i], h[i+1]) for i in 0..L-1]``."""
    reps = collect_block_representations(model, batches, device=device, progress=progress, token=token)
    return cka_from_representations(reps)


def _check_ratio(ratio: float) -> None:
    try:
        ok = not isinstance(ratio, bool) and math.isfinite(float(ratio)) and 0 < float(ratio) <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SensloraError(f"--layer-ratio must be in (0, 1], got {ratio!r}")


def select_layers(cka_scores: Sequence[float], ratio: float = 0.5, *, skip_lowest: int = 0) -> list[int]:
    """Indices (sorted) of the ``floor(ratio * L)`` blocks with the lowest CKA; ties go to the lower index.

    ``skip_lowest`` passes over that many lowest-CKA blocks first (the reference encoder script
    uses 1); the default 0 follows the paper.
    """
    _check_ratio(ratio)
    n_blocks = len(cka_scores)
    # Small epsilon so that e.g. 0.3 * 10 = 3.0000000000000004 and 0.57 * 100 = 56.99999999999999 floor as intended.
    k = math.floor(ratio * n_blocks + 1e-9)
    if k == 0:
        raise SensloraError(f"--layer-ratio {ratio} keeps 0 of {n_blocks} blocks; raise it")
    if skip_lowest < 0 or skip_lowest + k > n_blocks:
        raise SensloraError(
            f"cannot skip {skip_lowest} and keep {k} of {n_blocks} blocks; lower the skip or the ratio"
        )
    # Sort by (CKA, index): stable lowest-first order with ties by index.
    order = sorted(range(n_blocks), key=lambda i: (float(cka_scores[i]), i))
    return sorted(order[skip_lowest : skip_lowest + k])


@dataclass
class LayerSelection:
    """Result of :func:`select_layers_by_cka`; ``kept`` restricts the targets (``find_targets(layers=kept)``)."""

    cka: list[float]
    kept: list[int]
    ratio: float
    n_examples: int
    timings: dict = field(default_factory=dict)
    token: str = "auto"
    skip_lowest: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.cka)

    def to_dict(self) -> dict:
        return {**asdict(self), "num_blocks": self.num_blocks}

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerSelection:
        names = {"cka", "kept", "ratio", "n_examples", "timings", "token", "skip_lowest"}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, out_dir: str | Path, *, plot: bool = True, overwrite: bool = False) -> Path:
        """Write ``cka.json`` and ``cka.png`` into ``out_dir`` atomically (temp sibling, then rename)."""
        from ..core.cache import atomic_dir

        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise SensloraError(f"output folder {out} already exists; remove it or pass --overwrite")
        with atomic_dir(out) as tmp:
            (tmp / "cka.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            if plot:
                self.plot(tmp / "cka.png")
        return out

    @classmethod
    def load(cls, path: str | Path) -> LayerSelection:
        """Read a folder written by :meth:`save` (or its ``cka.json``)."""
        from ..core.cache import load_json_record

        return load_json_record(
            path, "cka.json", cls.from_dict, missing="pass a folder written by the CKA layer selection"
        )

    def plot(self, path: str | Path) -> None:
        """Bar chart of CKA per block, kept blocks highlighted."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kept = set(self.kept)
        blocks = list(range(self.num_blocks))
        colors = ["tab:orange" if i in kept else "tab:gray" for i in blocks]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(blocks) + 2), 3.6))
        ax.bar(blocks, self.cka, color=colors)
        ax.set_xlabel("transformer block")
        ax.set_ylabel("linear CKA(input, output)")
        ax.set_ylim(0, max(1.0, max(self.cka, default=1.0)) * 1.02)
        ax.set_title(
            f"CKA per block: {len(self.kept)} of {self.num_blocks} kept (orange, lowest CKA), n={self.n_examples}"
        )
        ax.set_xticks(blocks)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def select_layers_by_cka(
    model: torch.nn.Module,
    batches: Sequence[Mapping],
    ratio: float = 0.5,
    *,
    device=None,
    progress: bool = True,
    token: str = "auto",
    skip_lowest: int = 0,
    measure_forward: bool = True,
) -> LayerSelection:
    """Score every block with CKA and keep the ``floor(ratio * L)`` lowest.

    ``timings`` holds ``hidden_states`` (the pass collecting representations), ``cka`` (the CKA
    arithmetic) and, with ``measure_forward``, ``forward``: one plain forward pass over the same
    batches after one warm-up batch, the reference for "CKA costs one forward pass".
    """
    _check_ratio(ratio)
    batches = list(batches)
    if not batches:
        raise SensloraError("the calibration set is empty; CKA layer selection needs at least 2 examples")
    if token not in TOKEN_CHOICES:
        raise SensloraError(f"unknown CKA token choice {token!r}; use one of {', '.join(TOKEN_CHOICES)}")
    device = device or next(model.parameters()).device
    resolved = token if token != "auto" else ("last" if _is_decoder(model) else "first")
    timings: dict[str, float] = {}
    if measure_forward:
        time_forward(model, batches[:1], device)  # warm-up, so neither timing pays start-up costs
        timings["forward"] = time_forward(model, batches, device)
    start = time.perf_counter()
    reps = collect_block_representations(model, batches, device=device, progress=progress, token=resolved)
    sync_device(device)
    timings["hidden_states"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = cka_from_representations(reps)
    timings["cka"] = time.perf_counter() - start
    kept = select_layers(scores, ratio, skip_lowest=skip_lowest)
    return LayerSelection(
        cka=scores,
        kept=kept,
        ratio=float(ratio),
        n_examples=int(reps[0].shape[0]),
        timings=timings,
        token=resolved,
        skip_lowest=skip_lowest,
    )
