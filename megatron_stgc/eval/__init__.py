"""Evaluation: greedy answering of LLaVA question files (``generate``, needs torch and
megatron-core) and pure-Python answer scoring / comparison tables (``scoring``)."""
