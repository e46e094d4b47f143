"""Every environment variable the worker reads, declared once in ``VARIABLES`` and parsed into typed settings.

Nothing else in the package reads ``os.environ``: other modules receive a ``Settings``. Each variable is one row of
``VARIABLES``: its name, type, range or choices, one-line doc and the ``Settings`` attribute it fills, whose default
is the variable's default (each default is written once, on the ``Settings`` field). A variable that is not one
attribute (the bucket's four, ``STEP_CACHE``'s two values, ``HF_HOME``) carries its own default and is turned into
settings by a named step of ``from_env``. The README's "Environment variables" table is rendered from the rows
(``python scripts/env_table.py --write``; tests/test_docs.py fails when it differs), and tests/test_hub_files.py
checks ``.runpod/hub.json`` and ``.runpod/tests.json`` against them.

Values are read forgivingly where Runpod is loose and strictly where it matters: Hub presets carry JSON numbers and
booleans that reach the worker as text, so an integer takes an integral ``"50.0"``, any value is stripped of
surrounding spaces, an empty value means unset, and a boolean takes ``true``/``false``, ``1``/``0``, ``yes``/``no``
or ``on``/``off`` in any case; ``"50.5"`` for an integer or ``"maybe"`` for a boolean is refused naming the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal

from .acceleration import ATTENTION_BACKENDS, AccelerationSettings, parse_step_cache
from .errors import ConfigError, ValidationError
from .memory_plan import MEMORY_PLANS
from .quantization import QUANT_MODES
from .schema import parse_size

DEFAULT_T2I_MODEL = "Qwen/Qwen-Image"
DEFAULT_SAFETY_CHECKER_MODEL = "CompVis/stable-diffusion-safety-checker"
# The words that switch a pipeline off, e.g. QWEN_IMAGE_MODEL=none on an edit-only endpoint.
_DISABLED = frozenset({"", "none", "off", "false", "0"})
# A boolean's accepted spellings, compared case-insensitively (Hub presets deliver JSON true as "true" or "True").
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")

# SigV4 presigned URLs cannot live longer than 7 days; Runpod's endpoints promise exactly that.
MAX_PRESIGN_TTL_SECONDS = 604_800

LOG_LEVELS = ("NOTSET", "TRACE", "DEBUG", "INFO", "WARN", "ERROR")


class Secret(str):
    """A string that never shows itself in ``repr`` (so a logged Settings cannot leak a key)."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True)
