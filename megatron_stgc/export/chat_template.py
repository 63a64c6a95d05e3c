"""The chat template of an exported model, as the Jinja text transformers renders.

``jinja_template(name, eos_token)`` for ``--chat-template`` ``name`` (``plain`` when the
option is absent). A user message's content is a string or a list of ``{"type": "image"}`` /
``{"type": "text", "text": ...}`` items (transformers' multimodal messages); a string that
starts with ``<image>`` counts as an image message too.

* ``plain`` (data/conversation.py): ours is ``<|user|> {question}\\n<|assistant|> `` with the
  assistant tag inside the user turn, answers end with EOS. With an image, ours tokenizes
  ``<|user|>`` and the question separately around the image tokens (``_encode_user_turn``
  strips the space before and the newline after ``<image>``), so the template writes
  ``<|user|><image>{question}\\n<|assistant|> ``: the processor splits the text at the image
  tokens and tokenizes each side alone, which gives our ids both for SentencePiece (its dummy
  prefix starts each side) and for byte-level BPE tokenizers (no space or newline to encode).
  tests/test_export_hf.py checks processor ids == ours.
* MoE-LLaVA's separator style TWO (``moe-llava-stablelm``, ``-phi``, ``-qwen``;
  moellava/conversation.py:51-59, 300-323, system prompt :307-308)::

      {system} USER: <image>\\n{question} ASSISTANT: {answer}<|endoftext|>USER: ... ASSISTANT:

  the generation prompt ends with ``ASSISTANT:`` (moellava/eval/model_vqa_loader.py:42-51).
"""

from __future__ import annotations

from megatron_stgc.export.lm_export import ExportError

MOE_LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's "
                    "questions.")

# sets ns.image / ns.text from message['content'] (string or list of typed items)
_CONTENT = (
    "{%- set ns = namespace(image=false, text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- if message['content'].startswith('<image>') -%}"
    "{%- set ns.image = true -%}{%- set ns.text = message['content'][7:].lstrip('\\n') -%}"
    "{%- else -%}{%- set ns.text = message['content'] -%}{%- endif -%}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.image = true -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}")

_PLAIN = (
    "{%- for message in messages -%}" + _CONTENT +
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user|>' + ('<image>' + ns.text if ns.image else ' ' + ns.text)"
    " + '\\n<|assistant|> ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ns.text + EOS -}}"
    "{%- endif -%}{%- endfor -%}")

_STYLE_TWO = (
    "{{- SYSTEM + ' ' -}}"
    "{%- for message in messages -%}" + _CONTENT +
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + ('<image>\\n' + ns.text if ns.image else ns.text) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + ns.text + SEP2 -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")

STYLE_TWO_NAMES = ("moe-llava-stablelm", "moe-llava-phi", "moe-llava-qwen")


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def jinja_template(name: str, eos_token: str) -> str:
    """The Jinja chat template for --chat-template ``name``."""
    if name == "plain":
        return "{%- set EOS = " + _literal(eos_token) + " -%}" + _PLAIN
    if name in STYLE_TWO_NAMES:
        return ("{%- set SYSTEM = " + _literal(MOE_LLAVA_SYSTEM) + " -%}"
                "{%- set SEP2 = '<|endoftext|>' -%}" + _STYLE_TWO)
    raise ExportError(f"--chat-template {name!r}: no chat template for the export (plain, "
                      f"{', '.join(STYLE_TWO_NAMES)}); MoE-LLaVA's stage-I 'plain' template has "
                      "no question to ask")


def template_name(config) -> str:
    """--chat-template of the run (``plain`` before that option existed)."""
    return getattr(config.data, "chat_template", "plain")


def stop_strings(name: str) -> tuple[str, ...]:
    """Text that ends an answer besides EOS, as this build's ``megatron-stgc eval`` cuts it
    (--chat-template's ``stop_strings``, data/chat_templates.py; () for an eval without stop
    strings). Written to export_info.json; ``hf_generate`` cuts its answers there too."""
    try:
        from megatron_stgc.eval import stop  # noqa: F401  (an eval with stop strings)
    except ImportError:
        return ()
    from megatron_stgc.data.chat_templates import get_template

    return tuple(get_template(name).stop_strings)
