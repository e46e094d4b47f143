"""Every environment variable the worker reads, parsed once into typed settings.

Nothing else in the package reads ``os.environ``: other modules receive a ``Settings``. Each default is written once,
on the ``Settings`` field; ``from_env`` falls back to it. Each variable, its default and its meaning is listed in the
README's "Environment variables" table (tests/test_docs.py holds the two in step).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .acceleration import ATTENTION_BACKENDS, AccelerationSettings, parse_step_cache
from .errors import ConfigError, ValidationError
from .quantization import QUANT_MODES
from .schema import parse_size

DEFAULT_T2I_MODEL = "Qwen/Qwen-Image"
DEFAULT_SAFETY_CHECKER_MODEL = "CompVis/stable-diffusion-safety-checker"
# The words that switch a pipeline off, e.g. QWEN_IMAGE_MODEL=none on an edit-only endpoint.
_DISABLED = frozenset({"", "none", "off", "false", "0"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

# SigV4 presigned URLs cannot live longer than 7 days; Runpod's endpoints promise exactly that.
MAX_PRESIGN_TTL_SECONDS = 604_800


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
    endpoint (http_server.py). Read on its own, before the models' settings, so that an HTTP server whose models
    cannot load still starts and answers why (``/ping`` 503) instead of exiting."""

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
        reader = _EnvReader(os.environ if env is None else env)
        default = cls()
        port = reader.integer("PORT", default.port, low=1, high=65535)
        return cls(
            mode=reader.choice("SERVE", default.mode, ("queue", "http")),
            host=reader.text("SERVE_HOST", "") or default.host,
            port=port,
            port_health=reader.optional_integer("PORT_HEALTH", low=1, high=65535),
            max_waiting=reader.integer("SERVE_MAX_WAITING", default.max_waiting, low=0, high=1000),
            max_body_bytes=reader.integer("SERVE_MAX_BODY_BYTES", default.max_body_bytes, low=1024, high=1 << 34),
        )


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

    # Progress: sent to Runpod while denoising, only when the SDK has somewhere to send it.
    report_progress: bool = False

    # Logging: the runpod SDK defaults to DEBUG, which logs every job's whole output.
    runpod_log_level: str = "INFO"

    # Queue worker or HTTP server (read first and on its own by handler.py; kept here so the whole configuration is
    # one object).
    serve: ServeSettings = ServeSettings()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _EnvReader(env)
        default = cls()  # each variable falls back to its field's default
        settings = cls(
            t2i_model=reader.model("QWEN_IMAGE_MODEL", default.t2i_model),
            edit_model=reader.model("QWEN_IMAGE_EDIT_MODEL", default.edit_model),
            layered_model=reader.model("QWEN_IMAGE_LAYERED_MODEL", default.layered_model),
            controlnet_model=reader.model("QWEN_IMAGE_CONTROLNET_MODEL", default.controlnet_model),
            volume_path=Path(reader.text("RUNPOD_VOLUME_PATH", str(default.volume_path))),
            hf_hub_cache=_hf_hub_cache(env),
            require_cuda=reader.boolean("REQUIRE_CUDA", default.require_cuda),
            accept_research_license=reader.boolean(
                "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE", default.accept_research_license
            ),
            default_steps=reader.optional_integer("DEFAULT_STEPS", low=1, high=100),
            default_true_cfg_scale=reader.optional_number("DEFAULT_TRUE_CFG_SCALE", low=1.0, high=20.0),
            price_per_megapixel=reader.number("PRICE_PER_MEGAPIXEL", default.price_per_megapixel, low=0.0, high=1e6),
            max_image_bytes=reader.integer("MAX_IMAGE_BYTES", default.max_image_bytes, low=1, high=1 << 34),
            max_image_pixels=reader.integer("MAX_IMAGE_PIXELS", default.max_image_pixels, low=1, high=1 << 34),
            image_fetch_timeout_seconds=reader.number(
                "IMAGE_FETCH_TIMEOUT_SECONDS", default.image_fetch_timeout_seconds, low=0.1, high=600.0
            ),
            local_output_dir=reader.path("LOCAL_OUTPUT_DIR", default.local_output_dir),
            max_inline_bytes=reader.integer("MAX_INLINE_BYTES", default.max_inline_bytes, low=1, high=1 << 34),
            bucket=_bucket_settings(reader),
            upload_fallback_inline=reader.choice("UPLOAD_FALLBACK", "off", ("off", "inline")) == "inline",
            lora_cache_dir=reader.path("LORA_CACHE_DIR", None) or default.lora_cache_dir,
            lora_cache_max_bytes=reader.integer(
                "LORA_CACHE_MAX_BYTES", default.lora_cache_max_bytes, low=1, high=1 << 50
            ),
            lora_max_bytes=reader.integer("LORA_MAX_BYTES", default.lora_max_bytes, low=1, high=1 << 40),
            lora_memory_cache_bytes=reader.integer(
                "LORA_MEMORY_CACHE_BYTES", default.lora_memory_cache_bytes, low=0, high=1 << 44
            ),
            lora_slot_rank=reader.integer("LORA_SLOT_RANK", default.lora_slot_rank, low=0, high=1024),
            lightning_lora=reader.path("LIGHTNING_LORA", default.lightning_lora),
            lightning_lora_4step=reader.path("LIGHTNING_LORA_4STEP", default.lightning_lora_4step),
            lightning_edit_lora=reader.path("LIGHTNING_EDIT_LORA", default.lightning_edit_lora),
            lightning_edit_lora_4step=reader.path("LIGHTNING_EDIT_LORA_4STEP", default.lightning_edit_lora_4step),
            lightning_fuse=reader.boolean("LIGHTNING_FUSE", default.lightning_fuse),
            safety_checker=_safety_checker_policy(reader, default.safety_checker),
            safety_checker_model=reader.text("SAFETY_CHECKER_MODEL", "") or default.safety_checker_model,
            safety_check_inputs=reader.boolean("SAFETY_CHECK_INPUTS", default.safety_check_inputs),
            share_components=reader.boolean("SHARE_COMPONENTS", default.share_components),
            acceleration=_acceleration_settings(reader, default.acceleration),
            # The SDK posts progress to this URL; locally it is unset and each post would only log an error.
            report_progress=bool(reader.text("RUNPOD_WEBHOOK_POST_OUTPUT", "")),
            runpod_log_level=reader.choice(
                "RUNPOD_LOG_LEVEL", default.runpod_log_level, ("NOTSET", "TRACE", "DEBUG", "INFO", "WARN", "ERROR"),
                upper=True,
            ),
            serve=ServeSettings.from_env(env),
        )
        if settings.t2i_model is None and settings.edit_model is None and settings.layered_model is None:
            raise ConfigError(
                "Neither QWEN_IMAGE_MODEL nor QWEN_IMAGE_EDIT_MODEL (nor QWEN_IMAGE_LAYERED_MODEL) is set to a model: "
                "the worker would serve nothing"
            )
        return settings