class BucketSettings:
    """Where results are uploaded when an S3-compatible bucket is configured."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: Secret
    bucket: str
    region: str
    addressing_style: str  # "path" | "virtual" | "auto"
    prefix: str
    url_ttl_seconds: int


@dataclass(frozen=True)
class ServeSettings:
    """How the process serves: Runpod's queue (the SDK pulls jobs) or its own HTTP server for a load-balancing
    endpoint (http_server.py). ``from_env`` reads only these rows, before the rest, so that an HTTP server whose
    models cannot be configured or loaded still starts and answers why (``/ping`` 503) instead of exiting."""

    mode: str = "queue"  # "queue" | "http"
    host: str = "0.0.0.0"  # every interface: Runpod's load balancer reaches the container from outside
    # Runpod's contract for load-balancing workers: the app on PORT (default 80), GET /ping on PORT_HEALTH (default
    # PORT).
    port: int = 80
    port_health: int | None = None  # None: PORT
    # Requests that may wait while one job runs (one GPU, one job at a time); more are answered 429 + Retry-After.
    max_waiting: int = 2
    # Runpod's load balancer carries requests of up to 30 MB; a larger body is refused (413) before it is read.
    max_body_bytes: int = 30 * 1000 * 1000

    @property
    def health_port(self) -> int:
        return self.port if self.port_health is None else self.port_health

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeSettings:
        env = os.environ if env is None else env
        attributes = {var.field: var.read(env) for var in VARIABLES if var.field and var.field.startswith("serve.")}
        return cls(**_nested(attributes, "serve"))


@dataclass(frozen=True)
class Settings:
    """The worker's configuration. Build it with ``Settings.from_env()``; tests pass their own mapping."""

    # Models: a local folder or an HF repo id resolved offline; None = task not served.
    t2i_model: str | None = DEFAULT_T2I_MODEL
    edit_model: str | None = None
    layered_model: str | None = None  # Qwen-Image-Layered: layer decomposition (requests with layers)
    controlnet_model: str | None = None  # a Qwen-Image ControlNet(-Union): requests with control_image
    volume_path: Path = Path("/runpod-volume")
    hf_hub_cache: Path | None = None
    require_cuda: bool = False
    # Qwen-Image-2.1's licence permits research and evaluation only: it is served only once this is set.
    accept_research_license: bool = False

    # Generation defaults when a request gives none. None (unset): the serving model's card defaults
    # (profiles.py: 50 steps for Qwen-Image, 40 for Edit-Plus and 2.1...); a value overrides them for every model.
    default_steps: int | None = None
    default_true_cfg_scale: float | None = None

    # Pricing.
    price_per_megapixel: float = 0.02

    # Input images.
    max_image_bytes: int = 20 * 1000 * 1000
    max_image_pixels: int = 40_000_000
    image_fetch_timeout_seconds: float = 30.0

    # Output.
    local_output_dir: Path | None = None
    max_inline_bytes: int = 15 * 1000 * 1000
    bucket: BucketSettings | None = None
    upload_fallback_inline: bool = False

    # LoRAs: downloads are cached by URL; files over the per-file cap are refused.
    lora_cache_dir: Path = Path("/tmp/qwen-worker/loras")
    lora_cache_max_bytes: int = 20 * 1000**3
    lora_max_bytes: int = 2 * 1000**3
    # Prepared (read, parsed, converted) LoRAs kept in host memory by content hash; 0 = prepare every job's files.
    lora_memory_cache_bytes: int = 8 * 1000**3
    # Rank of the LoRA slots (lora_slots.py): user LoRAs copied into resident adapters per job; 0 = loaded per job.
    lora_slot_rank: int = 64
    # Lightning fast mode: the distillation LoRAs, per task (8-step and 4-step files). None = not installed.
    lightning_lora: Path | None = None
    lightning_lora_4step: Path | None = None
    lightning_edit_lora: Path | None = None
    lightning_edit_lora_4step: Path | None = None
    # Merge the one Lightning file into the transformer at start-up: a fast-only endpoint at plain-job speed.
    lightning_fuse: bool = False

    # Safety checker policy: "on" obeys each request, "always" checks every image, "off" loads nothing.
    safety_checker: str = "on"
    safety_checker_model: str = DEFAULT_SAFETY_CHECKER_MODEL
    safety_check_inputs: bool = False

    # Transformer speed options (acceleration.py).
    acceleration: AccelerationSettings = AccelerationSettings()

    # Load a component two pipelines share (identical files) once: Qwen-Image and -Edit share ~17 GB.
    share_components: bool = True

    # The memory plan at start-up (memory_plan.py): "check" refuses a setup that does not fit the GPU, "auto" loads
    # the least lossy plan that fits, "off" compares nothing. A size in GB plans against it instead of the GPU's
    # free memory: a share of a GPU, or a rehearsal where there is no GPU.
    memory_plan: str = "check"
    memory_plan_gpu_gb: float | None = None

    # Progress: sent to Runpod while denoising, only when the SDK has somewhere to send it.
    report_progress: bool = False

    # Logging: the runpod SDK defaults to DEBUG, which logs every job's whole output.
    runpod_log_level: str = "INFO"

    # Queue worker or HTTP server (handler.py reads these first, on their own: ServeSettings.from_env).
    serve: ServeSettings = ServeSettings()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every row of ``VARIABLES`` parsed (a bad value raises a ConfigError naming its variable), then the named
        steps for the variables that are not one attribute, then the rules between variables."""
        env = os.environ if env is None else env
        values = {var.name: var.read(env) for var in VARIABLES if var.read_by == "worker"}
        attributes = {var.field: values[var.name] for var in VARIABLES if var.field is not None}
        settings = cls(
            **{name: value for name, value in attributes.items() if "." not in name},
            hf_hub_cache=_hf_hub_cache(values),
            bucket=_bucket_settings(values),
            upload_fallback_inline=values["UPLOAD_FALLBACK"] == "inline",
            safety_checker=_safety_checker_policy(values, _DEFAULTS.safety_checker),
            acceleration=_acceleration_settings(values, _nested(attributes, "acceleration")),
            # The SDK posts progress to this URL; locally it is unset and each post would only log an error.
            report_progress=bool(values["RUNPOD_WEBHOOK_POST_OUTPUT"]),
            serve=ServeSettings(**_nested(attributes, "serve")),
        )
        if settings.t2i_model is None and settings.edit_model is None and settings.layered_model is None:
            raise ConfigError(
                "Neither QWEN_IMAGE_MODEL nor QWEN_IMAGE_EDIT_MODEL (nor QWEN_IMAGE_LAYERED_MODEL) is set to a model: "
                "the worker would serve nothing"
            )
        return settings


# ------------------------------------------------------------------------------------------------- the variables

Kind = Literal["model", "text", "path", "boolean", "integer", "number", "choice", "sizes", "step_cache"]


@dataclass(frozen=True)
class Variable:
    """One environment variable: how its text is parsed, where the value goes, and its README row.

    ``field`` names the ``Settings`` attribute it fills (dotted for a nested one: ``acceleration.quant``), whose
    default is the variable's default. A variable without a field is read by a named step of ``from_env`` and
    carries its own ``unset`` value (None: unset means something the doc says, e.g. "the model card's").
    """

    name: str
    kind: Kind
    doc: str
    field: str | None = None
    unset: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    # The README's default cell after the value, when the value alone does not say what it means.
    default_note: str = ""
    # "sdk": read by the runpod SDK, not by the worker: documented, never parsed here.
    read_by: Literal["worker", "sdk"] = "worker"

    def __post_init__(self) -> None:
        if self.field is not None and self.unset is not None:
            raise ValueError(f"{self.name}: a variable with a field takes the field's default, not its own")
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError(f"{self.name}: choices go with the choice kind, and it needs them")

    @property
    def default(self) -> Any:
        """The value when the variable is unset or empty: the Settings field's default, else ``unset``."""
        return attrgetter(self.field)(_DEFAULTS) if self.field is not None else self.unset

    def read(self, env: Mapping[str, str]) -> Any:
        raw = env.get(self.name)
        if raw is None:
            return self.default
        return self.parse(raw)

    def parse(self, raw: str) -> Any:
        """The value of ``raw`` as this variable's type; empty (after stripping) means unset."""
        text = raw.strip()
        if self.kind == "model":  # a model variable set to "" or "none" switches its pipeline off
            return None if text.lower() in _DISABLED else text
        if not text:
            return self.default
        return _PARSERS[self.kind](self, text)

    def check_range(self, value: float) -> None:
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        if not low <= value <= high:  # also refuses NaN
            raise ConfigError(f"{self.name} must be between {_number(self.low)} and {_number(self.high)}, got {value}")


