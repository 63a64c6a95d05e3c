"""A trained model leaves the package: ``megatron-stgc export --format hf | moe-llava``.

* ``--format hf`` (``hf_llava.py``): transformers' ``LlavaForConditionalGeneration`` (or a
  causal LM for a text-only model) whose language model is the transformers class that
  computes exactly what ours does (``target.py`` decides): a Qwen2-style MoE model (RMSNorm,
  SwiGLU, full RoPE, no linear biases but q/k/v) as ``Qwen2MoeForCausalLM``; dense models as
  ``Qwen2ForCausalLM``, ``StableLmForCausalLM`` or ``PhiForCausalLM``; the CLIP or SigLIP
  tower (``hf_vision.py``), the 2-layer GELU projector, tokenizer (``tokenizer_files.py``:
  a Hugging Face tokenizer is saved as it is, a SentencePiece model becomes a ``tokenizers``
  BPE with the same ids, ``spm_proto.py`` / ``spm_hf.py``), chat template
  (``chat_template.py``) and image processor (``processor.py``).
* ``--format moe-llava`` (``moe_llava_format.py``): MoE-LLaVA's own checkpoint layout for the
  models no transformers class represents (StableLM-2 or Phi-2 with MoE).
* every export is reloaded and compared with the model it came from (``verify.py``); the
  output directory appears only when the check passes (``writer.py``: written beside it,
  renamed at the end, removed on any failure). Routing settings the target cannot express
  are named in a warning (``target.routing_warnings``).

The dense language-model name maps are the inverses of the importers' (``lm_export.py``
undoes ``convert/hf_qwen2.py``, ``hf_stablelm.py``, ``hf_phi.py``; ``hf_vision.py`` undoes
``convert/hf_clip.py`` / ``hf_siglip.py``); MoE layers go through the same expert views as
the importer (``convert/moe_llava_names.py``). ``run.py`` is the command. docs/EXPORT.md.
"""
