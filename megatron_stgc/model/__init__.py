"""Model building: layer specs, the GPT MoE model and its fixes."""
