"""Reading training logs after the fact: plots of the paper's analysis figures."""
