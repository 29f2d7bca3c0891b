"""Compression of an export: weight-only int8/int4 quantization (quantize.py), magnitude and Wanda pruning at
unstructured ratios or N:M (prune.py, calibrate.py), the compressed-tensors file layout (format.py), the
``python -m framework.compress`` pipeline (run.py). Held-out perplexity of any model directory is
framework/evaluation/perplexity.py.
"""
