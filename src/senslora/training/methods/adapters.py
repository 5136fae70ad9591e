"""Bottleneck adapters: ``houlsby`` (Houlsby et al., 2019) and ``pfeiffer`` (Pfeiffer et al., 2021).

Why our own: AdapterHub's ``adapters`` library implements both, but its latest release (1.3.0)
requires ``transformers ~= 4.57.6`` and this project runs transformers 5.x, so it cannot be
installed alongside. The two designs are small enough to write here.

An adapter is ``h + up(GELU(down(dropout(h))))`` with ``down: d -> m`` and ``up: m -> d``; ``up``
starts at zero, so the adapted model first computes exactly what the base model does. It is
applied to the *output* of a projection (a forward hook on that module, the adapter being its
child ``bottleneck_adapter``), i.e. before the block's residual connection and layer norm:

- houlsby: after the attention output projection and after the FFN output projection of every
  block;
- pfeiffer: after the FFN output projection only.

The projections are found by their name inside each transformer block (see :data:`PLACES`):
BERT ``attention.output.dense`` / ``output.dense``, LLaMA-style ``self_attn.o_proj`` /
``mlp.down_proj``, GPT-2 ``attn.c_proj`` / ``mlp.c_proj``.

Budget: with ``n`` adapters of width ``d`` an adapter costs ``2 d m + m + d`` parameters; the
bottleneck ``m >= 1`` is the integer that brings ``sum over adapters`` closest to uniform LoRA's
``avg_rank * sum over targets (d_in + d_out)``, i.e.
``m = round((B - sum d) / sum (2 d + 1))``.

Only the adapters and the task head (modules named ``classifier`` / ``score``) are trained;
saving writes those tensors as safetensors plus a JSON with ``m`` and the placement, and loading
rebuilds the adapters on a fresh base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ...core.errors import SensloraError
from ...core.targets import find_blocks, weight_shape
from ...data.models import is_head_parameter
from ._shared import lora_reference_params, method_targets, uniform_rank
from .base import Method, MethodContext, register

#: Relative names (inside a block) of the projections an adapter follows, first match wins.
PLACES: dict[str, tuple[str, ...]] = {
    "attention": ("attention.output.dense", "self_attn.o_proj", "attn.c_proj"),
    "ffn": ("output.dense", "mlp.down_proj", "mlp.c_proj"),
}
ADAPTER_ATTR = "bottleneck_adapter"
WEIGHTS_FILE = "bottleneck_adapters.safetensors"
CONFIG_FILE = "bottleneck_adapters.json"


class BottleneckAdapter(nn.Module):
    """``h + up(GELU(down(dropout(h))))``, the identity at initialisation (``up = 0``)."""

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Seeded init: ``down`` like ``nn.Linear`` (and LoRA's A), ``up`` and biases zero."""
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5, generator=generator)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(self.dropout(hidden))))


def _apply_adapter(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    # Forward hook on the adapted projection: its output goes through its adapter.
    return getattr(module, ADAPTER_ATTR)(output)


def adapter_sites(model: nn.Module, places: tuple[str, ...]) -> list[str]:
    """Full names of the modules an adapter follows, block by block, in ``places`` order."""
    blocks = find_blocks(model)
    if blocks is None:
        raise SensloraError("bottleneck adapters need a model with transformer blocks; none was found")
    prefix, layers = blocks
    sites = []
    for i, block in enumerate(layers):
        names = dict(block.named_modules())
        for place in places:
            found = next((rel for rel in PLACES[place] if rel in names), None)
            if found is None:
                raise SensloraError(
                    f"no {place} output projection ({' / '.join(PLACES[place])}) in block {prefix}.{i}; "
                    "bottleneck adapters support BERT-, LLaMA- and GPT-2-style blocks"
                )
            sites.append(f"{prefix}.{i}.{found}" if prefix else f"{i}.{found}")
    return sites


def bottleneck_size(dims: list[int], budget: int) -> int:
    """The ``m >= 1`` whose adapter parameters ``sum(2 d m + m + d)`` come closest to ``budget``."""
    per_unit = sum(2 * d + 1 for d in dims)
    return max(1, round((budget - sum(dims)) / per_unit))


def _add_adapters(model: nn.Module, sites: list[str], bottleneck: int, dropout: float) -> None:
    for name in sites:
        module = model.get_submodule(name)
        dim = weight_shape(module)[0]  # output width of the projection
        adapter = BottleneckAdapter(dim, bottleneck, dropout).to(module.weight.device, module.weight.dtype)
        module.add_module(ADAPTER_ATTR, adapter)
        module.register_forward_hook(_apply_adapter)


def _is_trained(name: str) -> bool:
    return f".{ADAPTER_ATTR}." in name or is_head_parameter(name)


def _set_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(_is_trained(name))


class BottleneckMethod(Method):
    """Shared implementation; subclasses set :attr:`places`."""

    is_peft = False
    mergeable = False  # the adapters are extra modules: nothing to fold into the base weights
    places: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._config: dict[str, object] = {}  # what save() writes next to the weights

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        sites = adapter_sites(model, self.places)
        dims = [weight_shape(model.get_submodule(s))[0] for s in sites]
        reference = lora_reference_params(method_targets(model, ctx), uniform_rank(ctx, self.name))
        bottleneck = bottleneck_size(dims, reference)
        _add_adapters(model, sites, bottleneck, ctx.lora_dropout)
        generator = torch.Generator().manual_seed(ctx.seed)
        for site in sites:
            getattr(model.get_submodule(site), ADAPTER_ATTR).reset_parameters(generator)
        _set_trainable(model)
        self.record.update(
            bottleneck=bottleneck,
            placement=list(self.places),
            adapters=len(sites),
            adapter_params=sum(2 * d * bottleneck + bottleneck + d for d in dims),
            lora_reference_params=reference,
        )
        self._config = {
            "method": self.name,
            "bottleneck": bottleneck,
            "places": list(self.places),
            "sites": sites,
        }
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if _is_trained(n)}
        save_file(tensors, str(out_dir / WEIGHTS_FILE))
        (out_dir / CONFIG_FILE).write_text(json.dumps(self._config, indent=2) + "\n")

    def load(self, base_model: nn.Module, adapter_dir: Path, ctx: MethodContext) -> nn.Module:
        from safetensors.torch import load_file

        config = json.loads((adapter_dir / CONFIG_FILE).read_text())
        if config["method"] != self.name:
            raise SensloraError(f"{adapter_dir} holds {config['method']} adapters, not {self.name}")
        _add_adapters(base_model, config["sites"], config["bottleneck"], ctx.lora_dropout)
        tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
        unexpected = base_model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise SensloraError(
                f"{adapter_dir / WEIGHTS_FILE} does not fit this base model: {unexpected[:3]}"
            )
        _set_trainable(base_model)
        self._config = config
        return base_model


@register
class Houlsby(BottleneckMethod):
    """Adapters after the attention output and the FFN output of every block."""

    name = "houlsby"
    places = ("attention", "ffn")


@register
class Pfeiffer(BottleneckMethod):
    """One adapter after the FFN output of every block."""

    name = "pfeiffer"
    places = ("ffn",)
