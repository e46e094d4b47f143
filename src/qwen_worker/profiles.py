"""What each model the worker can load serves, and how: one profile per diffusers pipeline class.

The class comes from the model folder's ``model_index.json`` (``models.py``), so a profile covers every checkpoint of
that class: Qwen-Image and Qwen-Image-2512 share ``QwenImagePipeline``; Edit-2509 and Edit-2511 share
``QwenImageEditPlusPipeline``. A profile says:

- which tasks the model serves, and how many reference images an edit may carry;
- whether it can return transparent (RGBA) images;
- its model card's defaults (steps, true CFG scale), used when the operator leaves ``DEFAULT_STEPS`` /
  ``DEFAULT_TRUE_CFG_SCALE`` unset;
- its size rules and the presets ``aspect_ratio`` names;
- its licence, and whether the operator must accept it before the worker serves it.

Validation, defaults and dry-run quotes read the profile of the model that will serve the request (``rules_for``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from .enums import Task
from .errors import ConfigError
from .sizes import ASPECT_RATIOS, DEFAULT_SIZE_RULES, SizeRules

ACCEPT_RESEARCH_LICENSE_VARIABLE = "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE"

# Edit-Plus's reference images, and the most an ``images`` array carries for a model that takes fewer (the runner
# then refuses several, naming the models that take them).
MAX_EDIT_IMAGES = 3


@dataclass(frozen=True)
class License:
    name: str  # as results report it in model.license
    url: str
    research_only: bool = False  # research and evaluation only: served only once the operator accepts it


APACHE_2 = License("Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0")
QWEN_RESEARCH = License(
    "Qwen Research License", "https://huggingface.co/Qwen/Qwen-Image-2.1/blob/main/LICENSE", research_only=True
)


@dataclass(frozen=True)
class ModelProfile:
    pipeline_class: str
    name: str  # the model family, for messages
    # The first task is the one the pipeline is loaded for; a later one is served too when no other pipeline
    # is configured for it (Qwen-Image-2.1 edits with the same pipeline that draws from text).
    tasks: tuple[Task, ...]
    default_steps: int
    default_true_cfg_scale: float
    license: License
    max_reference_images: int = 0  # 0: no edits
    alpha_output: bool = False  # decodes RGBA, so background "transparent" can be served
    # True CFG needs an explicit negative prompt (2.1 is sampled without CFG; the Qwen-Image family's cards
    # advise CFG against a single space when none is given).
    cfg_needs_negative_prompt: bool = False
    sizes: SizeRules = DEFAULT_SIZE_RULES
    # Read-only, as one mapping is shared by every instance.
    aspect_ratios: Mapping[str, tuple[int, int]] = field(default_factory=lambda: MappingProxyType(ASPECT_RATIOS))
    # The text encoder's window as the pipeline truncates it; None: the pipeline does not truncate.
    max_prompt_tokens: int | None = 512
    # BATCHED_CFG (acceleration.py) batches the two CFG passes; 2.1's passes carry their own masks and KV caches.
    batched_cfg: bool = True
    # Fast mode's Lightning LoRAs (LIGHTNING_LORA*) are distilled from Qwen-Image / Qwen-Image-Edit and target
    # their dual-stream blocks; no Lightning LoRA exists for 2.1, whose single-stream blocks have other layers.
    lightning: bool = True


# Qwen-Image-2.1's card: its native 2K sizes per aspect ratio (sides multiples of 32).
QWEN21_ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (2048, 2048),
    "16:9": (2752, 1536),
    "9:16": (1536, 2752),
    "4:3": (2400, 1792),
    "3:4": (1792, 2400),
    "3:2": (2528, 1696),
    "2:3": (1696, 2528),
}

# Its VAE compresses 16x and the pipeline floors sizes to multiples of 32; 2752 is the card's longest side.
QWEN21_SIZE_RULES = SizeRules(min_side=256, max_side=2752, multiple=32)

PROFILES: dict[str, ModelProfile] = {
    profile.pipeline_class: profile
    for profile in (
        # Qwen-Image and Qwen-Image-2512: the card's 50 steps, true CFG 4.
        ModelProfile(
            "QwenImagePipeline", "Qwen-Image", (Task.TEXT_TO_IMAGE,), 50, 4.0, APACHE_2
        ),
        ModelProfile(
            "QwenImageEditPipeline", "Qwen-Image-Edit", (Task.EDIT,), 50, 4.0, APACHE_2, max_reference_images=1
        ),
        # Edit-2509 and Edit-2511: their cards run 40 steps, true CFG 4.
        ModelProfile(
            "QwenImageEditPlusPipeline", "Qwen-Image-Edit-Plus", (Task.EDIT,), 40, 4.0, APACHE_2,
            max_reference_images=MAX_EDIT_IMAGES,
        ),
        # Qwen-Image-Layered: decomposes one image into RGBA layers; its card runs 50 steps, true CFG 4 (with
        # cfg_normalize, runner.py). No Lightning LoRA exists for it, and its transformer's extra time conditioning is
        # not something batched CFG passes along.
        ModelProfile(
            "QwenImageLayeredPipeline", "Qwen-Image-Layered", (Task.LAYERS,), 50, 4.0, APACHE_2, alpha_output=True,
            batched_cfg=False, lightning=False,
        ),
        # Qwen-Image-2.1: 40 steps without CFG, 1-10 references, RGBA output, 2K sizes, research licence.
        ModelProfile(
            "QwenImage21Pipeline", "Qwen-Image-2.1", (Task.TEXT_TO_IMAGE, Task.EDIT), 40, 1.0, QWEN_RESEARCH,
            max_reference_images=10, alpha_output=True, cfg_needs_negative_prompt=True, sizes=QWEN21_SIZE_RULES,
            aspect_ratios=MappingProxyType(QWEN21_ASPECT_RATIOS), max_prompt_tokens=None, batched_cfg=False,
            lightning=False,
        ),
    )
}

# The profile request rules fall back to when no pipeline serves the task (the request is then refused as not
# served, after parsing, so its other mistakes are still named first).
DEFAULT_PROFILE = PROFILES["QwenImagePipeline"]


def profile_for(pipeline_class: str) -> ModelProfile:
    """The profile of a model_index.json class, or ConfigError naming the classes this worker serves."""
    profile = PROFILES.get(pipeline_class)
    if profile is None:
        raise ConfigError(f"this worker serves {', '.join(PROFILES)}, not {pipeline_class}")
    return profile


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request is parsed against: the defaults it may override and the rules of the model that serves it.

    The defaults are the operator's (DEFAULT_STEPS, DEFAULT_TRUE_CFG_SCALE) or else the model card's; the rules are
    the model's. Built from a profile by ``request_rules``, so no value here restates the profile's."""

    num_inference_steps: int
    true_cfg_scale: float
    sizes: SizeRules
    aspect_ratios: Mapping[str, tuple[int, int]]
    max_images: int
    alpha_output: bool
    cfg_needs_negative_prompt: bool


