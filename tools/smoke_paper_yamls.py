#!/usr/bin/env python
"""Smoke run of the paper YAMLs: stage III at real widths, reduced depth, on CPU.

For each family (StableLM-2-1.6B, Phi-2, Qwen-1.8B) this

1. builds a random Hugging Face model at the family's real widths with 2 decoder layers
   (StableLmForCausalLM, PhiForCausalLM, Qwen2ForCausalLM: Qwen-1.8B's widths on Qwen2's
   classes, which have Qwen-1's block: RMSNorm, SwiGLU, QKV bias) and a random CLIP
   ViT-L/14-336 vision tower with 3 layers (the converter keeps 2: select layer -2), with
   a small local BPE tokenizer (vocabulary ~500 instead of 50-150K, to keep the
   embeddings small; every other width is the real one), and ``save_pretrained``s them;
2. converts them with the package's converter (tools/convert_hf_to_megatron.py's
   ``convert_pretrained``) into a dense --pretrained-checkpoint;
3. runs ``megatron-stgc train --config examples/moe_llava/<family>_stage3.yaml`` under
   torchrun on 2 CPU processes with ``--num-layers 2 --vision-num-layers 2``, upcycled to 4
   experts (EP 2), ``--stgc --ltdr``, fp32, 2 steps of 2 samples on a small LLaVA-format
   mix with non-square images (pad to square) and the family's chat template;
4. prints wall time, the steps' ``step_time_s`` and the peak resident memory of the
   largest rank, and writes OUTPUT/smoke.json.

    python tools/smoke_paper_yamls.py --output runs/smoke [--families stablelm,phi2,qwen]

A family whose converter is not in this tree (Phi-2 and Qwen until the import branch is
merged) is reported as skipped with the converter's message, not as a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FAMILIES = {
    "stablelm": dict(cls="StableLmForCausalLM", config="StableLmConfig", fields=dict(
        hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
        num_key_value_heads=32, partial_rotary_factor=0.25, use_qkv_bias=True,
        tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="silu")),
    "phi2": dict(cls="PhiForCausalLM", config="PhiConfig", fields=dict(
        hidden_size=2560, intermediate_size=10240, num_attention_heads=32,
        partial_rotary_factor=0.4, tie_word_embeddings=False, layer_norm_eps=1e-5,
        hidden_act="gelu_new")),
    "qwen": dict(cls="Qwen2ForCausalLM", config="Qwen2Config", fields=dict(
        hidden_size=2048, intermediate_size=5504, num_attention_heads=16,
        num_key_value_heads=16, tie_word_embeddings=False, rms_norm_eps=1e-6,
        hidden_act="silu")),
}
CLIP = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336,
            patch_size=14, num_hidden_layers=3, hidden_act="quick_gelu", projection_dim=768)
QUESTIONS = ["What is in the picture?", "Which colour is the square?", "Is it large?"]


def build_tokenizer(path: str) -> int:
    """A byte-level BPE tokenizer (GPT-2 style) whose EOS is <|endoftext|>; its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_stgc.data.chat_templates import MOE_LLAVA_SYSTEM

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([MOE_LLAVA_SYSTEM, "USER: ASSISTANT:", *QUESTIONS,
                             "A red square on a blue field. Yes, it is large."] * 20, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                      unk_token="<unk>")
    wrapped.save_pretrained(path)
    return len(wrapped)


