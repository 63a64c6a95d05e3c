"""Data: the embedded instruction-style text set, its tokenizer, packed batches."""
