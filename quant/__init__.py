"""quant: NF4 4-bit weights (bitsandbytes-compatible bytes) and the frozen Linear4bit layer.

    import quant
    quant.quantize(model, blocksize=64, double_quant=True)   # nn.Linear -> quant.Linear4bit, in place
    quant.quantize(model, device="cuda")                      # ... each layer quantized on the GPU, then freed
    print(quant.format_memory_report(quant.memory_report(model)))
    print(quant.backend_choice())                             # which backend backend=None picked, and why
"""
from quant.backends import backend_choice
from quant.linear import Linear4bit, quantize
from quant.nf4 import NF4_CODE, NF4State, dequantize_nf4, quantize_nf4
from quant.report import format_memory_report, memory_report

__all__ = [
    "Linear4bit",
    "quantize",
    "backend_choice",
    "memory_report",
    "format_memory_report",
    "quantize_nf4",
    "dequantize_nf4",
    "NF4State",
    "NF4_CODE",
]