def build_mix(root: str, records: int = 8) -> str:
    """A LLaVA-format JSON with non-square PNG images under ``root``."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i in range(records):
        w, h = (400, 300) if i % 2 else (280, 460)
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", f"{i}.png"))
        rows.append({"id": f"smoke-{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[i % 3]}"},
            {"from": "gpt", "value": "A red square on a blue field."},
            {"from": "human", "value": QUESTIONS[(i + 1) % 3]},
            {"from": "gpt", "value": "Yes, it is large."}]})
    path = os.path.join(root, "mix.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def build_hf_models(family: str, root: str, vocab: int) -> tuple[str, str]:
    """Random HF language model (2 layers) and CLIP vision tower (3 layers) directories."""
    import torch
    import transformers

    spec = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, spec["config"])(num_hidden_layers=2, vocab_size=vocab,
                                                   max_position_embeddings=4096,
                                                   **spec["fields"])
    lm_dir, vit_dir = os.path.join(root, f"hf_{family}"), os.path.join(root, "hf_clip")
    getattr(transformers, spec["cls"])(config).save_pretrained(lm_dir)
    if not os.path.isdir(vit_dir):
        vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP))
        vision.save_pretrained(vit_dir)
    return lm_dir, vit_dir


def convert(lm_dir: str, vit_dir: str, output: str, padded_vocab: int) -> None:
    from megatron_stgc.convert import convert_pretrained, write_pretrained

    state, flags = convert_pretrained(vit_dir, lm_dir, padded_vocab_size=padded_vocab,
                                      log=lambda line: None)
    write_pretrained(output, state, flags)


def train_flags(family: str, root: str, pretrained: str, tokenizer: str, mix: str,
                seq_length: int | None) -> list[str]:
    run = os.path.join(root, f"run_{family}")
    flags = ["--config", os.path.join(REPO, "examples", "moe_llava", f"{family}_stage3.yaml"),
             "--num-layers", "2", "--vision-num-layers", "2", "--stgc", "--ltdr",
             "--pretrained-checkpoint", pretrained, "--tokenizer-model", tokenizer,
             "--data-path", mix, "--image-root", root, "--image-loader", "auto",
             "--expert-model-parallel-size", "2", "--micro-batch-size", "1",
             "--global-batch-size", "2", "--train-iters", "2", "--bf16", "false",
             "--use-distributed-optimizer", "false", "--save", run, "--load", run,
             "--save-interval", "1000", "--log-interval", "1",
             "--log-file", os.path.join(run, "log.jsonl"), "--cache-dir",
             os.path.join(root, "cache")]
    if seq_length:
        flags += ["--seq-length", str(seq_length)]
    return flags


def run_family(family: str, root: str, tokenizer: str, vocab: int, mix: str,
               seq_length: int | None) -> dict:
    from megatron_stgc.convert import ConversionError
    from megatron_stgc.training.train import padded_vocab_size

    lm_dir, vit_dir = build_hf_models(family, root, vocab)
    pretrained = os.path.join(root, f"converted_{family}")
    try:
        convert(lm_dir, vit_dir, pretrained, padded_vocab_size(vocab + 1, 1))
    except ConversionError as error:
        return {"family": family, "status": "skipped: no converter in this tree",
                "detail": str(error)}
    from megatron_stgc.parallel import free_port

    flags = train_flags(family, root, pretrained, tokenizer, mix, seq_length)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "megatron_stgc", "train", *flags]
    log_path = os.path.join(root, f"train_{family}.out")
    peak_path = os.path.join(root, f"peak_{family}.txt")
    start = time.perf_counter()
    with open(log_path, "w") as out:  # measured in its own process: per-family peak
        code = subprocess.call([sys.executable, __file__, "--measure-into", peak_path, "--",
                                *command], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    with open(peak_path) as f:
        peak_mib = float(f.read()) / 1024
    result = {"family": family, "status": "ok" if code == 0 else f"failed (exit {code})",
              "wall_s": round(wall, 1), "peak_rss_mib_largest_process": round(peak_mib),
              "log": log_path}
    records = _read_jsonl(os.path.join(root, f"run_{family}", "log.jsonl"))
    result["steps"] = [{"iteration": r["iteration"], "loss": r["loss"],
                        "step_time_s": round(r["step_time_s"], 1),
                        "stgc_conflict_fraction": r.get("stgc/conflict_fraction"),
                        "ltdr_tail_fraction": r.get("ltdr/tail_fraction")} for r in records]
    if code != 0:
        with open(log_path) as f:
            result["tail"] = f.read()[-3000:]
    return result


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]




def measure(peak_path: str, command: list[str]) -> int:
    """Run ``command``; write the largest descendant's peak resident set (KiB, Linux)."""
    code = subprocess.call(command)
    with open(peak_path, "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure-into"]:
        return measure(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--seq-length", type=int, default=None,
                        help="override the YAML's 2048 (default: keep it)")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.output)
    os.makedirs(root, exist_ok=True)
    tokenizer = os.path.join(root, "tokenizer")
    vocab = build_tokenizer(tokenizer)
    mix = build_mix(root)
    results = []
    for family in args.families.split(","):
        print(f"[smoke] {family}: building, converting, training 2 steps ...", flush=True)
        result = run_family(family, root, tokenizer, vocab, mix, args.seq_length)
        results.append(result)
        print(f"[smoke] {json.dumps({k: v for k, v in result.items() if k != 'tail'})}",
              flush=True)
        if "tail" in result:
            print(result["tail"], flush=True)
    with open(os.path.join(root, "smoke.json"), "w") as f:
        json.dump(results, f, indent=1)
    failed = [r["family"] for r in results if r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
