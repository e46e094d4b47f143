"""Speed options for the diffusion transformer, each behind one environment variable, invisible to the rest.

    ATTENTION_BACKEND  native (default)  torch SDPA, which picks cuDNN / flash / memory-efficient kernels itself
                       _native_cudnn, _native_flash, _native_efficient, _native_math: force one SDPA kernel
                       flash, _flash_3, sage, flex: external kernels where installed (flash-attn, FA3, SageAttention)
                       Backends that download kernels from a hub at run time (*_hub) are refused.
    STEP_CACHE         off (default) | fbcache[:threshold] (First-Block cache, default 0.05) | taylorseer[:interval]
                       An opt-in quality/speed trade-off: skipped transformer work changes the image slightly.
    COMPILE            off (default) | regional: torch.compile of the repeated transformer block, warmed up at start
                       for COMPILE_WARMUP_SIZES ("1024*1024,1328*1328") so no user request pays the compile; other
                       sizes compile on first use (logged). LoRA jobs run compiled: loading and unloading a LoRA
                       swaps modules, which makes dynamo recompile the affected blocks (correct, but slower that job).

Which of these win is a GPU question (docs/PERFORMANCE.md); equivalence to the reference is tested on the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "_native_math",
    "flash",
    "_flash_3",
    "sage",
    "flex",
)
STEP_CACHES = ("off", "fbcache", "taylorseer")
DEFAULT_FBCACHE_THRESHOLD = 0.05
DEFAULT_TAYLORSEER_INTERVAL = 5


@dataclass(frozen=True)
class AccelerationSettings:
    attention_backend: str = "native"
    step_cache: str = "off"
    step_cache_parameter: float | None = None
    compile: bool = False
    warmup_sizes: tuple[tuple[int, int], ...] = ((1024, 1024), (1328, 1328))


def parse_step_cache(value: str) -> tuple[str, float | None]:
    """"fbcache:0.08" -> ("fbcache", 0.08); raises ValueError with a readable reason."""
    name, _, parameter = value.strip().lower().partition(":")
    if name not in STEP_CACHES:
        raise ValueError(f"must be one of {', '.join(STEP_CACHES)} (optionally name:value), got {value!r}")
    if not parameter:
        return name, None
    number = float(parameter)
    if not 0 < number <= 100:
        raise ValueError(f"{name}'s parameter must be positive, got {parameter}")
    return name, number


def apply_acceleration(transformer: Any, settings: AccelerationSettings) -> None:
    """Configure the transformer once, at load time. Raises ConfigError when an option cannot be honoured."""
    if settings.attention_backend != "native":
        try:
            transformer.set_attention_backend(settings.attention_backend)
        except (ValueError, ImportError, RuntimeError) as err:
            raise ConfigError(
                f"ATTENTION_BACKEND={settings.attention_backend} is not usable here ({err}); use native or install it"
            ) from None
        log.info("attention backend: %s", settings.attention_backend)
    if settings.step_cache != "off":
        transformer.enable_cache(_cache_config(settings))
        log.info("step cache: %s (%s)", settings.step_cache, settings.step_cache_parameter or "default")
    if settings.compile:
        transformer.compile_repeated_blocks(fullgraph=True)
        log.info("regional compilation enabled for %s", ", ".join(transformer._repeated_blocks))


def _cache_config(settings: AccelerationSettings) -> Any:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if settings.step_cache == "fbcache":
        return FirstBlockCacheConfig(threshold=settings.step_cache_parameter or DEFAULT_FBCACHE_THRESHOLD)
    return TaylorSeerCacheConfig(cache_interval=int(settings.step_cache_parameter or DEFAULT_TAYLORSEER_INTERVAL))


def warm_up(pipeline: Any, sizes: tuple[tuple[int, int], ...], *, edit: bool) -> None:
    """Run each warm-up size once (2 steps, with true CFG as by default) so compilation happens at start-up."""
    import torch
    from PIL import Image

    for width, height in sizes:
        started = time.perf_counter()
        extra = {"image": Image.new("RGB", (width, height), (128, 128, 128))} if edit else {}
        with torch.inference_mode():
            pipeline(
                prompt="warm-up",
                negative_prompt=" ",
                true_cfg_scale=4.0,
                num_inference_steps=2,
                width=width,
                height=height,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
                **extra,
            )
        log.info("warm-up %dx%d took %.1f s", width, height, time.perf_counter() - started)
