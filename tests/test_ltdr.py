"""LTDR (arXiv 2507.01351) on real megatron-core MoE layers: the issue's required checks.

* RPV, the tail threshold and the top-a routing map against a hand computation;
* the balancing loss with LTDR is megatron's on the text tokens alone, blind to image logits;
* layout invariance (EP=2, DP2 x EP1 vs one process): routing maps, tail flags, router grads;
* STGC + LTDR: STGC's oracle holds with a variable number of experts per token;
* no image token in the batch: plain megatron-core, bit for bit.
"""

import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.moe.moe_utils import get_capacity, get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from dist_utils import run_on_ranks
from stgc_utils import STGCConfig, init_single_process, moe_config, oracle_pair_cosines
from megatron_stgc.ltdr.config import LTDRConfig
from megatron_stgc.ltdr.dispatch import ltdr_layers, prepare_ltdr_layers
from megatron_stgc.ltdr.metrics import collect_ltdr_metrics
from megatron_stgc.ltdr.router import LTDRRouter, STGCLTDRRouter
from megatron_stgc.ltdr.spec import ltdr_moe_spec
from megatron_stgc.mcore_compat import build_moe_layer, report_moe_metrics
from megatron_stgc.model.modality import IMAGE, PAD, TEXT, ModalityContext
from megatron_stgc.stgc.spec import stgc_moe_spec

E = 4


def _router(router_class, config, **kwargs):
    router = router_class(config, pg_collection=get_default_pg_collection(), **kwargs)
    router.set_layer_number(1)
    return router.train()


def _context(modality_flat: torch.Tensor, seq: int, batch: int) -> ModalityContext:
    """A ModalityContext holding ``modality_flat`` ([s*b], megatron's router order)."""
    context = ModalityContext()
    context.set(modality_flat.reshape(seq, batch).t())  # set() takes [b, s]
    return context


def _layer(config, ltdr: LTDRConfig | None, stgc: STGCConfig | None = None, seed: int = 1234):
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)
    if stgc is not None:
        spec = stgc_moe_spec(spec, stgc)
    if ltdr is not None:
        spec = ltdr_moe_spec(spec, ltdr)
    layer = build_moe_layer(spec, config, layer_number=1)
    layer.set_layer_number(1)  # what megatron's TransformerLayer does
    prepare_ltdr_layers(layer)  # what model/gpt.py does after building
    return layer.train()


# -- 1. RPV, threshold, top-a map by hand ------------------------------------------------

HAND_LOGITS = [  # rows in router order; modality per row below
    [2.0, 1.0, 0.0, -1.0],  # text
    [2.5, 0.2, 0.1, 0.0],  # image, peaked: tail
    [0.1, 0.0, 0.3, 0.2],  # image, flat
    [3.0, 1.0, 0.0, 0.4],  # image, peaked: tail
    [0.0, 0.1, 0.2, 5.0],  # text, peaked (text is never tail)
    [0.5, 0.4, 0.3, 0.2],  # image, flat
]
HAND_MODALITY = [TEXT, IMAGE, IMAGE, IMAGE, TEXT, IMAGE]


def _softmax(row):
    exps = [math.exp(x) for x in row]
    return [x / sum(exps) for x in exps]


def _hand_top(row, count):
    """(indices of the ``count`` largest logits, their softmax over those ``count``)."""
    chosen = sorted(range(len(row)), key=lambda e: -row[e])[:count]
    weights = _softmax([row[e] for e in chosen])
    return chosen, dict(zip(chosen, weights))


def test_rpv_threshold_and_top_a_routing_by_hand():
    init_single_process()
    rpv = [sum((p - 1 / E) ** 2 for p in _softmax(row)) / E for row in HAND_LOGITS]
    image_rpv = [v for v, m in zip(rpv, HAND_MODALITY) if m == IMAGE]
    threshold = sum(image_rpv) / len(image_rpv)
    tail = [m == IMAGE and v > threshold for v, m in zip(rpv, HAND_MODALITY)]
    assert tail == [False, True, False, True, False, False]

    router = _router(LTDRRouter, moe_config(moe_router_topk=2),
                     ltdr_config=LTDRConfig(enabled=True, top_a=3))
    router.modality = _context(torch.tensor(HAND_MODALITY), 3, 2)
    logits = torch.tensor(HAND_LOGITS).reshape(3, 2, E)
    probs, routing_map = router.routing(logits)

    assert math.isclose(float(router.ltdr_last.threshold), threshold, rel_tol=1e-6)
    assert router.ltdr_last.tail.tolist() == tail
    for n, row in enumerate(HAND_LOGITS):
        chosen, weights = _hand_top(row, 3 if tail[n] else 2)
        assert sorted(routing_map[n].nonzero().flatten().tolist()) == sorted(chosen)
        for e in range(E):
            assert math.isclose(float(probs[n, e]), weights.get(e, 0.0), abs_tol=1e-6)


