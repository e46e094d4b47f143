"""The output contract: what a job answers, as ``schema.py`` is the input contract.

Runpod's own endpoints answer ``{"image_url", "cost"}``; the other hosts' fields follow (images, seeds, sizes,
flags, timings, model). A dry run answers a quote of the same job with nothing generated. The README's "Response"
section documents every key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .media import EncodedImage
from .pricing import cost_of
from .runner import Generation
from .schema import FastMode, Request
from .sizes import OutputPlan


def job_result(
    request: Request,
    generation: Generation,
    *,
    seeds: Sequence[int],
    encoded: Sequence[EncodedImage],
    urls: Sequence[str],
    flags: list[bool] | None,
    timings: dict[str, float],
    price_per_megapixel: float,
    safety_checker: str,
) -> dict[str, Any]:
    """Runpod's {image_url, cost}, then what the other hosts return. ``flags`` is None when the checker did not run;
    ``safety_checker`` says why it ran or not."""
    result: dict[str, Any] = {
        "image_url": urls[0],
        "cost": cost_of(((image.width, image.height) for image in encoded), price_per_megapixel),
        "images": [
            {
                "url": url,
                "seed": seed,
                "width": image.width,
                "height": image.height,
                "content_type": image.format.mime_type,
            }
            for url, seed, image in zip(urls, seeds, encoded, strict=True)
        ],
        "seed": seeds[0],
        "width": encoded[0].width,
        "height": encoded[0].height,
        "num_inference_steps": generation.num_inference_steps,
        "true_cfg_scale": generation.true_cfg_scale,
        "safety_checker": safety_checker,
        "timings": {name: round(ms, 1) for name, ms in timings.items()},
        "model": {"id": generation.model.model_id, "revision": generation.model.revision},
    }
    if generation.license is not None:
        result["model"]["license"] = generation.license
    if flags is not None:
        result["has_nsfw_concepts"] = flags
    if request.enhance_prompt:
        result["prompt"] = request.effective_prompt
    if request.fast_mode is not FastMode.NONE:
        result["acceleration"] = request.fast_mode.value
    notes = list(request.notes) + generation.notes
    if flags is not None and any(flags):
        notes.append(f"{sum(flags)} of {len(flags)} images were flagged by the safety checker and not delivered")
    if notes:
        result["notes"] = notes
    return result


def dry_run_quote(request: Request, plan: OutputPlan, *, price_per_megapixel: float) -> dict[str, Any]:
    """A dry run: what the job would produce and cost, with nothing generated."""
    return {
        "dry_run": True,
        "task": request.mode.value,
        # Priced as a job is: every delivered image, so every layer of a decomposition.
        "cost": cost_of([plan.delivered] * request.num_outputs, price_per_megapixel),
        "width": plan.delivered[0],
        "height": plan.delivered[1],
        "num_images": request.num_images,
        "seed": request.seed,
        "seeds": request.seeds,
        "num_inference_steps": request.num_inference_steps,
        "true_cfg_scale": request.true_cfg_scale,
        "output_format": request.output_format.value,
        "prompt": request.effective_prompt,
        **({"strength": request.strength} if request.strength is not None else {}),
        **({"layers": request.layers, "resolution": request.resolution} if request.layers is not None else {}),
        **({"notes": list(request.notes)} if request.notes else {}),
    }
