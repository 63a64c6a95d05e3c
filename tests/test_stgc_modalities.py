"""--stgc-modalities text|image|all (stgc/modality_filter.py, issue 22) against the slow way.

The tiny MoE-LLaVA (2 MoE layers, tau 0.1, STGC on the first MoE layer only, so that its
cosines do not depend on the setting) runs megatron-core's schedule on one micro-batch
with image, text and padding tokens, once per setting and once with beta 0. Per setting:
* the flags are the ``all`` run's flags on the chosen modality's tokens and nothing else
  (padding never);
* the router weight gradient minus the beta-0 run's equals beta / (N * E) times the sum,
  over the flagged pairs only, of d(-log softmax(-z_t)[e])/dz_t x_t^T, computed here token
  by token in float64 from the router's captured inputs (N = flagged pairs): a token left
  out gets no L_token gradient. ``all`` passes the same check (today's STGC).
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_on_ranks
from llava_batches import IMAGE_ID, VOCAB, layout, llava_config, synthetic_samples
from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.validation import validate_run_config
from megatron_stgc.model.modality import IMAGE, PAD, TEXT

SAMPLES = 4
STGC_LAYER = 0  # 0-based: the first MoE layer (the top one sees only answer positions)
SETTINGS = [("all", 1.0), ("text", 1.0), ("image", 1.0), ("all", 0.0)]


def _one_setting(modalities: str, beta: float, batch: dict, **flags) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_stgc.stgc.attached import stgc_layers
    from megatron_stgc.training.forward import gpt_forward_step
    from megatron_stgc.training.setup import build_model_and_optimizer
    from megatron_stgc.training.train import seed_everything

    config = llava_config(stgc=True, stgc_tau=0.1, stgc_beta=beta, stgc_layers=str(STGC_LAYER),
                          stgc_modalities=modalities, **flags)
    seed_everything(config.training.seed)
    objects = build_model_and_optimizer(config, VOCAB, IMAGE_ID)
    (layer,) = stgc_layers(objects.model)
    inputs = []
    layer.router.register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    for chunk in objects.model:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=gpt_forward_step, data_iterator=iter([batch]), model=objects.model,
        num_microbatches=1, seq_length=batch["tokens"].shape[1],
        micro_batch_size=SAMPLES, forward_only=False)
    return {"conflicts": layer.stgc.last.conflicts.clone(), "cos": layer.stgc.last.cos.clone(),
            "router_grad": layer.router.weight.main_grad.detach().double().clone(),
            "router_weight": layer.router.weight.detach().double().clone(),
            "router_input": inputs[0].double()}


def _settings(rank, world_size):
    from megatron_stgc import parallel

    parallel.initialize_model_parallel(1, 1, seed=1234)
    samples, images, has_image = synthetic_samples(SAMPLES, seed=20, max_ids=30)
    batch = layout(samples, images, has_image)
    modality = batch["modality"].t().reshape(-1)  # megatron's router order
    return modality, [_one_setting(m, beta, batch) for m, beta in SETTINGS]


def hand_push_grad(pairs, weight: torch.Tensor, inputs: torch.Tensor,
                   centered_logit: bool = False) -> torch.Tensor:
    """sum over (t, e, w) in ``pairs`` of w * d(-log softmax(-z_t)[e])/dz_t x_t^T (or of
    w * d(z_te - mean z_t)/dz_t x_t^T), one token at a time (z_t = weight @ x_t)."""
    grad = torch.zeros_like(weight)
    for t, e, w in pairs:
        z = weight @ inputs[t]  # [E]
        if centered_logit:  # d(z_e - mean z)/dz_j = [j == e] - 1/E
            d_z = torch.full_like(z, -1.0 / z.shape[0])
        else:  # d(-log softmax(-z)[e])/dz_j = [j == e] - softmax(-z)_j
            d_z = -torch.softmax(-z, dim=0)
        d_z[e] += 1.0
        grad += w * torch.outer(d_z, inputs[t])
    return grad


def _hand_token_loss_grad(flags: torch.Tensor, weight: torch.Tensor,
                          inputs: torch.Tensor, beta: float) -> torch.Tensor:
    """beta / (N E) * sum over flagged (t, e) of d(-log softmax(-z_t)[e])/dz_t x_t^T."""
    pairs = [(t, e, 1.0) for t, e in flags.nonzero().tolist()]
    return beta / (max(len(pairs), 1) * weight.shape[0]) * hand_push_grad(pairs, weight, inputs)


@pytest.fixture(scope="module")
def runs():
    modality, results = run_on_ranks(_settings, 1)[0]
    return modality, dict(zip(SETTINGS, results))


def test_flags_are_the_all_runs_flags_on_the_chosen_modality(runs):
    modality, by_setting = runs
    everything = by_setting[("all", 1.0)]
    assert torch.equal(by_setting[("all", 0.0)]["cos"].isnan(), everything["cos"].isnan())
    flagged_rows = everything["conflicts"].any(dim=1)
    assert flagged_rows[modality == TEXT].any() and flagged_rows[modality == IMAGE].any()
    assert not flagged_rows[modality == PAD].any()
    for name, code in (("text", TEXT), ("image", IMAGE)):
        restricted = by_setting[(name, 1.0)]
        chosen = modality == code
        # the layer's cosines do not depend on the setting (no STGC layer above it); the
        # report leaves the other tokens unjudged (NaN)
        assert torch.allclose(restricted["cos"][chosen].nan_to_num(9.0),
                              everything["cos"][chosen].nan_to_num(9.0), atol=1e-6, rtol=0)
        assert restricted["cos"][~chosen].isnan().all()
        expected = everything["conflicts"] & chosen.unsqueeze(1)
        assert torch.equal(restricted["conflicts"], expected)
        assert expected.any()


@pytest.mark.parametrize("modalities", ["all", "text", "image"])
def test_only_flagged_tokens_of_the_chosen_modality_get_the_token_loss_gradient(runs,
                                                                                 modalities):
    _, by_setting = runs
    run, beta_zero = by_setting[(modalities, 1.0)], by_setting[("all", 0.0)]
    assert torch.equal(run["router_input"], beta_zero["router_input"])
    expected = _hand_token_loss_grad(run["conflicts"], run["router_weight"],
                                     run["router_input"], beta=1.0)
    measured = run["router_grad"] - beta_zero["router_grad"]
    assert expected.abs().max() > 1e-4
    assert torch.allclose(measured, expected, atol=1e-6, rtol=1e-4)


def test_restricting_to_a_modality_needs_a_vision_language_model():
    config = parse_run_config(["--stgc", "--num-experts", "4", "--stgc-modalities", "image"])
    with pytest.raises(ConfigError, match="--stgc-modalities image needs a vision-language"):
        validate_run_config(config, 1)
    config = parse_run_config(["--stgc", "--num-experts", "4", "--stgc-modalities", "images"])
    with pytest.raises(ConfigError, match="--stgc-modalities must be one of"):
        validate_run_config(config, 1)
