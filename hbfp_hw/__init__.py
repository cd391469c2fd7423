"""hbfp-hw: generator of FPGA accelerators for block-floating-point NN training.

The numerics core (golden model) lives here; the gateware, the cocotb simulation
helpers and the host driver are the subpackages ``hbfp_hw.gateware``, ``hbfp_hw.sim``
and ``hbfp_hw.host``.
"""

from .conv import (ConvGeometry, bfp_conv2d, bfp_conv2d_input_grad, bfp_conv2d_weight_grad,
                   conv_format)
from .formats import (BFPFormat, CBFP8, FORMATS, FP32, HBFP4, HBFP8, MXINT8, ROUNDING_MODES,
                      SCHEME_FORMATS, get_format, register_format)
from . import ptq  # noqa: F401  (post-training quantization; imports torch lazily)
from .intgemm import IntFormat, IntTensor, int_conv2d, int_linear, quantize_int
from .luq import LUQ4, LUQ4_HS, LUQFormat, LUQTensor, luq_matmul, luq_quantize  # luq4, luq4-hs
from .bitlayers import PB_W8, BitLayerFormat  # noqa: F401  (registers the PB-W8 preset)
from . import sparsity  # noqa: F401
from .sparsity import (SparseBFPWeight, compress, mask_diversity, nm_mask, sparse_matmul,
                       sparse_matmul_t, transposable_mask)
from .mls import MLS_E2M1, MLS_E2M4, MLSFormat, MLSTensor, mls_matmul  # mls-e2m1, mls-e2m4
from .gemm import (DEFAULT_GUARD_BITS, accumulator_bits, bfp_matmul, matmul_error_bound,
                   matmul_reference)
from .quantize import BFPTensor, NonFiniteBlockError, block_layout, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "BFPFormat", "BFPTensor", "CBFP8", "DEFAULT_GUARD_BITS", "FORMATS", "FP32", "HBFP4",
    "HBFP8", "SCHEME_FORMATS", "register_format",
    "MXINT8", "NonFiniteBlockError", "ROUNDING_MODES", "accumulator_bits", "bfp_matmul",
    "block_layout", "dequantize", "get_format", "matmul_error_bound", "matmul_reference",
    "quantize",
    "ConvGeometry", "bfp_conv2d", "bfp_conv2d_input_grad", "bfp_conv2d_weight_grad",
    "conv_format",
    "MLS_E2M1", "MLS_E2M4", "MLSFormat", "MLSTensor", "mls_matmul",
    "LUQ4", "LUQ4_HS", "LUQFormat", "LUQTensor", "luq_matmul", "luq_quantize",
    "IntFormat", "IntTensor", "int_conv2d", "int_linear", "quantize_int",
    "SparseBFPWeight", "compress", "mask_diversity", "nm_mask", "sparse_matmul",
    "sparse_matmul_t", "transposable_mask", "PB_W8", "BitLayerFormat",
]
