"""The weights layer: Hugging Face safetensors read by name (io.py: whole, as a tensor-parallel rank's rows or
columns, plain or packed int8/int4) and written in shards (shards.py: the one shard planner and the index), the
tensor-parallel layout table and the pipeline stage split (layout.py) and the dtype table (dtypes.py). Below the
engine, compression, checkpoints and parallelism; above the model definition only. The resolver from a run
directory, a step directory or an export to the model directory reads checkpoint manifests, so it lives a layer up:
framework/checkpoint/resolve.py."""