def request_rules(
    profile: ModelProfile, default_steps: int | None = None, default_true_cfg_scale: float | None = None
) -> GenerationDefaults:
    """The rules a request is parsed against when ``profile``'s model serves it.

    ``default_steps`` / ``default_true_cfg_scale`` are the operator's DEFAULT_STEPS / DEFAULT_TRUE_CFG_SCALE (None
    when unset): an operator's value overrides the card's."""
    return GenerationDefaults(
        num_inference_steps=default_steps if default_steps is not None else profile.default_steps,
        true_cfg_scale=default_true_cfg_scale if default_true_cfg_scale is not None else profile.default_true_cfg_scale,
        sizes=profile.sizes,
        aspect_ratios=profile.aspect_ratios,
        # The array's length is checked while parsing; whether this model takes several references is the runner's
        # check, whose message names the models that do. So a single-image model still parses up to the usual 3.
        max_images=max(profile.max_reference_images, MAX_EDIT_IMAGES),
        alpha_output=profile.alpha_output,
        cfg_needs_negative_prompt=profile.cfg_needs_negative_prompt,
    )


def check_license(profile: ModelProfile, model_id: str, variable: str, accepted: bool) -> None:
    """Refuse, at start-up, to serve a research-only model the operator has not accepted the licence of."""
    if not profile.license.research_only or accepted:
        return
    raise ConfigError(
        f"{variable}={model_id} is {profile.name}, released under the {profile.license.name} "
        f"({profile.license.url}), which permits research and evaluation only, not commercial use; "
        f"this worker serves it only after the operator accepts that licence by setting "
        f"{ACCEPT_RESEARCH_LICENSE_VARIABLE}=true"
    )


def check_lightning(profile: ModelProfile, model_id: str, variable: str, lightning_variables: Sequence[str]) -> None:
    """Refuse, at start-up, Lightning LoRA files configured for a model they were not made for.

    ``lightning_variables``: the LIGHTNING_* variables that are set for the tasks this model will serve."""
    if profile.lightning or not lightning_variables:
        return
    raise ConfigError(
        f"{', '.join(lightning_variables)} cannot be used with {variable}={model_id}: the Qwen-Image-Lightning "
        f"LoRAs (fast mode, go_fast) are made for Qwen-Image and Qwen-Image-Edit, whose transformer layers "
        f"{profile.name} does not have, and there is no Lightning LoRA for {profile.name}; unset "
        f"{' and '.join(lightning_variables)} (user LoRAs in a job's `loras` still work on {profile.name})"
    )
