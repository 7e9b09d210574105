"""Calibrated quantization: ways of *choosing* codes and scales that lower the error against
round-to-nearest at the same bytes. Every result is an ordinary QuantizedTensor in the
format's own layout (what ``qengine.quantize`` stores for the same format, block size and
double quantization), so every kernel, checkpoint and export takes it unchanged.

- gptq_quantize: GPTQ error-compensating rounding driven by the layer Hessian X^T X;
  gptq_quantize_experts: the same per expert of a Mixture-of-Experts weight [E, N, K].
- search_scales: per-block clipped scales minimising an importance-weighted error.
- fit_codebook: a codebook fitted by importance-weighted k-means.
- plan: per-layer settings (Candidate per module, or "float16") under a bits-per-parameter
  budget, from each layer's measured sensitivity (calibrate/plan.py).

Pure torch (any device torch runs on); the per-column inner loop is vectorised over rows.
Whole models: qengine.quantize_model(method=..., calibration=...), driven by calibrate/driver.py.
"""

from .codebook import fit_codebook
from .gptq import gptq_quantize, gptq_quantize_experts
from .plan import Candidate, Plan, plan
from .scale_search import DEFAULT_GRID, search_scales

__all__ = ["Candidate", "DEFAULT_GRID", "Plan", "fit_codebook", "gptq_quantize", "gptq_quantize_experts", "plan",
           "search_scales"]
