"""4-bit weights for the drafter, built in process from the target's.

- :mod:`.quantizer`: round-to-nearest group quantization and packing.
- :mod:`.awq`: activation-aware scaling: statistics per linear group and the choice per layer.
- :mod:`.awq_search`: the scale search for one group of linears, and folding its scales into a norm.
- :mod:`.live_stats`: those statistics, sampled from the target's own forwards.
- :mod:`.w4linear`, :mod:`.w8linear`: the linears that run the quantized weights (CPU and GPU kernels).
- :mod:`.int4pack`: torch's own int4 kernels (CPU and CUDA) that W4Linear can run on.
"""