def test_pre_softmax_tail_weights_are_the_full_softmax():
    """--moe-router-pre-softmax: a tail token's a weights are softmax over all experts."""
    init_single_process()
    router = _router(LTDRRouter, moe_config(moe_router_topk=1),
                     ltdr_config=LTDRConfig(enabled=True, top_a=3))
    router.modality = _context(torch.tensor(HAND_MODALITY), 3, 2)
    probs, routing_map = router.routing(torch.tensor(HAND_LOGITS).reshape(3, 2, E))
    full = _softmax(HAND_LOGITS[1])
    assert routing_map[1].sum() == 3 and routing_map[0].sum() == 1
    for e in routing_map[1].nonzero().flatten().tolist():
        assert math.isclose(float(probs[1, e]), full[e], abs_tol=1e-6)


# -- 2. modality-specific balancing ------------------------------------------------------

def _aux_loss_and_logit_grad(router, logits):
    """megatron's logged load_balancing_loss and d(aux loss)/d(logits) of one routing."""
    from stgc_utils import forget_tracked_moe_metric

    forget_tracked_moe_metric("load_balancing_loss")  # other tests' leftovers, other sizes
    logits = logits.clone().requires_grad_(True)
    probs, _ = router.routing(logits)
    (probs.sum() * 0).backward()
    losses = report_moe_metrics(1.0, num_layers=1, moe_layer_freq=1)
    return losses["load_balancing_loss"], logits.grad


def test_balancing_loss_is_megatrons_on_text_tokens_alone():
    init_single_process()
    config = moe_config(moe_aux_loss_coeff=0.01)
    seq, batch = 12, 2
    gen = torch.Generator().manual_seed(3)
    modality = torch.where(torch.rand(seq * batch, generator=gen) < 0.5, IMAGE, TEXT)
    text = modality == TEXT
    logits = torch.randn(seq, batch, E, generator=gen)

    ltdr = _router(LTDRRouter, config, ltdr_config=LTDRConfig(enabled=True))
    ltdr.modality = _context(modality, seq, batch)
    loss, grad = _aux_loss_and_logit_grad(ltdr, logits)
    plain = _router(TopKRouter, config)
    text_logits = logits.reshape(-1, E)[text].reshape(-1, 1, E)
    text_loss, text_grad = _aux_loss_and_logit_grad(plain, text_logits)

    assert math.isclose(loss, text_loss, rel_tol=1e-6)
    flat_grad = grad.reshape(-1, E)
    assert torch.allclose(flat_grad[text], text_grad.reshape(-1, E), atol=1e-9)
    assert torch.equal(flat_grad[~text], torch.zeros_like(flat_grad[~text]))

    moved = logits.clone().reshape(-1, E)
    moved[~text] = torch.randn(int((~text).sum()), E, generator=gen) * 5
    moved_loss, moved_grad = _aux_loss_and_logit_grad(ltdr, moved.reshape(seq, batch, E))
    assert moved_loss == loss
    assert torch.equal(moved_grad.reshape(-1, E)[text], flat_grad[text])


def test_seq_aux_loss_ignores_image_tokens():
    init_single_process()
    config = moe_config(moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="seq_aux_loss")
    seq, batch = 12, 2
    gen = torch.Generator().manual_seed(4)
    modality = torch.where(torch.rand(seq * batch, generator=gen) < 0.5, IMAGE, TEXT)
    logits = torch.randn(seq, batch, E, generator=gen)
    ltdr = _router(LTDRRouter, config, ltdr_config=LTDRConfig(enabled=True))
    ltdr.modality = _context(modality, seq, batch)
    moved = logits.clone().reshape(-1, E)
    moved[modality == IMAGE] *= 7
    losses = []
    for flat in (logits.reshape(-1, E), moved):
        ltdr.routing(flat.reshape(seq, batch, E).clone().requires_grad_(True))
        losses.append(report_moe_metrics(1.0, num_layers=1, moe_layer_freq=1)
                      ["seq_load_balancing_loss"])
    assert losses[0] == losses[1] > 0


# -- 3. no image token: plain megatron-core ----------------------------------------------

