"""megatron_stgc: Solving Token Gradient Conflict for MoE models on megatron-core."""

__version__ = "0.1.0"
