"""Where the megatron-core releases this package supports differ: the one place that knows.

Supported (each run by CI, see docs/TESTING.md "megatron-core versions"): 0.16.1, 0.17.1, 0.18.2,
0.19.2. Everything else in the package reads megatron-core through surfaces that are the
same in all four; the surfaces below changed shape between them.

| surface                    | 0.16.1, 0.17.1                            | 0.18.2, 0.19.2                                   |
| -------------------------- | ----------------------------------------- | ------------------------------------------------ |
| MoE layer spec             | ``ModuleSpec(module=MoELayer, submodules,  | ``functools.partial(MoELayer, submodules=...)``  |
|                            | params)``                                 |                                                  |
| building a MoE layer       | ``build_module(spec, config=, layer_number=,| ``spec(config=, pg_collection=, is_mtp_layer=)``  |
|                            | pg_collection=)``                         | then ``set_layer_number``                        |
| recording a MoE metric     | ``moe_utils.save_to_aux_losses_tracker``  | ``moe_logging.get_moe_metrics_tracker().record`` |
| reporting MoE metrics      | ``moe_utils.track_moe_metrics``           | ``get_moe_metrics_tracker().report``             |

(0.18.2 has both trackers; its ``save_to_aux_losses_tracker`` is the deprecated shim.)
Handled version-independently elsewhere: without a capacity factor the alltoall dispatcher's
permutation is sized tokens x topk, unused in 0.16.1 and a hard cut from 0.17.1 on; LTDR's
variable experts per token need it sized by the routing map in every version
(``ltdr/dispatch.py``). ``TopKRouter.routing(logits, padding_mask)``, the surface LTDR's
modality balancing uses, has the same meaning in all four.
The Gumbel-sampled second expert (``routing/gumbel.py``) takes the top-k selection through
the router's ``router_replay`` slot: ``TopKRouter.routing`` hands ``self.router_replay`` to
``topk_routing_with_score_function``, which calls ``router_replay.get_replay_topk(scores,
topk, num_groups, group_topk, default_compute_topk)`` for the (values, indices) of the top-k
and builds probs and routing map from them (softmax over the chosen logits for top-k-then-
softmax). Same slot, same call, in 0.16.1 and 0.19.2 (0.19.2's ``set_layer_number`` also sets
``router_replay.layer_number``); the fused router (``moe_router_fusion``) bypasses it.
``install_topk_selection`` is the one place that sets it. The eval capacity factor
(``routing/capacity.py``) switches ``moe_expert_capacity_factor`` on the layer's config, the
field the router and the alltoall dispatcher read per forward in both versions (megatron's
own decode path switches it the same way: ``inference/utils.py``,
``set_decode_expert_padding``).
A spec of any other shape is not guessed at: ``moe_spec_parts`` returns None and the
STGC spec code turns that into ``UnsupportedMegatronCore`` when ``--stgc`` finds no layer.

``padding_mask`` (read in the 0.16.1, 0.17.1, 0.18.2 and 0.19.2 sources; the lines that
touch it are the same in all four unless said): ``GPTModel.forward(..., padding_mask)``,
bool [b, s], **True = padding** (GPTModel's and ``z_loss_func``'s docstrings say so and every
use inverts it; the router's docstrings say the opposite, the code does not). GPTModel
scatters it for sequence parallelism only when it embeds the tokens itself: a caller passing
``decoder_input`` (our MoE-LLaVA) must cut it (we run vision-language models at TP 1).
TransformerLayer hands it to the MLP (dense MLPs ignore it), MoELayer transposes it to
[s, b], ``MoELayer.route`` calls ``router(hidden_states, padding_mask)`` (positionally; our
expert-load hooks read it there: ``router_padding_mask``) and ``TopKRouter.routing`` flattens
it to megatron's s*b token order. With it:
  * z-loss: a mean over the non-padding tokens;
  * aux_loss, seq_aux_loss, global_aux_loss: the scores and the top-k map of the balancing
    loss are zeroed on padding and the token counts (the normaliser) come from that map, so
    the loss and its gradient are those of the real tokens alone (padding gets no gradient);
  * the aux-loss-free expert bias counts non-padding tokens only.
  It does NOT change: the top-k routing itself (padding rows get experts, the alltoall and
  allgather dispatchers send them, experts compute them; nothing uses their output, and with
  causal attention and no loss they receive no gradient), nor token dropping: with
  ``--moe-expert-capacity-factor`` the capacity counts padding tokens and they compete for
  slots (``apply_router_token_dropping`` takes no mask). Cutting rows to the longest sample
  and packing (data/sequences.py) is what keeps that padding small.
  Differences: 0.17.1+ ``InferenceTopKRouter`` ignores it in inference mode (not used here);
  0.18.2+ also passes it to multi-token-prediction layers (not used here); 0.19.2's
  quantile-balancing router rejects it (not used here) and un-flattens THD-packed micro-batches
  for the MoE layers when ``PackedSeqParams.tokens_per_sample`` is set (we leave it unset: the
  seq_aux_loss then sees one sequence; our runs use aux_loss). No bridge needed.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import megatron.core
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

TESTED_VERSIONS = ("0.16.1", "0.17.1", "0.18.2", "0.19.2")
VERSION = megatron.core.__version__


class UnsupportedMegatronCore(RuntimeError):
    """megatron-core built something this package does not know how to attach STGC to."""


def version_note() -> str:
    tested = "" if VERSION in TESTED_VERSIONS else " (not a version CI tests)"
    return f"megatron-core {VERSION}{tested}; tested: {', '.join(TESTED_VERSIONS)}"


# -- MoE layer specs ------------------------------------------------------------------

@dataclass
class MoESpecParts:
    """A MoE layer spec taken apart: the layer class, its MoESubmodules, its extra kwargs."""

    layer_class: type
    submodules: Any  # megatron-core MoESubmodules
    params: dict
    shape: str  # "module_spec" | "partial"


def moe_spec_parts(spec) -> MoESpecParts | None:
    """The parts of a MoE layer spec, or None when ``spec`` is not one (or of unknown shape)."""
    if isinstance(spec, ModuleSpec):
        if isinstance(spec.module, type) and issubclass(spec.module, MoELayer):
            return MoESpecParts(spec.module, spec.submodules, dict(spec.params or {}),
                                "module_spec")
        return None
    if isinstance(spec, functools.partial):
        if isinstance(spec.func, type) and issubclass(spec.func, MoELayer) and not spec.args:
            params = dict(spec.keywords)
            submodules = params.pop("submodules", None)
            return MoESpecParts(spec.func, submodules, params, "partial")
    return None


def describe_spec(spec) -> str:
    """What a spec is, for error messages."""
    if isinstance(spec, ModuleSpec):
        return f"ModuleSpec(module={getattr(spec.module, '__name__', spec.module)})"
    if isinstance(spec, functools.partial):
        return f"functools.partial({getattr(spec.func, '__name__', spec.func)}, ...)"
    return type(spec).__name__


def rebuild_moe_spec(parts: MoESpecParts, layer_class: type, submodules, **params):
    """A spec of the same shape as the one ``parts`` came from, with new class/submodules/params."""
    merged = dict(parts.params, **params)
    if parts.shape == "module_spec":
        return ModuleSpec(module=layer_class, submodules=submodules, params=merged)
    return functools.partial(layer_class, submodules=submodules, **merged)


def replace_router(submodules, router_class):
    """MoESubmodules with ``router`` replaced (a dataclass in every supported version)."""
    return dataclasses.replace(submodules, router=router_class)


def install_topk_selection(router, selection) -> None:
    """Make ``selection.get_replay_topk(...)`` choose the top-k experts of ``router``
    (megatron-core's ``router_replay`` slot, see the module docstring)."""
    if not hasattr(router, "router_replay"):
        raise UnsupportedMegatronCore(f"{type(router).__name__} has no router_replay slot for "
                                      f"a top-k selection ({version_note()})")
    if router.router_replay is not None:
        raise ValueError("megatron-core's moe_enable_routing_replay already uses the router's "
                         "top-k slot; it cannot be combined with a Gumbel-sampled second expert")
    if getattr(router.config, "moe_router_fusion", False):
        raise ValueError("the fused top-k router (moe_router_fusion) bypasses the top-k "
                         "selection slot; the Gumbel-sampled second expert needs it off")
    router.router_replay = selection


def build_moe_layer(spec, config, layer_number: int = 1, pg_collection=None):
    """Build a MoE layer from its spec the way each version's TransformerLayer does."""
    parts = moe_spec_parts(spec)
    if parts is None:
        raise UnsupportedMegatronCore(f"not a MoE layer spec: {describe_spec(spec)} "
                                      f"({version_note()})")
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    if parts.shape == "module_spec":
        return build_module(spec, config=config, layer_number=layer_number, **kwargs)
    layer = spec(config=config, is_mtp_layer=False, **kwargs)
    layer.set_layer_number(layer_number)
    return layer


# -- megatron-core's MoE metric tracker ----------------------------------------------

def _metrics_tracker():
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # 0.16, 0.17
        return None
    return get_moe_metrics_tracker()


def record_moe_metric(name: str, value: torch.Tensor, layer_number: int, num_layers: int) -> None:
    """Add ``value`` (0-d, already the same on every rank) to megatron's tracker for the layer.

    No reduce or average group: megatron only sums over pipeline stages, which hold
    different layers. The value stays on its device (no host copy).
    """
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.record(name, value.detach(), layer_number, num_layers,
                       reduce_group=None, avg_group=None, needs_dp_avg=False)
        return
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    save_to_aux_losses_tracker(name, value.detach(), layer_number, num_layers,
                               reduce_group=None, avg_group=None)


def reset_moe_metrics() -> None:
    """Empty megatron's process-global MoE metric tracker(s). The tracker sizes each metric by
    the num_layers it first sees, so a model built in the same process after one with fewer
    layers would index past it (seen: a 1-layer model, then a 2-layer one)."""
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:  # 0.16, 0.17
        pass
    else:
        destroy_moe_metrics_tracker()
    from megatron.core.transformer.moe import moe_utils

    legacy = getattr(moe_utils, "get_moe_layer_wise_logging_tracker", None)
    if legacy is not None:  # 0.16-0.18
        legacy().clear()


def report_moe_metrics(loss_scale: float, num_layers: int, moe_layer_freq) -> dict[str, float]:
    """megatron's tracked MoE metrics, reduced and averaged over MoE layers, then cleared.

    Collective (megatron all-reduces over the pipeline group and each metric's groups).
    """
    totals: dict[str, torch.Tensor] = {}
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.report(loss_scale=loss_scale, iteration=0, total_loss_dict=totals,
                       num_layers=num_layers, moe_layer_freq=moe_layer_freq)
    else:
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        track_moe_metrics(loss_scale=loss_scale, iteration=0, total_loss_dict=totals,
                          num_layers=num_layers, moe_layer_freq=moe_layer_freq)
    return {name: float(value) for name, value in totals.items()}


# -- megatron-core's main-loss backward scale -----------------------------------------

def main_loss_backward_scale(device) -> torch.Tensor:
    """The scale megatron's schedule gives MoE aux losses (0-d, on ``device``, no host sync).

    Set by the forward step of every supported version: loss scale x CP size /
    micro-batches (1 before the first step). Read from ``MoEAuxLossAutoScaler``.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    if scale is None:
        return torch.ones((), device=device)
    return scale.detach().float().reshape(()).to(device)


# -- the padding mask a router was called with ------------------------------------------

def router_padding_mask(args: tuple, kwargs: dict):
    """The ``padding_mask`` of a ``TopKRouter.forward`` call seen by a forward hook (with
    kwargs), or None: ``MoELayer.route`` passes it as the second positional argument in every
    supported version; a keyword is accepted too."""
    if "padding_mask" in kwargs:
        return kwargs["padding_mask"]
    return args[1] if len(args) > 1 else None


# -- the routing tracer (--moe-routing-trace-path) --------------------------------------

# megatron-core's RouterTracer (transformer/moe/router_trace.py) first shipped in 0.19.0
# (Megatron-LM commit c1560d9481, "MoE routing analysis and metrics capture", first tag
# core_v0.19.0); 0.16.1 .. 0.18.2 have no such module.
ROUTER_TRACE_SINCE = "0.19.0"


def router_tracer_class():
    """megatron-core's ``RouterTracer`` class, or None where this megatron-core has none."""
    try:
        from megatron.core.transformer.moe.router_trace import RouterTracer
    except ImportError:
        return None
    return RouterTracer