def _parse_boolean(var: Variable, text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    spellings = f"{'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}"
    raise ConfigError(f"{var.name} must be true or false ({spellings}, any case), got {text!r}")


def _parse_integer(var: Variable, text: str) -> int:
    """An integer, or a number with no fractional part ("50.0": a Hub number input may deliver that)."""
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not number.is_integer():  # 50.5, nan, inf, words
            raise ConfigError(f"{var.name} must be an integer, got {text!r}") from None
        value = int(number)
    var.check_range(value)
    return value


def _parse_number(var: Variable, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{var.name} must be a number, got {text!r}") from None
    var.check_range(value)
    return value


def _parse_choice(var: Variable, text: str) -> str:
    """One of the choices, in any case, as the choice is spelt."""
    for choice in var.choices:
        if choice.lower() == text.lower():
            return choice
    raise ConfigError(f"{var.name} must be one of {', '.join(var.choices)}, got {text!r}")


def _parse_step_cache(var: Variable, text: str) -> str:
    """Checked here so the error names the variable; the acceleration step splits it into name and parameter."""
    try:
        parse_step_cache(text)
    except ValueError as err:
        raise ConfigError(f"{var.name} {err}") from None
    return text


def _parse_sizes(var: Variable, text: str) -> tuple[tuple[int, int], ...]:
    sizes = []
    for item in text.split(","):
        try:
            sizes.append(parse_size(item))  # the request rule: only sizes a request could ask for are worth warming
        except ValidationError as err:
            raise ConfigError(f"{var.name}: each size {err.rule}") from None
    return tuple(sizes)


_PARSERS: dict[str, Any] = {
    "text": lambda var, text: text,
    "path": lambda var, text: Path(text),
    "boolean": _parse_boolean,
    "integer": _parse_integer,
    "number": _parse_number,
    "choice": _parse_choice,
    "sizes": _parse_sizes,
    "step_cache": _parse_step_cache,
}

_DEFAULTS = Settings()

# The one table of settings, in the README's order. A new variable is one row here (and, when it is one
# attribute, its Settings field with the default); the README's table is regenerated from it.
VARIABLES: tuple[Variable, ...] = (
    Variable(
        "QWEN_IMAGE_MODEL", "model", field="t2i_model",
        doc="text-to-image pipeline: a folder or an HF repo id, resolved offline (below); `none` for an edit-only "
        "endpoint. `Qwen/Qwen-Image-2512` is served the same way; `Qwen/Qwen-Image-2.1` serves text-to-image and "
        "edits from this one variable (see Models)",
    ),
    Variable(
        "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE", "boolean", field="accept_research_license",
        doc="`true` accepts the Qwen Research License (research and evaluation only, not commercial use): without "
        "it a 2.1 checkpoint is not served and every job fails saying so",
    ),
    Variable(
        "QWEN_IMAGE_EDIT_MODEL", "model", field="edit_model", default_note="(no editing)",
        doc="edit pipeline (Edit or Edit-Plus 2509/2511), same rules; the class comes from `model_index.json`",
    ),
    Variable(
        "QWEN_IMAGE_LAYERED_MODEL", "model", field="layered_model", default_note="(no layers)",
        doc="layer decomposition pipeline (`Qwen/Qwen-Image-Layered`, Apache-2.0), same rules; a third pipeline: its "
        "transformer is another ~41 GB in bf16, while its Qwen2.5-VL text encoder (~16.6 GB) is loaded once with the "
        "other pipelines' when the files are identical (`SHARE_COMPONENTS`); its VAE (RGBA) is its own. `layers` "
        "requests without it fail naming this variable. `COMPILE` does not warm it up (it takes no width/height): its "
        "first jobs may compile (at most two graphs: a static one, then one for every other size)",
    ),
    Variable(
        "QWEN_IMAGE_CONTROLNET_MODEL", "model", field="controlnet_model", default_note="(no ControlNet)",
        doc="a Qwen-Image ControlNet(-Union) checkpoint (`QwenImageControlNetModel`: a folder with `config.json`, or "
        "a repo id), resolved offline like the models; joined to the text-to-image pipeline with `from_pipe`, so the "
        "base weights are not loaded twice: the cost is the ControlNet's own weights (~3.5 GB bf16 for the 5-block "
        "InstantX Union). `control_image` requests without it fail naming this variable",
    ),
    Variable(
        "RUNPOD_VOLUME_PATH", "path", field="volume_path",
        doc="where Runpod's cached models and the network volume are mounted",
    ),
    Variable(
        "HF_HUB_CACHE", "path", default_note="(huggingface_hub's)",
        doc="the baked model cache, huggingface_hub's own variable; wins over `HF_HOME`",
    ),
    Variable(
        "HF_HOME", "path", default_note="(huggingface_hub's)",
        doc="the baked model cache is `$HF_HOME/hub` when `HF_HUB_CACHE` is unset (the image sets "
        "`HF_HOME=/models/huggingface`)",
    ),
    Variable(
        "REQUIRE_CUDA", "boolean", field="require_cuda", default_note="(`1` in the image)",
        doc="refuse to start without a CUDA device instead of running 20B parameters on the CPU",
    ),
    Variable(
        "DEFAULT_STEPS", "integer", field="default_steps", low=1, high=100, default_note="(the model card's)",
        doc="steps when a request gives none, for every model; unset, each model's card value (50, or 40 for "
        "Edit-Plus and 2.1; see Models)",
    ),
    Variable(
        "DEFAULT_TRUE_CFG_SCALE", "number", field="default_true_cfg_scale", low=1.0, high=20.0,
        default_note="(the model card's)",
        doc="true CFG when a request gives none, for every model; unset, each model's card value (4.0, or 1 for 2.1)",
    ),
    Variable(
        "PRICE_PER_MEGAPIXEL", "number", field="price_per_megapixel", low=0.0, high=1e6,
        doc="the `cost` figure's rate",
    ),
    Variable(
        "MAX_IMAGE_BYTES", "integer", field="max_image_bytes", low=1, high=1 << 34,
        doc="largest input image, download or data URI (Runpod's runsync payload limit)",
    ),
    Variable(
        "MAX_IMAGE_PIXELS", "integer", field="max_image_pixels", low=1, high=1 << 34,
        doc="largest input image in pixels, checked before decoding",
    ),
    Variable(
        "IMAGE_FETCH_TIMEOUT_SECONDS", "number", field="image_fetch_timeout_seconds", low=0.1, high=600.0,
        doc="connect/read timeout for input images and LoRA downloads",
    ),
    Variable(
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "boolean", unset=False, read_by="sdk",
        doc="the runpod SDK's switch, read by the SDK: `true` allows loopback/private image and LoRA URLs (tests "
        "use it)",
    ),
    Variable(
        "LOCAL_OUTPUT_DIR", "path", field="local_output_dir",
        doc="write results there and answer `file://` URLs (for local runs; `make demo` uses it)",
    ),
    Variable(
        "MAX_INLINE_BYTES", "integer", field="max_inline_bytes", low=1, high=1 << 34,
        doc="cap on inline (base64) results; Runpod drops outputs over 20 MB",
    ),
    Variable(
        "BUCKET_ENDPOINT_URL", "text",
        doc="S3-compatible endpoint (AWS, R2, B2, MinIO...): results are uploaded and answered as presigned URLs; "
        "the four `BUCKET_*` credentials (this, the two keys and the name) are set all four or none",
    ),
    Variable("BUCKET_ACCESS_KEY_ID", "text", doc="the bucket's access key id"),
    Variable("BUCKET_SECRET_ACCESS_KEY", "text", doc="the bucket's secret key (never logged)"),
    Variable("BUCKET_NAME", "text", doc="the bucket receiving the results"),
    Variable(
        "BUCKET_REGION", "text", default_note="(derived from the endpoint, else `us-east-1`)",
        doc="SigV4 signing region (`auto` for R2)",
    ),
    Variable(
        "BUCKET_ADDRESSING_STYLE", "choice", unset="path", choices=("path", "virtual", "auto"),
        doc="S3 addressing style",
    ),
    Variable(
        "BUCKET_PREFIX", "text", unset="",
        doc="key prefix: objects are `<prefix>/<job id>/<index>.<ext>`",
    ),
    Variable(
        "IMAGE_URL_TTL_SECONDS", "integer", unset=MAX_PRESIGN_TTL_SECONDS, low=1, high=MAX_PRESIGN_TTL_SECONDS,
        doc="presigned URL lifetime; 7 days is the SigV4 maximum",
    ),
    Variable(
        "UPLOAD_FALLBACK", "choice", unset="off", choices=("off", "inline"),
        doc="`inline`: if an upload still fails after retries, return the image inline with a `warning`",
    ),
    Variable(
        "LORA_CACHE_DIR", "path", field="lora_cache_dir",
        doc="where downloaded LoRAs are cached (by URL)",
    ),
    Variable(
        "LORA_CACHE_MAX_BYTES", "integer", field="lora_cache_max_bytes", low=1, high=1 << 50,
        doc="cache size; least recently used files are evicted",
    ),
    Variable(
        "LORA_MAX_BYTES", "integer", field="lora_max_bytes", low=1, high=1 << 40,
        doc="largest single LoRA file",
    ),
    Variable(
        "LORA_MEMORY_CACHE_BYTES", "integer", field="lora_memory_cache_bytes", low=0, high=1 << 44,
        doc="host memory for prepared LoRAs (read, parsed, keys converted), by content hash, least recently used "
        "out: a repeated LoRA costs no disk read or parse. Host RAM against per-job reads; `0` prepares every job's "
        "files",
    ),
    Variable(
        "LORA_SLOT_RANK", "integer", field="lora_slot_rank", low=0, high=1024,
        doc="rank of the LoRA slots (user LoRAs written in place per job, see below); a job's LoRAs must add up to at "
        "most this rank per layer to use it. Memory: `rank x (in + out)` per block layer per tree, ~1.2 GB in bf16 "
        "at 64 for Qwen-Image, times the trees (1 + the Lightning files configured); a LoRA job also runs the slot's "
        "matmuls on every block layer (~2.5 % of a 1024² step's FLOPs at 64). `0`: no slots, every LoRA loaded per "
        "job (slower per job; recompiles under `COMPILE`)",
    ),
    Variable(
        "LIGHTNING_LORA", "path", field="lightning_lora",
        doc="Qwen-Image-Lightning 8-step LoRA file (text-to-image fast mode): a local path, or `org/name:file` found "
        "offline in the model caches like the models (e.g. "
        "`lightx2v/Qwen-Image-Lightning:Qwen-Image-Lightning-8steps-V1.1.safetensors`, what "
        "`fetch_models.py --models lightning-8step` fetches; the other three take the same spelling); read once at "
        "start-up and kept "
        "resident on a copy of the transformer's modules that shares its weights (the LoRA's size in memory, "
        "~0.85 GB for the 8-step file); a fast job reads nothing. Refused with a 2.1 model (no Lightning LoRA "
        "exists for it)",
    ),
    Variable(
        "LIGHTNING_LORA_4STEP", "path", field="lightning_lora_4step",
        doc="the same for the 4-step file",
    ),
    Variable(
        "LIGHTNING_EDIT_LORA", "path", field="lightning_edit_lora",
        doc="the same for the edit pipeline's 8-step file",
    ),
    Variable(
        "LIGHTNING_EDIT_LORA_4STEP", "path", field="lightning_edit_lora_4step",
        doc="the same for the edit pipeline's 4-step file",
    ),
    Variable(
        "LIGHTNING_FUSE", "boolean", field="lightning_fuse",
        doc="`true`: merge the one configured Lightning file per pipeline into the transformer at start-up, for an "
        "endpoint that serves only fast jobs: fast jobs run at plain-graph speed with no LoRA memory, and every other "
        "request (plain, or the other fast mode) is refused",
    ),
    Variable(
        "SHARE_COMPONENTS", "boolean", field="share_components",
        doc="load a component both pipelines have with identical files (the Qwen2.5-VL text encoder and VAE, "
        "~17 GB) once",
    ),
    Variable(
        "MEMORY_PLAN", "choice", field="memory_plan", choices=MEMORY_PLANS,
        doc="the memory plan at start-up (see \"Memory plan: which setup fits which GPU\"): `check` refuses a setup "
        "that does not fit the GPU's free memory (every job fails with what it needs, what the GPU has and what would "
        "fit); `auto` loads the least lossy plan that fits (bf16, then `fp8` where the GPU has compute capability "
        "8.9+ else `int8`, then the text encoder on the CPU, then model CPU offload) and names it in the log and in "
        "every result's `notes`; `off` compares nothing (the plan is still logged)",
    ),
    Variable(
        "MEMORY_PLAN_GPU_GB", "number", field="memory_plan_gpu_gb", low=0.001, high=100_000.0,
        default_note="(the GPU's free memory)",
        doc="plan against this many GB instead of what the GPU reports free: a share of a GPU, or a rehearsal on a "
        "machine without one",
    ),
    Variable(
        "ATTENTION_BACKEND", "choice", field="acceleration.attention_backend", choices=ATTENTION_BACKENDS,
        doc="`native`: torch SDPA (picks cuDNN/flash/efficient); the others where installed; hub-downloaded kernels "
        "are refused",
    ),
    Variable(
        "STEP_CACHE", "step_cache", unset="off",
        doc="opt-in speed/quality trade-off: `fbcache[:threshold]` (First-Block cache, 0.05) or "
        "`taylorseer[:interval]` (5)",
    ),
    Variable(
        "BATCHED_CFG", "boolean", field="acceleration.batched_cfg",
        doc="run true CFG's two transformer passes per step as one batched, masked forward (measure with "
        "`ATTENTION_BACKEND`; not with `STEP_CACHE`)",
    ),
    Variable(
        "COMPILE", "choice", unset="off", choices=("off", "regional"),
        doc="`regional`: torch.compile of the repeated transformer block, warmed up at start-up",
    ),
    Variable(
        "TRANSFORMER_QUANT", "choice", field="acceleration.quant", choices=QUANT_MODES,
        doc="`int8`: torchao int8 weight-only (any CUDA GPU; half the bf16 weight memory, image close to bf16); "
        "`fp8`: fp8 weights and activations (compute capability 8.9+, Ada/Hopper; elsewhere every job fails naming "
        "the GPU). Applied once after loading, before the Lightning copies and compilation; see \"Fast mode, LoRAs "
        "and quantization\"",
    ),
    Variable(
        "COMPILE_WARMUP_SIZES", "sizes", field="acceleration.warmup_sizes",
        doc="sizes compiled as their own graphs before the first job; with one more warm-up call (a second image "
        "length) they leave a graph that serves every other size and reference count, so no job compiles",
    ),
    Variable(
        "SAFETY_CHECKER", "choice", choices=("on", "always", "off"),
        default_note="(`on`, or `off` when `SAFETY_CHECKER_MODEL=none`)",
        doc="`on`: obey each request's flag; `always`: check every image; `off`: no checker loaded",
    ),
    Variable(
        "SAFETY_CHECKER_MODEL", "text", field="safety_checker_model",
        doc="folder or repo id of the `StableDiffusionSafetyChecker`; `none`: no checker (the image sets it from "
        "its build arg)",
    ),
    Variable(
        "SAFETY_CHECK_INPUTS", "boolean", field="safety_check_inputs",
        doc="also classify edit inputs and refuse flagged ones before generating",
    ),
    Variable(
        "RUNPOD_WEBHOOK_POST_OUTPUT", "text", default_note="(set by Runpod)",
        doc="the SDK's job-output URL; progress updates are sent only when it is set (locally each would only log "
        "an error)",
    ),
    Variable(
        "RUNPOD_LOG_LEVEL", "choice", field="runpod_log_level", choices=LOG_LEVELS,
        doc="the SDK's log level (its own default, DEBUG, logs whole job outputs)",
    ),
    Variable(
        "SERVE", "choice", field="serve.mode", choices=("queue", "http"),
        doc="`queue`: Runpod's queue worker (the SDK pulls jobs); `http`: the HTTP server of a load-balancing "
        "endpoint (OpenAI's Images API and `/runsync`; see \"OpenAI Images API\")",
    ),
    Variable(
        "PORT", "integer", field="serve.port", low=1, high=65535,
        doc="`SERVE=http`: the port the server listens on (Runpod's variable)",
    ),
    Variable(
        "PORT_HEALTH", "integer", field="serve.port_health", low=1, high=65535, default_note="(`PORT`)",
        doc="`SERVE=http`: the port of `GET /ping` (Runpod's variable); the same server answers on both",
    ),
    Variable("SERVE_HOST", "text", field="serve.host", doc="`SERVE=http`: the address to listen on"),
    Variable(
        "SERVE_MAX_WAITING", "integer", field="serve.max_waiting", low=0, high=1000,
        doc="`SERVE=http`: requests that may wait while one job runs; more are answered 429 with `Retry-After`",
    ),
    Variable(
        "SERVE_MAX_BODY_BYTES", "integer", field="serve.max_body_bytes", low=1024, high=1 << 34,
        doc="`SERVE=http`: largest request body (Runpod's load balancer carries 30 MB); larger is 413, refused "
        "before it is read",
    ),
)

VARIABLES_BY_NAME = {var.name: var for var in VARIABLES}


# --------------------------------------------------------------- the named steps: variables that are not one field


def _nested(attributes: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The ``prefix.name`` attributes, as ``name`` keyword arguments of the nested settings."""
    return {name.split(".", 1)[1]: value for name, value in attributes.items() if name.startswith(prefix + ".")}


def _acceleration_settings(values: Mapping[str, Any], attributes: dict[str, Any]) -> AccelerationSettings:
    cache_name, cache_parameter = parse_step_cache(values["STEP_CACHE"])  # checked by its row's parser
    if cache_name != "off" and attributes["batched_cfg"]:
        raise ConfigError("BATCHED_CFG=true cannot be combined with STEP_CACHE: the step caches are kept per CFG pass")
    return AccelerationSettings(
        **attributes,
        step_cache=cache_name,
        step_cache_parameter=cache_parameter,
        compile=values["COMPILE"] == "regional",
    )


def _safety_checker_policy(values: Mapping[str, Any], default: str) -> str:
    """SAFETY_CHECKER, whose default follows SAFETY_CHECKER_MODEL: ``none`` means no checker is installed (an image
    built with SAFETY_CHECKER_MODEL=none carries that in its ENV), so the policy defaults to ``off``; asking for
    ``on`` or ``always`` without a checker is a contradiction, refused rather than guessed."""
    no_checker = values["SAFETY_CHECKER_MODEL"].lower() == "none"
    policy: str = values["SAFETY_CHECKER"] or ("off" if no_checker else default)
    if no_checker and policy != "off":
        raise ConfigError(
            f"SAFETY_CHECKER={policy} needs a safety checker but SAFETY_CHECKER_MODEL=none: name a checker "
            "(a folder or repo id) or set SAFETY_CHECKER=off"
        )
    return policy


def _hf_hub_cache(values: Mapping[str, Any]) -> Path | None:
    """The baked Hugging Face cache, following huggingface_hub's own variables (HF_HUB_CACHE, then HF_HOME)."""
    if values["HF_HUB_CACHE"] is not None:
        return Path(values["HF_HUB_CACHE"])
    if values["HF_HOME"] is not None:
        return Path(values["HF_HOME"]) / "hub"
    return None


_BUCKET_CREDENTIALS = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_NAME")


def _bucket_settings(values: Mapping[str, Any]) -> BucketSettings | None:
    present = [name for name in _BUCKET_CREDENTIALS if values[name]]
    if not present:
        return None
    missing = [name for name in _BUCKET_CREDENTIALS if not values[name]]
    if missing:
        raise ConfigError(
            "Incomplete bucket configuration: "
            + ", ".join(present)
            + " set but "
            + ", ".join(missing)
            + " missing. Set all four to upload results, or none to return them inline."
        )
    return BucketSettings(
        endpoint_url=values["BUCKET_ENDPOINT_URL"],
        access_key_id=values["BUCKET_ACCESS_KEY_ID"],
        secret_access_key=Secret(values["BUCKET_SECRET_ACCESS_KEY"]),
        bucket=values["BUCKET_NAME"],
        region=values["BUCKET_REGION"] or _region_from_endpoint(values["BUCKET_ENDPOINT_URL"]),
        addressing_style=values["BUCKET_ADDRESSING_STYLE"],
        prefix=values["BUCKET_PREFIX"].strip("/"),
        url_ttl_seconds=values["IMAGE_URL_TTL_SECONDS"],
    )


def _region_from_endpoint(endpoint_url: str) -> str:
    """AWS-style endpoints name their region (s3.eu-west-2.amazonaws.com, s3.us-west-004.backblazeb2.com)."""
    host = endpoint_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    parts = host.split(".")
    if host.endswith(".r2.cloudflarestorage.com"):
        return "auto"
    for index, part in enumerate(parts[:-1]):
        if part == "s3" or part.startswith("s3-"):
            candidate = parts[index + 1] if part == "s3" else part[3:]
            if candidate and candidate[0].isalpha() and "-" in candidate:
                return candidate
    return "us-east-1"




# ------------------------------------------------------------------------------------------ the README's table


def _number(value: float | None) -> str:
    if value is None:
        return "any"
    if float(value).is_integer():
        whole = int(value)
        if whole >= 1 << 30 and whole & (whole - 1) == 0:  # the byte caps' bounds are powers of two
            return f"2^{whole.bit_length() - 1}"
        return str(whole)
    return f"{value:g}"


def shown_value(var: Variable) -> str:
    """The README's "values" cell: the variable's type with its range or choices."""
    if var.kind == "choice":
        return ", ".join(f"`{choice}`" for choice in var.choices)
    if var.kind == "boolean":
        return "`true`/`false`"
    if var.kind in ("integer", "number"):
        return f"{var.kind}, {_number(var.low)} to {_number(var.high)}"
    return {
        "model": "repo id, folder or `none`",
        "text": "text",
        "path": "path",
        "sizes": "`W*H`, comma-separated",
        "step_cache": "`off`, `fbcache[:threshold]`, `taylorseer[:interval]`",
    }[var.kind]


def shown_default(var: Variable) -> str:
    """The README's "default" cell: the default value, and what it means when the value alone does not say."""
    value = var.default
    if value is None or value == "":
        shown = "unset"
    elif isinstance(value, bool):
        shown = f"`{str(value).lower()}`"
    elif isinstance(value, float):
        shown = f"`{value:g}`"
    elif var.kind == "sizes":
        shown = "`" + ",".join(f"{width}*{height}" for width, height in value) + "`"
    else:
        shown = f"`{value}`"
    return f"{shown} {var.default_note}" if var.default_note else shown


def readme_table() -> str:
    """The README's "Environment variables" table, one row per variable (scripts/env_table.py writes it)."""
    rows = ["| variable | default | values | meaning |", "|---|---|---|---|"]
    rows += [f"| `{var.name}` | {shown_default(var)} | {shown_value(var)} | {var.doc} |" for var in VARIABLES]
    return "\n".join(rows) + "\n"
