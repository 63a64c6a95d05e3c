"""The pieces of tools/gpu_check.py (the GPU acceptance check); see that file."""
