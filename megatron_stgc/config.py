"""Run configuration: dataclasses, YAML loading, command-line flags and validation.

One run is described by ``RunConfig``; each section is a dataclass whose field
names are the Megatron-style flag names with underscores (``num_layers`` is
``--num-layers``). A YAML file (``--config``) sets defaults with the same keys
(dashes or underscores, flat or grouped by section); flags on the command line
override it. ``check_flags`` holds the checks that need only the flags;
``megatron_stgc.validation.validate_run_config`` runs them with the recipe's and the
model's (megatron-core's) checks and raises one ``ConfigError`` naming every flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatron_stgc.config_help import did_you_mean, field_help
from megatron_stgc.ltdr.config import LTDRConfig
from megatron_stgc.stgc.config import STGCConfig
from megatron_stgc.problems import (ConfigError, check, raise_problems,
                                    require)


@dataclass
class ModelConfig:
    num_layers: int = 4  # decoder layers of the language model
    hidden_size: int = 64  # width of the language model's hidden states
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    moe_ffn_hidden_size: Optional[int] = None  # default ffn_hidden_size
    num_attention_heads: int = 4  # attention heads of the language model
    num_query_groups: Optional[int] = None  # grouped-query attention: K/V heads (None = no GQA)
    seq_length: int = 64  # tokens per sample (image tokens included); also the maximum position
    num_experts: Optional[int] = 4  # experts per MoE layer; none = a dense model (no MoE layer)
    moe_router_topk: int = 2  # experts each token is routed to
    # softmax before top-k; None = on for top-1 (megatron-core requires it there), else off
    moe_router_pre_softmax: Optional[bool] = None
    moe_layer_freq: int = 2  # MoE on every N-th layer (MoE-LLaVA: every other)
    moe_aux_loss_coeff: float = 0.01  # weight alpha of the load-balancing loss
    # tokens an expert takes at most, as a multiple of its even share; the rest are dropped
    # (None = no dropping; MoE-LLaVA: 1.5)
    moe_expert_capacity_factor: Optional[float] = None
    moe_token_dispatcher_type: str = "alltoall"  # how tokens reach their experts' ranks
    add_bias_linear: bool = False  # biases on all linear layers (Phi-2)
    position_embedding_type: str = "rope"  # rotary, learned absolute or no position embedding
    normalization: str = "LayerNorm"  # the norm of every block
    hidden_dropout: float = 0.0  # dropout after attention and MLP
    attention_dropout: float = 0.0  # dropout on the attention probabilities
    init_method_std: float = 0.02  # standard deviation of the random weight initialisation
    # a separate LM head instead of the input embedding's transpose
    untie_embeddings_and_output_weights: bool = False
    swiglu: bool = False  # gated SiLU FFN (StableLM-2, LLaMA)
    add_qkv_bias: bool = False  # bias on the QKV projection only (StableLM-2)
    rotary_percent: float = 1.0  # fraction of each head's dims rotated (StableLM-2: 0.25)
    rotary_base: int = 10000  # base of the rotary position embedding's frequencies
    norm_epsilon: float = 1e-5  # epsilon of the norms
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    use_te: Optional[bool] = None  # None = TE spec when CUDA is available
    # MoE placement as one 0/1 per layer ("1,0,1,0"; megatron-core's list form of
    # moe_layer_freq); overrides --moe-layer-freq. For placements an every-N-th-layer rule
    # cannot express (MoE-LLaVA's moe_layers_idx with moe_mode first_half / second_half)
    moe_layer_pattern: Optional[str] = None
    # Phi-2's block: one input norm feeds attention and MLP side by side,
    # h = x + attn(ln(x)) + mlp(ln(x)) (Transformer Engine's TransformerLayer calls this
    # parallel_attention_mlp); megatron-core's local spec only (model/parallel_block.py)
    parallel_attention_mlp: bool = False
    # tanh-approximated GELU (Phi-2's "gelu_new"); Megatron-LM's flag of the same name
    openai_gelu: bool = False
    add_output_layer_bias: bool = False  # a bias on the LM head (Phi-2's lm_head)
    # capacity factor while the model is in eval mode (model.eval(), generation); None = the
    # training --moe-expert-capacity-factor. MoE-LLaVA: 1.5 training, 2.0 eval (docs/RECIPE.md)
    moe_eval_capacity_factor: Optional[float] = None
    # which routed pairs an over-full expert drops: "probs" (lowest routing weight first) or
    # "position" (latest tokens first); megatron-core's moe_token_drop_policy
    moe_token_drop_policy: str = "probs"
    # pad every expert's input to its capacity (static shapes; megatron-core's option)
    moe_pad_expert_input_to_capacity: bool = False
    # training samples the 2nd..k-th expert with Gumbel noise on the router logits (DeepSpeed's
    # top2gating, MoE-LLaVA); gates stay the noise-free softmax renormalised over the chosen
    moe_router_gumbel_second_expert: bool = False
    # Megatron-LM's flags, with its meanings:
    moe_z_loss_coeff: Optional[float] = None  # weight of the router z-loss; None = no z-loss
    # the balancing loss: only "aux_loss" (Switch's, per micro-batch: the paper's L_aux)
    moe_router_load_balancing_type: str = "aux_loss"
    # grouped-GEMM experts; None = the rule this package applies (with Transformer Engine, for
    # experts without biases); a value that contradicts the rule is an error naming why
    moe_grouped_gemm: Optional[bool] = None


@dataclass
class VisionConfig:
    """The vision tower and projector of a LLaVA-style model; off when vision_model_type is None."""

    vision_model_type: Optional[str] = None  # None = text-only GPT | "clip" | "siglip"
    vision_num_layers: int = 2  # ViT layers (LLaVA reads CLIP-L/336 at its 23rd of 24)
    vision_hidden_size: int = 64  # ViT width
    vision_ffn_hidden_size: Optional[int] = None  # default 4 * vision_hidden_size
    vision_num_attention_heads: int = 4  # ViT attention heads
    img_h: int = 32  # image height in pixels after preprocessing
    img_w: int = 32  # image width in pixels after preprocessing
    patch_dim: int = 8  # ViT patch size in pixels (img_h / patch_dim x img_w / patch_dim patches)
    disable_vision_class_token: bool = True  # drop the class token's output (LLaVA)
    freeze_vit: bool = False  # no updates to the vision tower
    freeze_projection: bool = False  # no updates to the vision-to-language projector
    # no updates to the language model except its MoE layers (routers, experts); dense FFNs
    # are frozen too (MoE-LLaVA's stage III trains them: --trainable-modules moe-llava-stage3).
    # --freeze-lm: the old, deprecated name (Megatron-LM's --freeze-LM freezes the whole LM)
    freeze_lm_except_moe: bool = False
    pretrained_checkpoint: Optional[str] = None  # tools/convert_hf_to_megatron.py output
    moe_use_upcycling: bool = False  # pretrained dense FFNs -> each expert (MoE-LLaVA stage III)
    # SigLIP: drop the tower's first output token, a patch (SigLIP has no class token), as
    # MoE-LLaVA's mm_vision_select_feature 'patch' does (siglip_encoder.py:34-35): 728 image
    # tokens at 384 px / patch 14 instead of 729. CLIP's class token: --disable-vision-class-token
    vision_drop_first_patch: bool = False
    # what trains: a preset (moe-llava-stage3), groups (vision projector embeddings attention
    # norms dense-ffn experts routers) or parameter-name patterns, comma separated; the rest is
    # frozen; --freeze-* subtract from it (model/trainable.py, model/freeze.py). None = all
    trainable_modules: Optional[str] = None
    # no updates to any of the language model, its MoE layers included: Megatron-LM's
    # multimodal --freeze-LM (accepted under that name too)
    freeze_language_model: bool = False


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # ranks each layer's weights are split over (TP)
    expert_model_parallel_size: int = 1  # ranks the experts of a layer are spread over (EP)
    # tensor parallelism inside each expert; None = megatron-core's default, the TP size
    # (STGC needs 1: with --stgc and TP > 1 set --expert-tensor-parallel-size 1)
    expert_tensor_parallel_size: Optional[int] = None
    # optimizer state sharded over data-parallel ranks (megatron-core's distributed optimizer)
    use_distributed_optimizer: bool = False
    # split activations along the sequence over the TP ranks; None = on when
    # --tensor-model-parallel-size > 1 with Transformer Engine (megatron-core requires it for
    # MoE there); a value that contradicts that is an error naming why
    sequence_parallel: Optional[bool] = None


@dataclass
class PrecisionConfig:
    bf16: bool = False  # BF16 parameters and activations; fp32 main grads, optimizer and router
    fp8_format: Optional[str] = None  # "e4m3" | "hybrid"; passed to Transformer Engine


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4  # samples per forward on each data-parallel rank
    global_batch_size: int = 8  # samples per optimizer step over all ranks (accumulation fills it)
    train_iters: int = 100  # optimizer steps of the run
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    lr_decay_style: str = "cosine"  # learning-rate decay after warmup (megatron-core's scheduler)
    lr_warmup_fraction: float = 0.03  # warmup steps as a fraction of --train-iters
    weight_decay: float = 0.0  # AdamW weight decay
    clip_grad: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2 (MoE-LLaVA, Hugging Face's AdamW: 0.999)
    seed: int = 1234  # seed of weights, data order and dropout
    exit_interval: Optional[int] = None  # stop (and save) after this many steps of this run
    nan_policy: str = "abort"  # NaN/inf loss or gradient: "abort" the run or "skip" the update
    # Megatron-LM's flags, with its meanings:
    lr_warmup_iters: Optional[int] = None  # warmup steps; set, it replaces --lr-warmup-fraction
    lr_decay_iters: Optional[int] = None  # steps the learning rate decays over; None = --train-iters
    # samples of the whole run: sets --train-iters to train_samples // global_batch_size
    train_samples: Optional[int] = None
    # validation every N steps (Megatron-LM's flag): --eval-iters global batches of
    # --valid-data-path, forward only, their token-weighted LM loss logged as valid/lm_loss;
    # 0 or None = only at the end of training (when --valid-data-path is given)
    eval_interval: Optional[int] = None
    # global batches each validation runs (Megatron-LM's flag and default); each evaluation
    # takes the next ones, wrapping over the validation records (training/validation.py)
    eval_iters: int = 100


@dataclass
class DataConfig:
    # one or more files (flag: several values; YAML: a string or a list), concatenated like
    # MoE-LLaVA's --data_path (each record once per epoch); None = the embedded text set
    data_path: Optional[list[str]] = None
    tokenizer_model: Optional[str] = None  # None = train one on the data at first run
    vocab_size: int = 512  # size of the tokenizer trained at first run
    num_samples: int = 4000  # samples generated for the embedded data set
    cache_dir: Optional[str] = None  # default: <save>/cache or ~/.cache/megatron_stgc
    image_root: Optional[str] = None  # folder the LLaVA records' "image" paths are under
    image_loader: str = "auto"  # "auto" (DALI if installed, else PIL) | "dali" | "pil"
    # records' image paths must stay inside --image-root once resolved (.., absolute paths
    # and links leading outside are counted as image_outside_root); true lets them out
    allow_image_outside_root: bool = False
    # images with more pixels (width x height, read from the file header before decoding)
    # are counted as image_too_large instead of being decoded
    max_image_pixels: int = 40_000_000
    # conversation template: "plain" (this package's <|user|>/<|assistant|> template) or
    # MoE-LLaVA's moe-llava-stablelm / moe-llava-phi / moe-llava-qwen (conv_stablelm, conv_phi;
    # its "qwen" version is conv_phi) and moe-llava-plain (stage I); data/chat_templates.py
    chat_template: str = "plain"
    # "resize" stretches every image to --img-h x --img-w; "pad" first pads it to a square
    # with the normalisation mean as the colour (MoE-LLaVA's --image_aspect_ratio pad)
    image_aspect_ratio: str = "resize"
    # vision-language data: pack each micro-batch's --micro-batch-size samples into as few
    # rows of --seq-length as they fit (attention and positions per sample; Megatron-LM's
    # multimodal flag name). Off: one sample per row, cut to the micro-batch's longest
    use_packed_sequence: bool = False
    # processes that load, tokenize and decode micro-batches ahead of the step (torch
    # DataLoader workers, spawned); 0 = in the training process, inside the step. Batches are
    # the same for every value (docs/DATA_LOADER.md); the text-only data set ignores it
    num_workers: int = 2
    # stop the run when more than this fraction of the records is unusable: at index time
    # (before step 1) over all records of --data-path, in use over the records tried so far
    # (checked on log steps; the error names the top bad kinds and example ids)
    max_bad_sample_fraction: float = 0.01
    # MoE-LLaVA's --group_by_modality_length: every global batch holds records of one
    # modality (image or text-only), split into micro-batches of balanced length
    group_by_modality_length: bool = False
    # validation records (Megatron-LM's flag): one or more files in the formats of
    # --data-path, read with the training tokenizer; validation runs at the end of training
    # and every --eval-interval steps (training/validation.py). None = no validation
    valid_data_path: Optional[list[str]] = None


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # folder checkpoints are written to
    load: Optional[str] = None  # folder to resume from (its newest checkpoint); may equal --save
    save_interval: Optional[int] = None  # save every N steps (and always at the end)
    keep_last: Optional[int] = None  # keep only the newest K checkpoints (None = keep all)
    # Megatron-LM's flags, with its meanings:
    # --load restores weights, iteration, RNG and data position; optimizer and learning-rate
    # scheduler start fresh
    no_load_optim: bool = False
    no_load_rng: bool = False  # --load leaves the random-number generators' states as they are
    # --load reads the weights only and the run starts at iteration 0 (fresh optimizer,
    # scheduler, RNG and data order): a new run from another run's checkpoint
    finetune: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 1  # a progress line and a JSONL record every N steps
    log_file: Optional[str] = None  # JSONL file of the log records (appended on resume)
    tensorboard_dir: Optional[str] = None  # TensorBoard event folder (needs tensorboard installed)
    wandb_project: Optional[str] = None  # Weights & Biases project to log to (needs wandb installed)
    wandb_exp_name: Optional[str] = None  # the W&B run's name (default: W&B picks one)
    # folder of W&B's files (default: W&B's, ./wandb); WANDB_MODE=offline keeps the run on
    # disk (`wandb sync` uploads it later)
    wandb_save_dir: Optional[str] = None
    # routing-stability probe (training/routing_stability.py): a fixed batch (this rank's
    # micro-batches of the first step) runs through the model without gradients at the start
    # and on a log step once this many steps passed since the last probe; 0 = never
    routing_probe_interval: int = 20
    # megatron-core's routing tracer (training/routing_trace.py; megatron-core >= 0.19): a
    # directory; each rank writes router_trace_rank<R>.jsonl there, one record per MoE layer
    # forward with each token's top-k experts (megatron's format) and, for a vision-language
    # model, each token's modality (docs/OBSERVABILITY.md); Megatron-LM's flag
    moe_routing_trace_path: Optional[str] = None
    # trace only the first N training steps (None: every step, as Megatron-LM); needs
    # --moe-routing-trace-path
    moe_routing_trace_max_training_iters: Optional[int] = None


SECTIONS = {
    "model": ModelConfig,
    "vision": VisionConfig,
    "parallel": ParallelConfig,
    "precision": PrecisionConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}

# STGC flags are --stgc-<field>, except "enabled" which is --stgc.
STGC_FLAG_NAMES = {f.name: ("stgc" if f.name == "enabled" else f"stgc_{f.name}")
                   for f in dataclasses.fields(STGCConfig)}
# LTDR flags the same way: --ltdr, --ltdr-top-a, --ltdr-modality-balance, --ltdr-tail-routing
# (booleans also take --no-<flag>: --no-ltdr-modality-balance, --no-ltdr-tail-routing).
LTDR_FLAG_NAMES = {f.name: ("ltdr" if f.name == "enabled" else f"ltdr_{f.name}")
                   for f in dataclasses.fields(LTDRConfig)}
PLUGIN_SECTIONS = {"stgc": STGC_FLAG_NAMES, "ltdr": LTDR_FLAG_NAMES}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stgc: STGCConfig = field(default_factory=STGCConfig)
    ltdr: LTDRConfig = field(default_factory=LTDRConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Megatron-LM flags this package does not implement: {key: what to use instead}
UNSUPPORTED_FLAGS = {
    "split": "carving validation records out of --data-path is not implemented; give them "
             "as separate files with --valid-data-path (docs/CLI.md, validation)",
}
# Megatron-LM boolean flags that are the negation of a field: {flag key: field key}
NEGATED_FLAGS = {"disable_bias_linear": "add_bias_linear"}

# other names of a flag: {alias key: (field key, deprecation note or None)}
FLAG_ALIASES = {
    "freeze_lm": ("freeze_lm_except_moe", "--freeze-lm is deprecated: it is "
                  "--freeze-lm-except-moe (Megatron-LM's --freeze-LM, which freezes the MoE "
                  "layers too, is --freeze-language-model)"),
    "freeze_LM": ("freeze_language_model", None),  # Megatron-LM's spelling
}


def _resolve_alias(key: str) -> str:
    """The field key of a flag or YAML key; a deprecated alias warns once per use."""
    if key not in FLAG_ALIASES:
        return key
    target, note = FLAG_ALIASES[key]
    if note is not None:
        warnings.warn(note, FutureWarning, stacklevel=3)
    return target


def _flag_table() -> dict[str, tuple[str, dataclasses.Field]]:
    """flat key (underscored flag name) -> (section attribute, dataclass field)."""
    table: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            table[f.name] = (section, f)
    for f in dataclasses.fields(STGCConfig):
        table[STGC_FLAG_NAMES[f.name]] = ("stgc", f)
    for f in dataclasses.fields(LTDRConfig):
        table[LTDR_FLAG_NAMES[f.name]] = ("ltdr", f)
    return table


def flag(key: str) -> str:
    """'num_layers' -> '--num-layers'."""
    return "--" + key.replace("_", "-")


def _normalise_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def _flatten_yaml(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept flat keys, or keys grouped under section names (model:, stgc:, ...)."""
    flat: dict[str, Any] = {}
    table = _flag_table()
    for key, value in raw.items():
        key = _normalise_key(key)
        if key in SECTIONS or key in PLUGIN_SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in (value or {}).items():
                sub_key = _normalise_key(sub_key)
                if key in PLUGIN_SECTIONS:
                    sub_key = PLUGIN_SECTIONS[key].get(sub_key, sub_key)
                flat[sub_key] = sub_value
        else:
            flat[key] = value
    flat = {_resolve_alias(k): v for k, v in flat.items()}
    unknown = sorted(k for k in flat if k not in table and k not in NEGATED_FLAGS
                     and k not in UNSUPPORTED_FLAGS)  # config_from_flat handles those two
    if unknown:
        raise ConfigError("\n".join(
            f"{source}: unknown key {k!r}" + did_you_mean(k, table) for k in unknown))
    return flat


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config into a flat {underscored flag name: value} dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of flag names to values")
    return _flatten_yaml(raw, f"--config {path}")


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _field_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    if text == "Optional[list[str]]":
        return list
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if text == name or text == f"Optional[{name}]":
            return typ
    return str


