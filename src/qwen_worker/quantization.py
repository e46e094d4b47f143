"""TRANSFORMER_QUANT: the diffusion transformer's linear weights quantized with torchao, once, at start-up.

    none  (default) the checkpoint's bf16 weights (float32 on a CPU)
    int8  Int8WeightOnlyConfig: int8 weights with a per-channel scale, computed in the activations' dtype. Any CUDA
          GPU, and the CPU (how the tests check it): linear weights take half their bf16 bytes (a quarter of
          float32's); the image stays close to the unquantized one.
    fp8   Float8DynamicActivationFloat8WeightConfig: fp8 weights and per-call fp8 activations on fp8 tensor cores.
          Needs compute capability 8.9 or higher (Ada, Hopper and later); anywhere else the worker does not serve
          and every job says why, naming the GPU and its compute capability.

Applied after loading and before the Lightning copies and compilation (``loading.py``): the copies share the
quantized weights, and the compiled graphs see them. How it combines with the rest:

- LIGHTNING_FUSE: fused first, then quantized (peft cannot merge into a torchao weight).
- Resident Lightning copies and per-job LoRAs: peft wraps the quantized layers in ``TorchaoLoraLinear`` and adds the
  LoRA's output unmerged, in the activations' dtype (tested on the CPU with int8).
- COMPILE=regional: the quantized blocks are compiled as they are (torchao's tensor subclasses are traceable).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)


def check_quantization(mode: str, device: torch.device) -> None:
    """Raise ConfigError when ``mode`` cannot run on ``device``: fp8 needs a GPU of compute capability 8.9+."""
    if mode != "fp8":
        return
    if device.type != "cuda":
        raise ConfigError(
            "TRANSFORMER_QUANT=fp8 needs a CUDA GPU of compute capability 8.9 or higher (Ada, Hopper); this worker "
            f"runs on the {device.type.upper()}. Use int8 or none here."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"TRANSFORMER_QUANT=fp8 needs compute capability 8.9 or higher (Ada, Hopper); this worker's GPU, {name}, "
            f"has compute capability {capability[0]}.{capability[1]}. Use int8 or none on this GPU type."
        )


def quantize_transformer(transformer: Any, mode: str, device: torch.device) -> None:
    """Quantize ``transformer``'s ``nn.Linear`` weights in place (torchao's default filter). ``none`` does nothing."""
    if mode == "none":
        return
    check_quantization(mode, device)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = Int8WeightOnlyConfig() if mode == "int8" else Float8DynamicActivationFloat8WeightConfig()
    before = linear_weight_bytes(transformer)
    quantize_(transformer, config)
    log.info(
        "transformer quantized to %s: linear weights %.2f GB -> %.2f GB",
        mode,
        before / 1e9,
        linear_weight_bytes(transformer) / 1e9,
    )


def linear_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the ``nn.Linear`` weights of ``module`` take, counting a torchao weight's own tensors (data, scales)."""
    total = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            total += _tensor_bytes(layer.weight)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:  # a plain tensor
        return tensor.numel() * tensor.element_size()
    names, _context = flatten()
    return sum(_tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
