"""Hand-written kernels, compiled at first use: the CPU few-row matrix products of decoding (fp32, int8 and int4 weights)
(``cpu_quant.py``, source ``quant_gemv.cpp``)."""
