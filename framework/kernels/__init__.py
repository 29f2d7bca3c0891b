"""Hand-written kernels, compiled at first use: the CPU int8/int4 weight-only matrix-vector products of decoding
(``cpu_quant.py``, source ``quant_gemv.cpp``)."""