def _parse_optional(typ: type):
    def parse(text: str):
        if str(text).strip().lower() in ("none", "null"):
            return None
        return _parse_bool(text) if typ is bool else typ(text)
    parse.__name__ = typ.__name__
    return parse


class FlagParser(argparse.ArgumentParser):
    """An unknown or malformed flag: one line with the closest known flags, not the usage
    of every flag (``--help`` lists them)."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            known = [o for a in self._actions for o in a.option_strings
                     if a.help != argparse.SUPPRESS]
            words = [w for w in message.split(": ", 1)[1].split() if w.startswith("-")]
            message = "; ".join(f"unrecognized argument {w}" + did_you_mean(w, known)
                                for w in words) or message
        self.exit(2, f"{self.prog}: error: {message}\n"
                     f"run `{self.prog} --help` for the flags\n")


def _help_text(section: str, f: dataclasses.Field) -> str:
    """The field's comment in its dataclass (config_help.py), its section and default."""
    cls = {"stgc": STGCConfig, "ltdr": LTDRConfig}.get(section) or SECTIONS[section]
    default = "" if f.default is dataclasses.MISSING else f"; default: {f.default!r}"
    return f"{field_help(cls)[f.name]} [{section}{default}]".replace("%", "%%")


def build_arg_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Add one flag per config field; a flag not given is absent from the namespace
    (so ``--num-experts none`` can set a field to None)."""
    parser = parser or FlagParser(prog="megatron-stgc train", argument_default=argparse.SUPPRESS,
                                  allow_abbrev=False)  # as Megatron-LM: a typo is no prefix
    parser.add_argument("--config", default=None, help="YAML file; flags override its keys")
    for key, (section, f) in _flag_table().items():
        typ = _field_type(f)
        help_text = _help_text(section, f)
        if typ is list:
            # Megatron-style: --data-path a.json b.json (``none`` alone: unset)
            parser.add_argument(flag(key), dest=key, nargs="+", help=help_text)
        elif typ is bool:
            # --bf16 alone means true; --bf16 false / --no-bf16 also work.
            parser.add_argument(flag(key), dest=key, nargs="?", const=True,
                                type=_parse_bool, help=help_text)
            parser.add_argument("--no-" + key.replace("_", "-"), dest=key, action="store_const",
                                const=False, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag(key), dest=key, type=_parse_optional(typ), help=help_text)
    for key, instead in UNSUPPORTED_FLAGS.items():  # recognised, refused with what to use
        parser.add_argument(flag(key), dest=key, nargs="?", const=True, help=argparse.SUPPRESS)
    for key, field_key in NEGATED_FLAGS.items():
        parser.add_argument(flag(key), dest=field_key, action="store_const", const=False,
                            help=f"Megatron-LM's name of --{field_key.replace('_', '-')} false "
                                 "[alias]")
    for alias, (key, note) in FLAG_ALIASES.items():  # --freeze-lm and the like (booleans)
        parser.add_argument(flag(alias), dest=alias, nargs="?", const=True, type=_parse_bool,
                            help=argparse.SUPPRESS if note else f"another name of {flag(key)} [alias]")
        parser.add_argument("--no-" + alias.replace("_", "-"), dest=alias,
                            action="store_const", const=False, help=argparse.SUPPRESS)
    return parser


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    if value is None:
        return None
    typ = _field_type(f)
    if typ is list:
        return _string_list(key, value)
    try:
        if typ is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return typ(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{flag(key)}: expected {typ.__name__}, got {value!r}") from None


def _string_list(key: str, value: Any) -> Optional[list[str]]:
    """A list-valued setting from a flag (a list of strings) or YAML (a string or a list);
    ``none`` alone unsets it."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{flag(key)}: expected a file name or a list of them, got {value!r}")
    if len(items) == 1 and items[0].strip().lower() in ("none", "null"):
        return None
    if not items:
        raise ConfigError(f"{flag(key)}: expected at least one file name")
    return list(items)