def _acceleration_settings(reader: _EnvReader, default: AccelerationSettings) -> AccelerationSettings:
    step_cache = reader.text("STEP_CACHE", "off") or "off"
    try:
        cache_name, cache_parameter = parse_step_cache(step_cache)
    except ValueError as err:
        raise ConfigError(f"STEP_CACHE {err}") from None
    sizes = []
    default_sizes = ",".join(f"{width}*{height}" for width, height in default.warmup_sizes)
    for item in reader.text("COMPILE_WARMUP_SIZES", default_sizes).split(","):
        try:
            sizes.append(parse_size(item))  # the request rule: only sizes a request could ask for are worth warming
        except ValidationError as err:
            raise ConfigError(f"COMPILE_WARMUP_SIZES: each size {err.rule}") from None
    batched_cfg = reader.boolean("BATCHED_CFG", default.batched_cfg)
    if cache_name != "off" and batched_cfg:
        raise ConfigError("BATCHED_CFG=true cannot be combined with STEP_CACHE: the step caches are kept per CFG pass")
    return AccelerationSettings(
        attention_backend=reader.choice("ATTENTION_BACKEND", default.attention_backend, ATTENTION_BACKENDS),
        step_cache=cache_name,
        step_cache_parameter=cache_parameter,
        compile=reader.choice("COMPILE", "off", ("off", "regional")) == "regional",
        batched_cfg=batched_cfg,
        warmup_sizes=tuple(sizes),
        quant=reader.choice("TRANSFORMER_QUANT", default.quant, QUANT_MODES),
    )


