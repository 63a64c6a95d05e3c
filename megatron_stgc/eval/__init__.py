"""Evaluation (docs/EVAL.md): ``run`` (``megatron-stgc eval``: model-only loading in
``model_only``, questions over ranks in ``distribute``, greedy decoding in ``generate`` /
``generation`` with megatron-core's KV cache), ``benchmarks`` (readers and official scorers,
pure Python; ``megatron-stgc score``) and ``scoring`` (exact match, answer files, tables)."""
