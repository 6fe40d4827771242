"""Moved (issue 15): reading a quantized checkpoint is moge_cli.quant_format (quantization_of, read_module),
building its QLinears moge_cli.loader (qlinear, DEFAULT_KERNEL, LINEAR_PARAMS), the compute moge_kernels.qlinear.

Only these names stay here, for the modules that still import them from moge_cli.quantized
(bench/bench_quantize.py, tests/test_quantize.py, tests/test_ops.py); delete this file (and its row in
tests/test_layers.py) when they import from the places above.
"""

from moge_cli.loader import qlinear
from moge_cli.quant_format import quantization_of, read_module
from moge_kernels.qlinear import dequantize

__all__ = ["dequantize", "qlinear", "quantization_of", "read_module"]