def _safety_checker_policy(reader: _EnvReader, default: str) -> str:
    """SAFETY_CHECKER, whose default follows SAFETY_CHECKER_MODEL: ``none`` means no checker is installed (an image
    built with SAFETY_CHECKER_MODEL=none carries that in its ENV), so the policy defaults to ``off``; asking for
    ``on`` or ``always`` without a checker is a contradiction, refused rather than guessed."""
    no_checker = reader.text("SAFETY_CHECKER_MODEL", "").lower() == "none"
    policy = reader.choice("SAFETY_CHECKER", "off" if no_checker else default, ("on", "always", "off"))
    if no_checker and policy != "off":
        raise ConfigError(
            f"SAFETY_CHECKER={policy} needs a safety checker but SAFETY_CHECKER_MODEL=none: name a checker "
            "(a folder or repo id) or set SAFETY_CHECKER=off"
        )
    return policy


def _hf_hub_cache(env: Mapping[str, str]) -> Path | None:
    """The baked Hugging Face cache, following huggingface_hub's own variables (HF_HUB_CACHE, then HF_HOME)."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    return None


def _bucket_settings(reader: _EnvReader) -> BucketSettings | None:
    names = {
        "BUCKET_ENDPOINT_URL": reader.text("BUCKET_ENDPOINT_URL", ""),
        "BUCKET_ACCESS_KEY_ID": reader.text("BUCKET_ACCESS_KEY_ID", ""),
        "BUCKET_SECRET_ACCESS_KEY": reader.text("BUCKET_SECRET_ACCESS_KEY", ""),
        "BUCKET_NAME": reader.text("BUCKET_NAME", ""),
    }
    present = [name for name, value in names.items() if value]
    if not present:
        return None
    missing = [name for name, value in names.items() if not value]
    if missing:
        raise ConfigError(
            "Incomplete bucket configuration: "
            + ", ".join(present)
            + " set but "
            + ", ".join(missing)
            + " missing. Set all four to upload results, or none to return them inline."
        )
    return BucketSettings(
        endpoint_url=names["BUCKET_ENDPOINT_URL"],
        access_key_id=names["BUCKET_ACCESS_KEY_ID"],
        secret_access_key=Secret(names["BUCKET_SECRET_ACCESS_KEY"]),
        bucket=names["BUCKET_NAME"],
        region=reader.text("BUCKET_REGION", "") or _region_from_endpoint(names["BUCKET_ENDPOINT_URL"]),
        addressing_style=reader.choice("BUCKET_ADDRESSING_STYLE", "path", ("path", "virtual", "auto")),
        prefix=reader.text("BUCKET_PREFIX", "").strip("/"),
        url_ttl_seconds=reader.integer(
            "IMAGE_URL_TTL_SECONDS", MAX_PRESIGN_TTL_SECONDS, low=1, high=MAX_PRESIGN_TTL_SECONDS
        ),
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


class _EnvReader:
    """Reads one variable at a time, turning a bad value into a ConfigError that names the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str) -> str:
        return self._env.get(name, default).strip()

    def path(self, name: str, default: Path | None) -> Path | None:
        value = self.text(name, "")
        return Path(value) if value else default

    def model(self, name: str, default: str | None) -> str | None:
        if name not in self._env:
            return default
        value = self._env[name].strip()
        return None if value.lower() in _DISABLED else value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.text(name, "").lower()
        if name not in self._env:
            return default
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def optional_integer(self, name: str, *, low: int, high: int) -> int | None:
        """The value, or None when the variable is unset or empty (so "unset" stays distinguishable)."""
        return self.integer(name, 0, low=low, high=high) if self.text(name, "") else None

    def optional_number(self, name: str, *, low: float, high: float) -> float | None:
        return self.number(name, 0.0, low=low, high=high) if self.text(name, "") else None

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        raw = self.text(name, "")
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        raw = self.text(name, "")
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not low <= value <= high:  # also rejects NaN
            raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw}")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...], *, upper: bool = False) -> str:
        raw = self.text(name, "") or default
        value = raw.upper() if upper else raw.lower()
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
        return value
