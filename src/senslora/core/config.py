"""What :func:`senslora.core.pipeline.allocate` allocates with: the recipe and the budget.

:class:`AllocationConfig` is a validated dataclass, as peft's ``LoraConfig``: every field carries
its help text in ``metadata["help"]`` (the same words as the allocator's flags in
:mod:`senslora.cli.flags`), construction runs :meth:`AllocationConfig.validate`, and
:meth:`AllocationConfig.to_dict` gives a plain dict. Run-time choices (device, loss, progress bars,
the forward-pass reference, the model's name, sharding, where the accumulators live) are not part
of it; they stay arguments of ``allocate``.

The recipe fields (``estimator`` ... ``rho``) default to None: the ``preset``'s value
(:mod:`senslora.core.presets`); :meth:`AllocationConfig.recipe` resolves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SensloraError
from .presets import RECIPE_KEYS, check_recipe, is_number, preset_init, resolve
from .ranges import COUNT, SEED, Range, check_fields

BUDGET_MODES = ("rank", "params")
POSITIVE = Range(0, low_open=True)


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A field with its help; ``range``: the :class:`~senslora.core.ranges.Range` it accepts."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class AllocationConfig:
    """The recipe and budget of one allocation; every field is an :func:`allocate` keyword.

    The recipe (``estimator`` ... ``rho``) starts from ``preset`` (:mod:`senslora.core.presets`:
    ``robust``, the default, or ``paper``, the published method unchanged).

    Attributes:
        avg_rank: average rank; the budget is ``avg_rank * number of target matrices`` ranks
            (``budget_mode="rank"``) or that many uniform-LoRA parameters (``"params"``).
        preset: ``robust`` (default) or ``paper``.
        estimator: ``activation`` (paper, forward only), ``fisher``, ``hutchinson`` (see estimators).
        sink, token_trim: activation statistics: ``sink="drop"`` leaves out each sequence's first
            real token (decoders' attention sink); ``token_trim`` drops that fraction of each
            batch's highest-energy tokens per matrix input.
        saliency: ``hessian`` (paper: h_ij) or ``obd`` (h_ij * w_ij^2, Optimal Brain Damage).
        temperature, normalize: θ^temperature; ``normalize="role"`` divides θ by its role's mean.
        rho: every rank <= floor(rho * avg_rank) (EVA's cap); 0 for none.
        score: ``fused`` (paper) or a single metric ``global`` / ``local`` / ``topk`` / ``effective-rank``.
        fusion: ``sigma-mu2`` (paper: beta, gamma = sigma / mu^2) or ``equal`` (0.5 / mu).
        strategy: ``sra`` (proportional, eq. 15) or ``pra`` (``categories`` rank steps, section 4.4).
        topk_fraction, alpha: k = fraction * N for Top-k; the Effective-Rank energy threshold.
        r_min, r_max: per-matrix rank bounds; ``r_max=None`` means min(d_in, d_out). ``r_min=0``
            lets a matrix drop out of ``target_modules``.
        target_modules, layers: which matrices (see :func:`senslora.core.targets.find_targets`).
        lora_alpha, alpha_mode: reference alpha of the uniform run (default ``2 * avg_rank``) and how
            per-matrix alpha follows the rank (``proportional`` keeps alpha/r constant).
        seed, num_probes: the ``hutchinson`` probes (``seed`` also draws the gradient init's ``A``).
        init, init_step: the adapter initialisation on the allocated ranks
            (:mod:`senslora.core.inits`); None takes the preset's (``PRESET_INITS``; ``robust``:
            ``gradient``, which falls back to ``zero`` with a warning on calibration batches without
            labels or a model with offloaded blocks); ``paper`` always means ``zero``.
    """

    avg_rank: float = _f(
        4,
        "average LoRA rank (paper: 4 for NLU, 8 for NLG); the budget is uniform LoRA of this rank",
        range=POSITIVE,
    )
    preset: str | None = _f(
        None,
        "allocation recipe: robust (chosen on validation data; docs/METHOD-NOTES.md) or paper "
        "(Sensitivity-LoRA as published); the flags below override it",
    )
    estimator: str | None = _f(None, "Hessian-diagonal estimator")
    sink: str | None = _f(
        None,
        "activation: drop each sequence's first token (decoders' attention sink, massive "
        "activations) or keep it",
    )
    token_trim: float | None = _f(
        None, "activation: leave out this fraction of each batch's highest-energy tokens, in [0, 0.5)"
    )
    saliency: str | None = _f(None, "hessian: h_ij (paper); obd: h_ij * w_ij^2, Optimal Brain Damage")
    score: str | None = _f(None, "allocation weight: the fused score (the paper's) or one metric")
    fusion: str | None = _f(None, "metric weights: sigma/mu^2 (paper) or 0.5/mu")
    strategy: str | None = _f(None, "SRA (proportional) or PRA (rank categories)")
    categories: int = _f(3, "PRA: number of rank categories", range=COUNT)
    topk_fraction: float | None = _f(None, "Top-k: k = fraction x N")
    alpha: float | None = _f(None, "Effective Rank energy threshold")
    temperature: float | None = _f(
        None, "allocate by theta^T, T in (0, 1]; 1 is the paper's proportional rule"
    )
    normalize: str | None = _f(
        None,
        "role: compare each matrix only with the same role in other layers (q with q, down with down)",
    )
    rho: float | None = _f(None, "cap every rank at rho x the average rank (EVA's rule), >= 1; 0: no cap")
    r_min: int = _f(1, "smallest rank per matrix (0 drops matrices)", range=Range(0, integer=True))
    r_max: int | None = _f(
        None, "largest rank per matrix (default min(d_in, d_out))", range=Range(0, integer=True)
    )
    budget_mode: str = _f("rank", "hold the rank sum or the parameter count fixed")
    target_modules: str | Sequence[str] | None = _f(
        None,
        "regex selecting target modules by full name, or a list of module names or name suffixes "
        "(default: all linears in blocks)",
    )
    layers: Sequence[int] | None = _f(None, "keep only the target matrices of these block indices")
    lora_alpha: float | None = _f(
        None, "reference LoRA alpha of the uniform run (default 2 x avg rank)", range=POSITIVE
    )
    alpha_mode: str = _f("proportional", "how per-matrix alpha follows the rank")
    seed: int = _f(0, "seed of the hutchinson probes and of the gradient init's random A", range=SEED)
    num_probes: int = _f(1, "hutchinson: Rademacher probes per batch", range=COUNT)
    init: str | None = _f(
        None,
        "adapter initialisation on the allocated ranks: zero (PEFT's, B = 0), gradient (ours: B "
        "from the calibration gradient, W unchanged), or PEFT's pissa, olora, corda, eva, lora-ga "
        "(docs/METHOD-NOTES.md)",
    )
    init_step: float = _f(
        1e-4, "gradient init: entry size of the initial update (a normalised gradient step), > 0", range=POSITIVE
    )

    def __post_init__(self) -> None:
        #: Whether ``init`` is the preset's (not given): only then may :func:`allocate` fall back
        #: to ``zero`` where it cannot run (core/presets.py ``PRESET_INITS``); a given one is an error.
        self.init_from_preset = self.init is None
        if self.init is None:
            self.init = preset_init(self.preset)
        self.validate()

    def recipe(self) -> dict[str, Any]:
        """The full recipe: the preset's values under every recipe field that is not None."""
        recipe = resolve(self.preset, **{k: getattr(self, k) for k in RECIPE_KEYS})
        if recipe["estimator"] != "activation" and self.sink is None and self.token_trim is None:
            # The preset's token statistics belong to the activation estimator; gradient estimators
            # see every token through the task loss.
            recipe.update(sink="keep", token_trim=0.0)
        return recipe

    def validate(self) -> None:
        """One-line :class:`SensloraError` naming the first value that is not acceptable."""
        from .inits import check_init
        from .peft_bridge import ALPHA_MODES

        check_recipe(self.recipe())
        check_init(self.init, self.preset)
        if not is_number(self.init_step) or self.init_step <= 0:
            raise SensloraError(f"--init-step must be a positive number, got {self.init_step!r}")
        if self.budget_mode not in BUDGET_MODES:
            raise SensloraError(
                f"unknown budget mode {self.budget_mode!r}; choose one of {', '.join(BUDGET_MODES)}"
            )
        if self.alpha_mode not in ALPHA_MODES:
            raise SensloraError(
                f"unknown alpha mode {self.alpha_mode!r}; choose one of {', '.join(ALPHA_MODES)}"
            )
        check_fields(self)  # every number against the range its field declares
        layers = self.layers or []
        if isinstance(layers, (str, bytes)) or not all(Range(0, integer=True).accepts(i) for i in layers):
            raise SensloraError(f"layers must be a list of block indices (integers >= 0), got {self.layers!r}")
        if self.r_max is not None and self.r_max < max(self.r_min, 1):
            raise SensloraError(f"--r-max {self.r_max} is below --r-min {self.r_min}; raise --r-max")
        if self.avg_rank < self.r_min:
            raise SensloraError(
                f"--avg-rank {self.avg_rank} is below --r-min {self.r_min}; raise --avg-rank or lower --r-min"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