def config_from_flat(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from {underscored flag name: value}; unknown keys are errors."""
    table = _flag_table()
    refused = [f"{flag(k)} (Megatron-LM): {UNSUPPORTED_FLAGS[k]}" for k in values
               if k in UNSUPPORTED_FLAGS]
    raise_problems(refused)
    values = {NEGATED_FLAGS.get(k, k): (not v if k in NEGATED_FLAGS and v is not None else v)
              for k, v in values.items()}
    config = RunConfig()
    for key, value in values.items():
        key = _resolve_alias(key)
        if key not in table:
            raise ConfigError(f"unknown setting {flag(key)}" + did_you_mean(key, table, flag))
        section, f = table[key]
        setattr(getattr(config, section), f.name, _coerce(key, f, value))
    return config


def parse_run_config(argv: list[str]) -> RunConfig:
    """Command-line flags (and the optional --config YAML) -> validated-shape RunConfig.

    Precedence: flags > YAML > dataclass defaults. Does not validate (megatron_stgc.validation does).
    """
    args = build_arg_parser().parse_args(argv)
    config_path = getattr(args, "config", None)
    values: dict[str, Any] = load_yaml(config_path) if config_path else {}
    for key, value in vars(args).items():
        if key != "config":
            values[key] = value
    return config_from_flat(values)


_require = require  # records the problem inside collect_problems, else raises ConfigError

# the model shape and data a run without --config should name (Megatron-LM requires the shape)
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "num_experts",
              "data_path", "tokenizer_model")


def toy_defaults_notice(argv: list[str]) -> Optional[str]:
    """A note naming the toy defaults a run without --config takes for the shape and data
    flags it does not give (None when it gives --config or all of them)."""
    args = vars(build_arg_parser().parse_args(argv))
    if args.get("config") is not None:
        return None
    defaults = RunConfig()
    missing = []
    for key in SHAPE_KEYS:
        if key not in args:
            section, f = _flag_table()[key]
            missing.append(f"{flag(key)} {getattr(getattr(defaults, section), f.name)}")
    if not missing:
        return None
    return ("not given, so the toy defaults apply: " + ", ".join(missing)
            + " (--data-path None: generated text; --tokenizer-model None: a SentencePiece "
            "model of --vocab-size trained on the data). Name them, or start from an example "
            "config: --config examples/tiny_moe_cpu.yaml")


def fill_defaults(config: RunConfig) -> RunConfig:
    """Derived defaults (ffn sizes)."""
    m = config.model
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = 4 * m.hidden_size
    if m.moe_ffn_hidden_size is None:
        m.moe_ffn_hidden_size = m.ffn_hidden_size
    if config.vision.vision_ffn_hidden_size is None:
        config.vision.vision_ffn_hidden_size = 4 * config.vision.vision_hidden_size
    t = config.training
    if t.train_samples is not None and t.global_batch_size >= 1:
        t.train_iters = t.train_samples // t.global_batch_size  # as Megatron-LM
    if isinstance(config.data.data_path, str):  # set in code, not parsed
        config.data.data_path = [config.data.data_path]
    return config


def check_flags(config: RunConfig, world_size: int, training: bool = True) -> None:
    """The flag checks that need neither the model code nor megatron-core (the rest:
    megatron_stgc/validation.py, which runs these first)."""
    fill_defaults(config)
    m, p, t, pr = config.model, config.parallel, config.training, config.precision
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                "ffn_hidden_size", "moe_ffn_hidden_size", "moe_router_topk", "moe_layer_freq"):
        _require(getattr(m, key) >= 1, f"{flag(key)} must be >= 1, got {getattr(m, key)}")
    for key in ("micro_batch_size", "global_batch_size", "train_iters"):
        _require(getattr(t, key) >= 1, f"{flag(key)} must be >= 1, got {getattr(t, key)}")
    for key in ("tensor_model_parallel_size", "expert_model_parallel_size"):
        _require(getattr(p, key) >= 1, f"{flag(key)} must be >= 1, got {getattr(p, key)}")

    _require(m.hidden_size % m.num_attention_heads == 0,
             f"--hidden-size ({m.hidden_size}) must be divisible by "
             f"--num-attention-heads ({m.num_attention_heads})")
    _require(m.num_query_groups is None or (m.num_query_groups >= 1 and
                                            m.num_attention_heads % m.num_query_groups == 0),
             f"--num-query-groups ({m.num_query_groups}) must divide "
             f"--num-attention-heads ({m.num_attention_heads})")
    tp, ep = p.tensor_model_parallel_size, p.expert_model_parallel_size
    _require(world_size % tp == 0,
             f"--tensor-model-parallel-size ({tp}) must divide the world size ({world_size})")
    _require(m.num_attention_heads % tp == 0,
             f"--num-attention-heads ({m.num_attention_heads}) must be divisible by "
             f"--tensor-model-parallel-size ({tp})")
    _require(m.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by "
             f"--tensor-model-parallel-size ({tp})")
    dp = world_size // tp
    etp = p.expert_tensor_parallel_size
    _require(etp is None or etp >= 1, f"--expert-tensor-parallel-size must be >= 1, got {etp}")
    expert_tp = tp if etp is None else etp
    if etp is None:
        _require(dp % ep == 0,
                 f"--expert-model-parallel-size ({ep}) must divide the data-parallel size "
                 f"({dp} = world size {world_size} / --tensor-model-parallel-size {tp})")
    else:
        _require(world_size % (expert_tp * ep) == 0,
                 f"--expert-tensor-parallel-size ({expert_tp}) x --expert-model-parallel-size "
                 f"({ep}) must divide the world size ({world_size})")
    if config.stgc.enabled:
        _require(expert_tp == 1,
                 f"--stgc supports --expert-tensor-parallel-size 1 only; it is {expert_tp}"
                 + (f" (by default the --tensor-model-parallel-size, {tp}): set "
                    "--expert-tensor-parallel-size 1" if etp is None else ""))
    if tp > 1:
        _require(m.seq_length % tp == 0,
                 f"--seq-length ({m.seq_length}) must be divisible by "
                 f"--tensor-model-parallel-size ({tp}) (sequence parallelism)")

    if m.num_experts is None:
        _require(ep == 1, f"--expert-model-parallel-size ({ep}) > 1 needs --num-experts")
        _require(m.moe_layer_pattern is None, "--moe-layer-pattern needs --num-experts")
        _require(not config.stgc.enabled, "--stgc needs an MoE model: set --num-experts")
    else:
        _require(m.num_experts >= 1, f"--num-experts must be >= 1, got {m.num_experts}")
        _require(m.num_experts % ep == 0,
                 f"--num-experts ({m.num_experts}) must be divisible by "
                 f"--expert-model-parallel-size ({ep})")
        _require(m.moe_router_topk <= m.num_experts,
                 f"--moe-router-topk ({m.moe_router_topk}) must be <= --num-experts "
                 f"({m.num_experts})")
        _require(m.moe_layer_freq <= m.num_layers,
                 f"--moe-layer-freq ({m.moe_layer_freq}) must be <= --num-layers ({m.num_layers}) "
                 "or no layer would be MoE")
        if m.moe_layer_pattern is not None:
            pattern = parse_moe_layer_pattern(m.moe_layer_pattern)
            _require(len(pattern) == m.num_layers,
                     f"--moe-layer-pattern has {len(pattern)} entries; it needs one per layer "
                     f"(--num-layers {m.num_layers})")
            _require(1 in pattern, "--moe-layer-pattern marks no layer as MoE (no 1)")
        _require(m.moe_token_dispatcher_type in ("alltoall", "allgather"),
                 f"--moe-token-dispatcher-type must be 'alltoall' or 'allgather', got "
                 f"{m.moe_token_dispatcher_type!r}")
        _require(m.moe_aux_loss_coeff >= 0,
                 f"--moe-aux-loss-coeff must be >= 0, got {m.moe_aux_loss_coeff}")
        if m.moe_expert_capacity_factor is not None:
            _require(m.moe_expert_capacity_factor > 0,
                     f"--moe-expert-capacity-factor must be > 0, got {m.moe_expert_capacity_factor}")
            _require(m.moe_token_dispatcher_type == "alltoall",
                     "--moe-expert-capacity-factor needs --moe-token-dispatcher-type alltoall")
        _require(m.moe_ffn_hidden_size % expert_tp == 0,
                 f"--moe-ffn-hidden-size ({m.moe_ffn_hidden_size}) must be divisible by the "
                 f"expert tensor-parallel size ({expert_tp})")

    per_step = t.micro_batch_size * dp
    _require(not training or t.global_batch_size % per_step == 0,
             f"--global-batch-size ({t.global_batch_size}) must be divisible by "
             f"--micro-batch-size ({t.micro_batch_size}) x data-parallel size ({dp}) = {per_step}")
    _require(m.recompute_granularity in (None, "full", "selective"),
             f"--recompute-granularity must be 'full' or 'selective', got {m.recompute_granularity!r}")
    _require(t.lr > 0, f"--lr must be > 0, got {t.lr}")
    _require(0 <= t.min_lr <= t.lr, f"--min-lr ({t.min_lr}) must lie in [0, --lr ({t.lr})]")
    _require(t.lr_decay_style in ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
             f"--lr-decay-style {t.lr_decay_style!r} is not one of constant, linear, cosine, "
             "inverse-square-root, WSD")
    _require(0 <= t.lr_warmup_fraction < 1,
             f"--lr-warmup-fraction must lie in [0, 1), got {t.lr_warmup_fraction}")
    check(_validate_megatron_lm_flags, config)
    _require(t.clip_grad >= 0, f"--clip-grad must be >= 0, got {t.clip_grad}")
    _require(t.weight_decay >= 0, f"--weight-decay must be >= 0, got {t.weight_decay}")
    _require(pr.fp8_format in (None, "e4m3", "hybrid"),
             f"--fp8-format must be 'e4m3' or 'hybrid', got {pr.fp8_format!r}")
    _require(config.checkpoint.save_interval is None or config.checkpoint.save_interval >= 1,
             f"--save-interval must be >= 1, got {config.checkpoint.save_interval}")
    _require(config.checkpoint.save_interval is None or config.checkpoint.save is not None,
             "--save-interval needs --save")
    _require(config.logging.log_interval >= 1,
             f"--log-interval must be >= 1, got {config.logging.log_interval}")
    _require(config.logging.routing_probe_interval >= 0,
             "--routing-probe-interval must be >= 0 (0 = no routing probe), got "
             f"{config.logging.routing_probe_interval}")
    _require(config.data.vocab_size >= 64 or config.data.tokenizer_model is not None,
             f"--vocab-size must be >= 64, got {config.data.vocab_size}")
    check(_validate_data, config)
    check(_validate_validation, config)
    if config.data.tokenizer_model is not None:
        _require(os.path.exists(config.data.tokenizer_model),
                 f"--tokenizer-model: {config.data.tokenizer_model} does not exist (a "
                 "SentencePiece model, or a Hugging Face tokenizer directory / tokenizer.json)")
    if config.checkpoint.load is not None and config.checkpoint.load != config.checkpoint.save:
        _require(os.path.isdir(config.checkpoint.load),
                 f"--load: directory {config.checkpoint.load} does not exist")
    _require(t.exit_interval is None or t.exit_interval >= 1,
             f"--exit-interval must be >= 1, got {t.exit_interval}")
    _require(t.nan_policy in ("abort", "skip"),
             f"--nan-policy must be 'abort' or 'skip', got {t.nan_policy!r}")
    _require(config.checkpoint.keep_last is None or config.checkpoint.keep_last >= 1,
             f"--keep-last must be >= 1, got {config.checkpoint.keep_last}")
    _require(config.checkpoint.keep_last is None or config.checkpoint.save is not None,
             "--keep-last needs --save")
    check(_validate_load_tracker, config.checkpoint.load)
    check(_validate_load_options, config.checkpoint)
    check(_validate_loggers, config.logging)
    check(_validate_routing_trace, config)
    _require(m.normalization in ("LayerNorm", "RMSNorm"),
             f"--normalization must be 'LayerNorm' or 'RMSNorm', got {m.normalization!r}")
    _require(m.position_embedding_type in ("rope", "learned_absolute", "none"),
             "--position-embedding-type must be 'rope', 'learned_absolute' or 'none', got "
             f"{m.position_embedding_type!r}")
    for key in ("hidden_dropout", "attention_dropout"):
        _require(0 <= getattr(m, key) < 1, f"{flag(key)} must lie in [0, 1), got {getattr(m, key)}")
    _require(m.init_method_std > 0, f"--init-method-std must be > 0, got {m.init_method_std}")
    if m.num_experts is not None and m.moe_router_topk == 1:
        _require(m.moe_router_pre_softmax is not False,
                 "--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core requires it)")

    _require(0 < m.rotary_percent <= 1, f"--rotary-percent must lie in (0, 1], got {m.rotary_percent}")
    check(_validate_block_layout, config)
    _require(m.norm_epsilon > 0, f"--norm-epsilon must be > 0, got {m.norm_epsilon}")
    check(_validate_vision, config, training)
    check(_validate_ltdr, config)

    if pr.fp8_format is not None or m.use_te:
        _require(_cuda_available(),
                 ("--fp8-format" if pr.fp8_format else "--use-te")
                 + " needs CUDA and Transformer Engine; this machine has no GPU")
    check(_validate_stgc_options, config)
    if config.stgc.enabled and m.num_experts is not None:
        check(_validate_stgc_layers, config)
        check(_validate_stgc_mean_source, config)
        _require(config.stgc.modalities == "all" or config.vision.vision_model_type is not None,
                 f"--stgc-modalities {config.stgc.modalities} needs a vision-language model "
                 "(--vision-model-type): a text-only model has no image tokens; use "
                 "--stgc-modalities all")


def _validate_stgc_options(config: RunConfig) -> None:
    try:
        config.stgc.validate()
        if config.stgc.enabled:
            config.stgc.layer_set(config.model.num_layers)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _validate_loggers(log: LoggingConfig) -> None:
    """A requested logger that could not start is an error before training, not a warning."""
    import importlib.util

    _require(log.tensorboard_dir is None or importlib.util.find_spec("tensorboard") is not None,
             f"--tensorboard-dir {log.tensorboard_dir}: the tensorboard package is not "
             "installed (pip install tensorboard)")
    _require(log.wandb_project is None or importlib.util.find_spec("wandb") is not None,
             f"--wandb-project {log.wandb_project}: the wandb package is not installed "
             "(pip install wandb)")
    for key in ("wandb_exp_name", "wandb_save_dir"):
        _require(getattr(log, key) is None or log.wandb_project is not None,
                 f"{flag(key)} needs --wandb-project")


def _validate_routing_trace(config: RunConfig) -> None:
    """--moe-routing-trace-path: a MoE model and a megatron-core that has the tracer."""
    log = config.logging
    _require(log.moe_routing_trace_max_training_iters is None
             or log.moe_routing_trace_path is not None,
             "--moe-routing-trace-max-training-iters needs --moe-routing-trace-path")
    _require(log.moe_routing_trace_max_training_iters is None
             or log.moe_routing_trace_max_training_iters >= 1,
             "--moe-routing-trace-max-training-iters must be >= 1, got "
             f"{log.moe_routing_trace_max_training_iters}")
    if log.moe_routing_trace_path is None:
        return
    _require(config.model.num_experts is not None,
             f"--moe-routing-trace-path {log.moe_routing_trace_path}: traces MoE routers; "
             "this model has none (set --num-experts)")
    # whether this megatron-core has the tracer: model/config_checks.py


def _validate_load_options(ckpt: CheckpointConfig) -> None:
    """--finetune, --no-load-optim, --no-load-rng need --load; --finetune with --load equal
    to --save would start over at iteration 0 on every restart."""
    for key in ("finetune", "no_load_optim", "no_load_rng"):
        _require(not getattr(ckpt, key) or ckpt.load is not None, f"{flag(key)} needs --load")
    _require(not (ckpt.finetune and ckpt.load is not None and ckpt.load == ckpt.save),
             "--finetune with --load equal to --save: a restarted job would load its own "
             "checkpoint and start over at iteration 0; --save to another folder")


def _validate_megatron_lm_flags(config: RunConfig) -> None:
    """--lr-warmup-iters, --lr-decay-iters, --train-samples, --moe-z-loss-coeff,
    --moe-router-load-balancing-type (--moe-grouped-gemm and --sequence-parallel:
    model/config_checks.py)."""
    m, t = config.model, config.training
    decay = t.train_iters if t.lr_decay_iters is None else t.lr_decay_iters
    _require(t.lr_decay_iters is None or t.lr_decay_iters >= 1,
             f"--lr-decay-iters must be >= 1, got {t.lr_decay_iters}")
    _require(t.lr_warmup_iters is None or 0 <= t.lr_warmup_iters < decay,
             f"--lr-warmup-iters ({t.lr_warmup_iters}) must lie in [0, --lr-decay-iters "
             f"or --train-iters ({decay}))")
    _require(t.train_samples is None or t.train_samples >= t.global_batch_size,
             f"--train-samples ({t.train_samples}) must be >= --global-batch-size "
             f"({t.global_batch_size})")
    _require(m.moe_z_loss_coeff is None or m.moe_z_loss_coeff >= 0,
             f"--moe-z-loss-coeff must be >= 0, got {m.moe_z_loss_coeff}")
    _require(not (m.moe_z_loss_coeff and config.ltdr.enabled),
             "--moe-z-loss-coeff with --ltdr: LTDR's router takes no z-loss; drop one of them")
    _require(m.moe_router_load_balancing_type == "aux_loss",
             f"--moe-router-load-balancing-type {m.moe_router_load_balancing_type!r}: only "
             "'aux_loss' (the paper's L_aux; for none set --moe-aux-loss-coeff 0)")


def _validate_block_layout(config: RunConfig) -> None:
    """--parallel-attention-mlp and --openai-gelu against the rest of the model flags."""
    m = config.model
    _require(not (m.openai_gelu and m.swiglu),
             "--openai-gelu and --swiglu both choose the MLP activation: set one of them")
    if not m.parallel_attention_mlp:
        return
    _require(not m.use_te,
             "--parallel-attention-mlp runs on megatron-core's local spec only (the Transformer "
             "Engine spec fuses a separate norm into linear_qkv and into the MLP's linear_fc1, "
             "where the parallel block has one): drop --use-te")
    _require(config.precision.fp8_format is None,
             "--parallel-attention-mlp runs on megatron-core's local spec, which has no FP8: "
             "drop --fp8-format")


def _validate_ltdr(config: RunConfig) -> None:
    """--ltdr needs MoE layers and the image/text mask of a vision-language model."""
    l, m = config.ltdr, config.model
    if not l.enabled:
        return
    _require(m.num_experts is not None, "--ltdr needs an MoE model: set --num-experts")
    _require(config.vision.vision_model_type is not None,
             "--ltdr needs a vision-language model (--vision-model-type): it routes and balances "
             "by token modality, which a text-only model does not have")
    _require(config.parallel.tensor_model_parallel_size == 1,
             "--ltdr supports --tensor-model-parallel-size 1 only (with sequence parallelism "
             "each router sees a shard of the sequence the modality mask is not cut for)")
    try:
        l.validate(m.num_experts, m.moe_router_topk)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def parse_moe_layer_pattern(text: str) -> list[int]:
    """'1,0,1,0' (or '[1, 0, 1, 0]') -> [1, 0, 1, 0]; ConfigError naming the flag otherwise."""
    items = [item.strip() for item in str(text).strip().strip("[]").split(",")]
    _require(all(item in ("0", "1") for item in items),
             f"--moe-layer-pattern must be a comma-separated list of 0 and 1 (one per layer, "
             f"1 = MoE layer), got {text!r}")
    return [int(item) for item in items]


def moe_layer_freq_value(config: RunConfig):
    """What megatron-core's TransformerConfig.moe_layer_freq gets: the --moe-layer-pattern
    list when given, else the --moe-layer-freq integer."""
    m = config.model
    if m.moe_layer_pattern is not None:
        return parse_moe_layer_pattern(m.moe_layer_pattern)
    return m.moe_layer_freq


def moe_layer_indices(config: RunConfig) -> list[int]:
    """0-based decoder layers that are MoE layers (megatron-core's --moe-layer-freq rule, or
    the --moe-layer-pattern list)."""
    m = config.model
    if m.num_experts is None:
        return []
    freq = moe_layer_freq_value(config)
    if isinstance(freq, list):
        return [i for i, is_moe in enumerate(freq) if is_moe]
    return [i for i in range(m.num_layers) if i % freq == 0]


def _validate_stgc_mean_source(config: RunConfig) -> None:
    """previous-step reads the reduced expert gradient megatron's DDP leaves in each
    parameter's main_grad; the distributed optimizer keeps only a shard of it reduced."""
    s = config.stgc
    _require(not (s.mean_source == "previous-step" and config.parallel.use_distributed_optimizer),
             "--stgc-mean-source previous-step needs every rank's full reduced expert gradient; "
             "--use-distributed-optimizer reduce-scatters it (each rank keeps a shard): use "
             "--stgc-mean-source micro-batch or micro-batch-bf16")
    _require(not (s.mean_audit and config.parallel.tensor_model_parallel_size > 1),
             "--stgc-mean-audit counts pairs per rank and is written for "
             "--tensor-model-parallel-size 1")


def _validate_stgc_layers(config: RunConfig) -> None:
    """--stgc must reach at least one MoE layer, and --stgc-layers name only MoE layers."""
    moe = moe_layer_indices(config)
    selected = sorted(config.stgc.layer_set(config.model.num_layers))
    if config.stgc.layers_named:
        dense = [i for i in selected if i not in moe]
        _require(not dense, f"--stgc-layers names layers {dense}, which are not MoE layers "
                            f"(MoE layers: {moe}; --moe-layer-freq {config.model.moe_layer_freq})")
    _require(any(i in moe for i in selected),
             f"--stgc reaches no MoE layer: --stgc-layers selects {selected}, MoE layers are {moe}")


def _validate_data(config: RunConfig) -> None:
    """--data-path files, the loader's workers and the bad-sample threshold."""
    d = config.data
    hint = ("; tools/make_digits_mix.py --output DIR writes the embedded real-image mix"
            if config.vision.vision_model_type else "")
    for path in d.data_path or []:
        _require(os.path.exists(path), f"--data-path: {path} does not exist{hint}")
    repeated = _named_twice(d.data_path or [])
    _require(not repeated, f"--data-path names {repeated} more than once (each file's records "
                           "are used once per epoch; a file given twice would be used twice)")
    _require(d.num_workers >= 0, f"--num-workers must be >= 0, got {d.num_workers}")
    _require(0 <= d.max_bad_sample_fraction <= 1,
             f"--max-bad-sample-fraction must lie in [0, 1], got {d.max_bad_sample_fraction}")
    _require(not d.group_by_modality_length or config.vision.vision_model_type is not None,
             "--group-by-modality-length needs --vision-model-type (the text-only data set "
             "has one modality)")


def _named_twice(paths: list[str]) -> list[str]:
    """The paths that name a file another path in ``paths`` also names (sorted)."""
    real = [os.path.realpath(path) for path in paths]
    return sorted({path for path in paths if real.count(os.path.realpath(path)) > 1})


def _validate_validation(config: RunConfig) -> None:
    """--eval-interval, --eval-iters and --valid-data-path (Megatron-LM's flags)."""
    t, d = config.training, config.data
    _require(t.eval_interval is None or t.eval_interval >= 0,
             f"--eval-interval must be >= 0 (0 = only at the end of training), got "
             f"{t.eval_interval}")
    _require(not t.eval_interval or d.valid_data_path is not None,
             f"--eval-interval {t.eval_interval} needs --valid-data-path (the validation "
             "records; --split is not implemented)")
    if d.valid_data_path is None:
        return
    _require(t.eval_iters >= 1,
             f"--eval-iters must be >= 1 with --valid-data-path, got {t.eval_iters} (for no "
             "validation drop --valid-data-path)")
    for path in d.valid_data_path:
        _require(os.path.exists(path), f"--valid-data-path: {path} does not exist")
    repeated = _named_twice(d.valid_data_path)
    _require(not repeated, f"--valid-data-path names {repeated} more than once")


def _validate_vision(config: RunConfig, training: bool = True) -> None:
    """The vision section and the data flags that only make sense with (or without) it."""
    v, d = config.vision, config.data
    _require(d.image_loader in ("auto", "dali", "pil"),
             f"--image-loader must be 'auto', 'dali' or 'pil', got {d.image_loader!r}")
    _require(d.max_image_pixels >= 1, f"--max-image-pixels must be >= 1, got {d.max_image_pixels}")
    if v.vision_model_type is None:
        for key in ("freeze_vit", "freeze_projection"):
            _require(not getattr(v, key), f"{flag(key)} needs --vision-model-type")
        _require(d.image_root is None, "--image-root needs --vision-model-type")
        _require(not d.use_packed_sequence,
                 "--use-packed-sequence needs --vision-model-type (LLaVA-format data); the "
                 "text-only data set always packs its conversations into full rows")
    else:
        _require(v.vision_model_type in ("clip", "siglip"),
                 f"--vision-model-type must be 'clip' or 'siglip', got {v.vision_model_type!r}")
        _require(d.data_path is not None or not training,
                 "--vision-model-type needs --data-path (a LLaVA-format JSON/JSONL file; "
                 "tools/make_digits_mix.py writes the embedded default)")
        for key in ("vision_num_layers", "vision_hidden_size", "vision_ffn_hidden_size",
                    "vision_num_attention_heads", "img_h", "img_w", "patch_dim"):
            _require(getattr(v, key) >= 1, f"{flag(key)} must be >= 1, got {getattr(v, key)}")
        _require(v.vision_hidden_size % v.vision_num_attention_heads == 0,
                 f"--vision-hidden-size ({v.vision_hidden_size}) must be divisible by "
                 f"--vision-num-attention-heads ({v.vision_num_attention_heads})")
        _require(v.img_h % v.patch_dim == 0 and v.img_w % v.patch_dim == 0,
                 f"--img-h ({v.img_h}) and --img-w ({v.img_w}) must be multiples of "
                 f"--patch-dim ({v.patch_dim})")
        _require(v.vision_model_type != "siglip" or v.disable_vision_class_token,
                 "--vision-model-type siglip has no class token: keep --disable-vision-class-token")
        _require(v.vision_model_type == "siglip" or not v.vision_drop_first_patch,
                 "--vision-drop-first-patch is for --vision-model-type siglip (its first output "
                 "is a patch); CLIP's first output is its class token: use "
                 "--disable-vision-class-token")
        _require(config.parallel.tensor_model_parallel_size == 1,
                 "--vision-model-type with --tensor-model-parallel-size > 1 is not supported yet")
        _require(d.image_root is not None or not training,
                 "--vision-model-type needs --image-root, the folder the records' image paths "
                 "are relative to (--image-root . for the working directory): without it every "
                 "image would be missing and the run would train on text alone")
        if d.image_root is not None:  # eval reads the benchmark's own image folder
            _require(os.path.isdir(d.image_root),
                     f"--image-root: {d.image_root} is not a directory")
    if v.moe_use_upcycling:
        _require(v.pretrained_checkpoint is not None,
                 "--moe-use-upcycling needs --pretrained-checkpoint (a dense checkpoint)")
        _require(config.model.num_experts is not None, "--moe-use-upcycling needs --num-experts")
    if v.pretrained_checkpoint is not None:
        _require(os.path.isfile(os.path.join(v.pretrained_checkpoint, "model.pt")),
                 f"--pretrained-checkpoint: {v.pretrained_checkpoint}/model.pt does not exist "
                 "(tools/convert_hf_to_megatron.py writes it)")


def _validate_load_tracker(load: Optional[str]) -> None:
    """A tracker in --load must name a checkpoint directory that exists."""
    if load is None:
        return
    tracker = os.path.join(load, "latest_checkpointed_iteration.txt")
    if not os.path.isfile(tracker):
        return
    with open(tracker) as f:
        text = f.read().strip()
    _require(text.isdigit(), f"--load {load}: {tracker} holds {text!r}, not an iteration number")
    path = os.path.join(load, f"iter_{int(text):07d}")
    moved_aside = any(name.startswith(os.path.basename(path) + ".replaced-")
                      for name in os.listdir(load))
    _require(os.path.isdir(path) or moved_aside,
             f"--load {load}: the tracker names iteration {int(text)} but {path} is missing")


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()
