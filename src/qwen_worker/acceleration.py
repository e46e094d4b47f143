"""Speed options for the diffusion transformer, each behind one environment variable.

    ATTENTION_BACKEND  native (default)  torch SDPA, which picks cuDNN / flash / memory-efficient kernels itself
                       _native_cudnn, _native_flash, _native_efficient, _native_math: force one SDPA kernel
                       flash, _flash_3, sage, flex: external kernels where installed (flash-attn, FA3, SageAttention)
                       Backends that download kernels from a hub at run time (*_hub) are refused.
    STEP_CACHE         off (default) | fbcache[:threshold] (First-Block cache, default 0.05) | taylorseer[:interval]
                       An opt-in quality/speed trade-off: skipped transformer work changes the image slightly.
    BATCHED_CFG        false (default) | true: true CFG's two transformer passes per step run as one batched forward
                       (the prompts padded to one length under a mask). Fewer, larger kernels; masked attention rules
                       out mask-less kernels (FlashAttention-3), so measure it together with ATTENTION_BACKEND.
                       Not combinable with STEP_CACHE, whose caches are per pass.
    COMPILE            off (default) | regional: torch.compile of the repeated transformer block, warmed up at start
                       for COMPILE_WARMUP_SIZES ("1024*1024,1328*1328") and one more shape (warm_up_calls), so no
                       user request pays a compile, whatever its size or reference count. Every transformer tree
                       (plain, Lightning copies, LoRA slots) is compiled and warmed, so switching between them
                       compiles nothing (lora_slots.py). The layered pipeline (sized by its input) is not warmed:
                       its first two jobs of new sizes may compile (logged).

Which of these win is a GPU question (docs/PERFORMANCE.md); equivalence to the reference is tested on the CPU.

Who uses what: ``loading.py`` applies the options to each transformer once (``apply_acceleration``, ``warm_up``) and
records on the ``LoadedPipeline`` the two that matter per job; ``runner.py`` reads those (``BatchedTrueCFG`` around
true-CFG jobs, a log line for a job that compiles). Nothing else knows these options exist.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

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
    batched_cfg: bool = False
    warmup_sizes: tuple[tuple[int, int], ...] = ((1024, 1024), (1328, 1328))
    quant: str = "none"  # TRANSFORMER_QUANT (quantization.py): applied before compiling


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


def allow_graphs(count: int) -> None:
    """Let dynamo keep ``count`` more compiled graphs of the transformer block's forward.

    Every tree of every pipeline (plain, Lightning copies, LoRA-slot copies; text-to-image and edit) runs the same
    block ``forward`` code, and each tree's module structure is a graph of its own. Past dynamo's recompile limit
    (8 by default, counted per code object over the whole process) a ``fullgraph`` compile fails the job, so each
    pipeline that compiles adds its trees to the limit.
    """
    import torch._dynamo.config as dynamo_config

    global _graphs_allowed
    _graphs_allowed += count
    if _graphs_allowed > dynamo_config.recompile_limit:
        dynamo_config.recompile_limit = _graphs_allowed
        log.info("dynamo's recompile limit raised to %d (compiled trees x sizes)", _graphs_allowed)


_graphs_allowed = 0  # what allow_graphs has asked for so far in this process


def _cache_config(settings: AccelerationSettings) -> Any:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if settings.step_cache == "fbcache":
        return FirstBlockCacheConfig(threshold=settings.step_cache_parameter or DEFAULT_FBCACHE_THRESHOLD)
    return TaylorSeerCacheConfig(cache_interval=int(settings.step_cache_parameter or DEFAULT_TAYLORSEER_INTERVAL))


class BatchedTrueCFG:
    """Runs each denoising step's conditional and unconditional transformer passes as one batched forward.

    The diffusers pipelines call the transformer twice per step, conditional first, and only combine the two results
    after the second call. So while this context is active the first call of each pair returns a placeholder of the
    output's shape, and the second call runs both inputs in one forward (text padded to a common length, padding masked
    out), fills the placeholder in place and returns its own half. Views the pipeline took of the placeholder (the
    edit pipelines slice it) see the filled values. Only for jobs with true CFG: without a second call the placeholder
    would never be filled, which ``__exit__`` checks.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self._pending: tuple[dict[str, Any], torch.Tensor] | None = None
        self.batched_calls = 0

    def __enter__(self) -> BatchedTrueCFG:
        self._had_own_forward = "forward" in vars(self.transformer)
        self._original = self.transformer.forward
        self.transformer.forward = self._forward  # an instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc: object) -> None:
        if self._had_own_forward:
            self.transformer.forward = self._original
        else:
            del self.transformer.forward
        if self._pending is not None and exc[0] is None:
            raise RuntimeError("batched CFG: a conditional pass had no unconditional partner")
        self._pending = None

    def _forward(self, **kwargs: Any) -> tuple[torch.Tensor]:
        if kwargs.get("return_dict", True):
            raise RuntimeError("batched CFG expects the pipelines' return_dict=False calls")
        if self._pending is None:
            placeholder = torch.empty_like(kwargs["hidden_states"])
            self._pending = (kwargs, placeholder)
            return (placeholder,)
        (cond, placeholder), uncond = self._pending, kwargs
        self._pending = None
        text, mask = _pad_and_stack(
            (cond["encoder_hidden_states"], cond.get("encoder_hidden_states_mask")),
            (uncond["encoder_hidden_states"], uncond.get("encoder_hidden_states_mask")),
        )
        guidance = cond.get("guidance")
        output = self._original(
            hidden_states=torch.cat([cond["hidden_states"], uncond["hidden_states"]]),
            timestep=torch.cat([cond["timestep"], uncond["timestep"]]),
            guidance=None if guidance is None else torch.cat([guidance, uncond["guidance"]]),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            img_shapes=list(cond["img_shapes"]) + list(uncond["img_shapes"]),
            attention_kwargs=cond.get("attention_kwargs"),
            return_dict=False,
        )[0]
        batch = cond["hidden_states"].shape[0]
        if output[:batch].shape != placeholder.shape:
            raise RuntimeError(
                f"batched CFG: output {tuple(output.shape)} does not match input {tuple(placeholder.shape)}"
            )
        placeholder.copy_(output[:batch])
        self.batched_calls += 1
        return (output[batch:],)


