"""MoE-LLaVA's routing recipe on megatron-core routers: the Gumbel-sampled second expert
(``gumbel.py``, attached through the layer spec by ``spec.py``) and a separate capacity
factor for eval mode (``capacity.py``)."""