@pytest.mark.parametrize("with_stgc", [False, True])
def test_without_image_tokens_ltdr_is_plain_megatron(with_stgc):
    init_single_process()
    config = moe_config(moe_aux_loss_coeff=0.01)
    stgc = STGCConfig(enabled=True) if with_stgc else None
    plain = _layer(config, None, stgc)
    ltdr = _layer(config, LTDRConfig(enabled=True), stgc)
    ltdr.load_state_dict(plain.state_dict())
    seq, batch = 16, 2
    modality = torch.full((seq * batch,), TEXT)
    modality[-6:] = PAD
    ltdr.router.modality = _context(modality, seq, batch)
    gen = torch.Generator().manual_seed(5)
    hidden, weights = torch.randn(seq, batch, 16, generator=gen), torch.randn(seq, batch, 16,
                                                                              generator=gen)
    outputs = []
    for layer in (plain, ltdr):
        out, _ = layer(hidden)
        (out * weights).sum().backward()
        outputs.append((out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    assert torch.equal(outputs[0][0], outputs[1][0])
    for name, grad in outputs[0][1].items():
        assert torch.equal(grad, outputs[1][1][name]), name


# -- 4. layout invariance -----------------------------------------------------------------

SEQ, BATCH, HIDDEN = 16, 4, 16


def _layout_batch():
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    weights = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    modality = torch.where(torch.rand(BATCH, SEQ, generator=gen) < 0.6, IMAGE, TEXT)  # [b, s]
    return hidden, weights, modality


def _layout_layer(overrides, with_stgc):
    stgc = STGCConfig(enabled=True, beta=1.0) if with_stgc else None
    return _layer(moe_config(**overrides), LTDRConfig(enabled=True, top_a=3), stgc)


def _layout_step(rank, world, layout, state):
    """This rank's share of the global micro-batch through an LTDR layer: maps, flags, grads
    (and STGC's conflict flags when the layout has STGC)."""
    _, overrides, with_stgc = layout
    layer = _layout_layer(overrides, with_stgc)
    _load_global(layer, state)
    hidden, weights, modality = _layout_batch()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    hidden, weights = hidden[:, share].contiguous(), weights[:, share].contiguous()
    layer.router.modality = ModalityContext()
    layer.router.modality.set(modality[share])
    out, _ = layer(hidden)
    ((out * weights).sum() / out[..., 0].numel()).backward()
    router_grad = layer.router.weight.grad.clone()
    if world > 1:
        dist.all_reduce(router_grad)
    report = layer.router.ltdr_last
    none = torch.zeros(1, dtype=torch.bool)
    conflicts = layer.stgc.last.conflicts if with_stgc else none
    judged = ~torch.isnan(layer.stgc.last.cos) if with_stgc else none
    return {"tail": report.tail, "map": report.routing_map, "router_grad": router_grad / world,
            "is_image": report.is_image, "conflicts": conflicts, "judged": judged}


def _layout_ranks(rank, world, layouts, states):
    """Every layout on the same two ranks (one process start for all of them)."""
    results = []
    for layout, state in zip(layouts, states):
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=layout[0])
        results.append(_layout_step(rank, world, layout, state))
        parallel_state.destroy_model_parallel()
    return results


def _load_global(layer, state):
    offset = layer.local_expert_indices[0]
    with torch.no_grad():
        for name, tensor in layer.state_dict().items():
            if ".local_experts." in name:
                head, tail = name.split(".local_experts.", 1)
                index, rest = tail.split(".", 1)
                name_global = f"{head}.local_experts.{int(index) + offset}.{rest}"
            else:
                name_global = name
            if torch.is_tensor(tensor):
                tensor.copy_(state[name_global])


def _rows_of(tensor, rank, world):
    per = BATCH // world
    return tensor.reshape(SEQ, BATCH, -1)[:, rank * per:(rank + 1) * per].reshape(SEQ * per, -1)


LAYOUTS = [  # (EP size on 2 ranks, overrides, STGC on): EP=2 and DP2 x EP1
    (2, dict(moe_router_topk=2, moe_token_dispatcher_type="alltoall"), False),
    (1, dict(moe_router_topk=1, moe_token_dispatcher_type="allgather"), False),
    (2, dict(moe_router_topk=2, moe_token_dispatcher_type="alltoall", gated_linear_unit=True),
     True),
]


def test_layouts_match_one_process():
    """EP=2 (alltoall, top-2; also with STGC) and DP2 x EP1 (allgather, top-1) against one
    process."""
    init_single_process()
    states, references = [], []
    for layout in LAYOUTS:
        layer = _layout_layer(layout[1], layout[2])
        states.append({n: t.detach().clone() for n, t in layer.state_dict().items()
                       if torch.is_tensor(t)})
        references.append(_layout_step(0, 1, layout, states[-1]))
    per_rank = run_on_ranks(_layout_ranks, 2, LAYOUTS, states)
    for index, reference in enumerate(references):
        assert reference["tail"].any() and (reference["is_image"] & ~reference["tail"]).any()
        if LAYOUTS[index][2]:  # STGC judges tail tokens' extra pairs, and flags some pairs
            assert (reference["judged"][reference["tail"]].sum(dim=1) > 2).any()
            assert reference["conflicts"].any()
        for rank in range(2):
            result = per_rank[rank][index]
            assert torch.equal(result["tail"], _rows_of(reference["tail"], rank, 2).flatten())
            assert torch.equal(result["map"], _rows_of(reference["map"], rank, 2))
            if LAYOUTS[index][2]:
                assert torch.equal(result["conflicts"], _rows_of(reference["conflicts"], rank, 2))
            assert torch.allclose(result["router_grad"], reference["router_grad"], atol=1e-6,
                                  rtol=1e-5)


# -- 5. STGC + LTDR: the oracle with variable experts per token ---------------------------

@pytest.mark.parametrize("topk,capacity", [(2, None), (1, None), (2, 1.0)])
def test_stgc_oracle_with_tail_tokens(topk, capacity):
    init_single_process()
    config = moe_config(moe_router_topk=topk, gated_linear_unit=True,
                        moe_expert_capacity_factor=capacity)
    layer = _layer(config, LTDRConfig(enabled=True), STGCConfig(enabled=True, tau=0.0))
    assert isinstance(layer.router, STGCLTDRRouter)
    seq, batch = 24, 4
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(seq, batch, 16, generator=gen)
    weights = torch.randn(seq, batch, 16, generator=gen)
    modality = torch.where(torch.rand(seq * batch, generator=gen) < 0.5, IMAGE, TEXT)
    layer.router.modality = _context(modality, seq, batch)

    out, _ = layer(hidden)
    (out * weights).sum().backward()
    report = layer.stgc.last
    expected, routing_map = oracle_pair_cosines(layer, hidden, weights)

    assert torch.equal(report.routing_map, routing_map)
    assert torch.equal(report.routing_map, layer.router.ltdr_last.routing_map)
    per_token = routing_map.sum(dim=1)
    assert (per_token > topk).any(), "tail tokens must get more than top-k experts"
    if capacity is not None:
        limit = get_capacity(seq * batch * topk, E, capacity)
        assert (routing_map.sum(dim=0) <= limit).all()
    assert torch.equal(torch.isnan(report.cos), torch.isnan(expected))
    judged = ~torch.isnan(expected)
    assert judged[per_token > topk].any(), "STGC judges the pairs of tail tokens"
    assert torch.allclose(report.cos.double()[judged], expected[judged], atol=1e-5, rtol=0)
    clear = judged & ((expected - 0.0).abs() > 1e-4)
    assert torch.equal(report.conflicts[clear], expected[clear] < 0.0)
    assert report.conflicts.any()


# -- metrics, modality plumbing, config ---------------------------------------------------

def test_metrics_follow_the_routing():
    init_single_process()
    layer = _layer(moe_config(), LTDRConfig(enabled=True))
    seq, batch = 16, 2
    modality = torch.tensor([IMAGE, TEXT] * (seq * batch // 2))
    layer.router.modality = _context(modality, seq, batch)
    out, _ = layer(torch.randn(seq, batch, 16))
    report = layer.router.ltdr_last
    metrics = collect_ltdr_metrics(layer, num_layers=1, device="cpu")
    images = report.is_image.sum().item()
    assert metrics["ltdr/tail_fraction"] == pytest.approx(report.tail.sum().item() / images)
    assert metrics["ltdr/experts_per_vision_token"] == pytest.approx(
        report.routing_map[report.is_image].sum().item() / images)
    assert metrics["ltdr/experts_per_vision_token"] > 2  # default a = all experts
    assert metrics["ltdr/text_balance_loss"] > 0
    assert collect_ltdr_metrics(layer, num_layers=1, device="cpu") == {}  # reset


def test_training_without_modality_fails_eval_routes_plainly():
    init_single_process()
    router = _router(LTDRRouter, moe_config(), ltdr_config=LTDRConfig(enabled=True))
    logits = torch.randn(4, 2, E)
    with pytest.raises(RuntimeError, match="without a token modality"):
        router.routing(logits)
    plain = _router(TopKRouter, moe_config())
    router.eval(), plain.eval()
    assert all(torch.equal(a, b) for a, b in zip(router.routing(logits), plain.routing(logits)))


def test_flags_and_yaml_section(tmp_path):
    from megatron_stgc.config import build_arg_parser, config_from_flat, load_yaml

    args = build_arg_parser().parse_args(["--ltdr", "--ltdr-top-a", "3",
                                          "--no-ltdr-modality-balance"])
    config = config_from_flat({k: v for k, v in vars(args).items() if k != "config"})
    assert config.ltdr == LTDRConfig(enabled=True, top_a=3, modality_balance=False)
    path = tmp_path / "run.yaml"
    path.write_text("ltdr:\n  enabled: true\n  tail_routing: false\n")
    assert config_from_flat(load_yaml(str(path))).ltdr == LTDRConfig(enabled=True,
                                                                     tail_routing=False)


def test_config_errors_name_the_flag():
    from dist_utils import tiny_config
    from megatron_stgc.config import ConfigError
    from megatron_stgc.validation import validate_run_config

    with pytest.raises(ConfigError, match="vision-language"):
        validate_run_config(tiny_config(ltdr=True), world_size=1)
    with pytest.raises(ConfigError, match="--ltdr needs an MoE model"):
        validate_run_config(tiny_config(ltdr=True, num_experts=None), world_size=1)
    for top_a, message in ((1, ">= --moe-router-topk"), (5, "<= --num-experts")):
        with pytest.raises(ValueError, match=message):
            LTDRConfig(enabled=True, top_a=top_a).validate(num_experts=4, topk=2)
    with pytest.raises(ValueError, match="does nothing"):
        LTDRConfig(enabled=True, modality_balance=False, tail_routing=False).validate()
    with pytest.raises(ValueError, match="z-loss"):
        _layer(moe_config(moe_z_loss_coeff=0.1), LTDRConfig(enabled=True))


def test_llava_model_wires_ltdr_and_stgc():
    """--ltdr --stgc through the model build: combined routers share the model's modality,
    alltoall dispatchers size by the map, and a generation-style forward (no modality
    given) routes image tokens by the mask derived from the image token id."""
    from dist_utils import TINY_VOCAB, tiny_config
    from megatron_stgc.training.setup import build_model

    init_single_process()
    model_parallel_cuda_manual_seed(1234)
    config = tiny_config(ltdr=True, stgc=True, vision_model_type="clip", vision_num_layers=1,
                         vision_hidden_size=32, vision_num_attention_heads=4, img_h=16,
                         img_w=16, patch_dim=8, disable_vision_class_token=True)
    image_token = TINY_VOCAB - 1
    model, _ = build_model(config, TINY_VOCAB, image_token_id=image_token)
    routers = [m for m in model.modules() if isinstance(m, LTDRRouter)]
    assert len(routers) == 2 and all(isinstance(r, STGCLTDRRouter) for r in routers)
    assert all(r.modality is model.modality for r in routers)
    layers = list(ltdr_layers(model))
    assert all(layer.token_dispatcher.config.moe_expert_capacity_factor for layer in layers)
    assert all(layer.config.moe_expert_capacity_factor is None for layer in layers)

    tokens = torch.randint(0, 100, (2, 16))
    tokens[:, 1:5] = image_token  # 4 patches of 8x8 in a 16x16 image
    with torch.no_grad():
        model.eval()(tokens, torch.arange(16).expand(2, -1), None, images=torch.randn(2, 3, 16, 16))
    assert routers[0].ltdr_last.is_image.sum() == 8


def test_activation_recompute_reuses_the_forwards_modality():
    """moe_layer_recompute re-runs the router in the backward, after the model cleared its
    modality: the gradients are those of the run without recompute."""
    init_single_process()
    seq, batch = 16, 2
    gen = torch.Generator().manual_seed(9)
    hidden, weights = torch.randn(seq, batch, 16, generator=gen), torch.randn(seq, batch, 16,
                                                                              generator=gen)
    modality = torch.where(torch.rand(seq * batch, generator=gen) < 0.5, IMAGE, TEXT)
    grads = []
    for recompute in (False, True):
        layer = _layer(moe_config(moe_aux_loss_coeff=0.01, moe_layer_recompute=recompute),
                       LTDRConfig(enabled=True))
        layer.router.modality = _context(modality, seq, batch)
        out, _ = layer(hidden.clone().requires_grad_(True))  # checkpointing needs a grad input
        layer.router.modality.set(None)  # what MoELLaVAModel.forward does on return
        (out * weights).sum().backward()
        assert layer.router.ltdr_last.tail.any()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name