def _pad_and_stack(*parts: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack text embeddings of different lengths along the batch, zero-padded, with a mask marking the real tokens."""
    length = max(embeds.shape[1] for embeds, _ in parts)
    texts, masks = [], []
    for embeds, mask in parts:
        batch, own = embeds.shape[:2]
        if mask is None:  # the pipelines drop an all-ones mask
            mask = torch.ones(batch, own, dtype=torch.bool, device=embeds.device)
        texts.append(torch.nn.functional.pad(embeds, (0, 0, 0, length - own)))
        masks.append(torch.nn.functional.pad(mask.to(torch.bool), (0, length - own), value=False))
    return torch.cat(texts), torch.cat(masks)


@dataclass(frozen=True)
class WarmUpCall:
    """One warm-up call: the output size and the edit's reference images (none: text-to-image)."""

    width: int
    height: int
    references: int = 0
    reference_aspect: float = 1.0  # width / height of each reference; the edit pipelines resize them to ~1 MP by it

    def describe(self) -> str:
        if not self.references:
            return f"{self.width}x{self.height}"
        return f"{self.width}x{self.height} with {self.references} reference(s) of aspect {self.reference_aspect:g}"


def warm_up_calls(sizes: tuple[tuple[int, int], ...], *, draws: bool, references: int) -> tuple[WarmUpCall, ...]:
    """The calls that compile, per transformer tree, every graph a job of this pipeline can need.

    A compiled block's graph is specialised to the length of the image sequence it saw first; the first call with
    another length recompiles it with that length dynamic (dynamo's automatic dynamic shapes), and that graph then
    serves every other length: other sizes, other reference counts, other reference aspect ratios (measured: one
    graph after a 1-reference warm-up, none after it, for 2 and 3 references, a 3:2 reference and another size). So
    the warm-up runs each size once (the static graphs of the common sizes) and then one call with a second length,
    after which no job compiles:

    - ``draws`` (the pipeline takes text-to-image jobs): each size drawn; an edit-only pipeline edits one reference
      at each size instead.
    - ``references`` (the most an edit takes; 0: no edits) > 1 (Edit-Plus, 2.1): 2 references at the first size, the
      shape of the usual multi-image job (and, for a pipeline that also draws, its edit path warmed at all);
    - ``references`` 1: a 2:1 reference at the first size (another ~1 MP token count);
    - no edits, a single size: the first size at half height.
    """
    first_width, first_height = sizes[0]
    calls = [WarmUpCall(width, height, 0 if draws else 1) for width, height in sizes]
    if references > 1:
        calls.append(WarmUpCall(first_width, first_height, 2))
    elif references == 1:
        calls.append(WarmUpCall(first_width, first_height, 1, reference_aspect=2.0))
    elif len({width * height for width, height in sizes}) == 1:
        calls.append(WarmUpCall(first_width, max(16, first_height // 32 * 16)))
    return tuple(calls)


def warm_up(pipeline: Any, calls: tuple[WarmUpCall, ...]) -> None:
    """Run each warm-up call once (2 steps, with true CFG as by default) so compilation happens at start-up."""
    from PIL import Image  # imported here: PIL is needed only when compiling

    for call in calls:
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        if call.references:
            side = 512  # the pipelines resize references to ~1 MP by aspect ratio: their pixel size does not matter
            reference = Image.new("RGB", (round(side * call.reference_aspect), side), (128, 128, 128))
            extra["image"] = reference if call.references == 1 else [reference] * call.references
        with torch.inference_mode():
            pipeline(
                prompt="warm-up",
                negative_prompt=" ",
                true_cfg_scale=4.0,
                num_inference_steps=2,
                width=call.width,
                height=call.height,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
                **extra,
            )
        log.info("warm-up %s took %.1f s", call.describe(), time.perf_counter() - started)
