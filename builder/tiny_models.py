"""Build tiny, random-weight stand-ins for the models the worker serves, for tests and local runs.

    python builder/tiny_models.py OUT_DIR

writes, offline and in seconds, folders laid out like the real Hugging Face repos:

- ``OUT_DIR/qwen-image``: a ``QwenImagePipeline`` (Qwen/Qwen-Image);
- ``OUT_DIR/qwen-image-edit``: a ``QwenImageEditPipeline`` with its ``processor/`` (Qwen/Qwen-Image-Edit);
- ``OUT_DIR/qwen-image-edit-plus``: a ``QwenImageEditPlusPipeline`` (Qwen/Qwen-Image-Edit-2509);
- ``OUT_DIR/qwen-image-layered``: a ``QwenImageLayeredPipeline`` (Qwen/Qwen-Image-Layered): the Qwen-Image transformer
  with its layer-3D RoPE and extra (RGB/RGBA) time conditioning, a 4-channel (RGBA) VAE and the edit pipelines'
  ``processor/`` (it captions an image when no prompt is given);
- ``OUT_DIR/qwen-image-controlnet``: a ``QwenImageControlNetModel`` (a Qwen-Image ControlNet-Union checkpoint) for the
  tiny Qwen-Image transformer, its output blocks and input embedder randomised (diffusers zero-initialises them, and a
  ControlNet left so would change nothing);
- ``OUT_DIR/qwen-image-2.1``: a ``QwenImage21Pipeline`` (Qwen/Qwen-Image-2.1): a Qwen3-VL text encoder with its
  ``processor/`` (tokenizer, image processor and chat template, no ``tokenizer/`` of its own), the single-stream
  transformer and the RGBA VAE (16x spatial compression);
- ``OUT_DIR/safety-checker``: a ``StableDiffusionSafetyChecker`` with its CLIP preprocessor config at the root
  (CompVis/stable-diffusion-safety-checker), built so that it never flags an image.

The weights are random but the wiring is real: the same classes and file layout, the same special tokens and
prompt templates (the prefix each pipeline drops is the same number of tokens as with the real vocabulary), the same
latent geometry (VAE scale factor 8, 16 latent channels packed 2x2), the real scheduler config and the real image
processor settings. Only the vocabulary, widths and depths are tiny. The output is byte-identical on every run
(fixed seeds) and replaces what was there before.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Set before any Hugging Face library is imported: they read it once, at import time. Nothing here needs the
# network, and a stray download attempt should fail loudly instead of hanging a test run.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLQwenImage,
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
    QwenImageControlNetModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageLayeredPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from tokenizers import Regex, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

SEED = 0

# scheduler/scheduler_config.json of Qwen/Qwen-Image (and, by the published 2.1 layouts, of Qwen/Qwen-Image-2.1).
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Qwen2.5-VL's added tokens, in their real order (ids follow the byte-level vocab, as in the real tokenizer).
# The pipelines' templates use im_start/im_end/vision_start/vision_end/image_pad; the rest keep the set complete.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
NON_SPECIAL_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

# The BPE merges are learnt from the pipelines' system prompts, so that, as with the real vocabulary, each word of
# a template is one token and the prefix the pipelines drop (prompt_template_encode_start_idx: 34 for text-to-image,
# 64 for edit) ends exactly where the user's text begins. build_all checks this against the pipelines' own values.
MERGE_CORPUS = [
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships"
    " of the objects and background:",
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then"
    " explain how the user's text instruction should alter or modify the image. Generate a new image that meets the"
    " user's requirements while maintaining consistency with the original input where appropriate.",
    "\nuser\n",
    "\nassistant\n",
    "Picture 1: Picture 2: Picture 3: ",
]

# Qwen2.5-VL's image preprocessing (preprocessor_config.json of the real processor/ folder).
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

TEXT_HIDDEN = 32  # text encoder width == transformer joint_attention_dim
SAFETY_IMAGE_SIZE = 32


# --------------------------------------------------------------------------------------------------- tokenizer


def _learn_merges(corpus: list[str]) -> list[tuple[str, str]]:
    """Byte-level BPE on ``corpus`` until every pre-tokenized word is a single token (deterministic tie-break)."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            words[tuple(piece)] += 1

    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += freq
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, freq in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged


def _tokenizer_files() -> dict[str, str]:
    """vocab.json, merges.txt and tokenizer_config.json of a tiny Qwen2 tokenizer, in the real repos' layout."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    merges = _learn_merges(MERGE_CORPUS)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))

    added_tokens_decoder = {}
    for token in SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS:
        added_tokens_decoder[str(len(vocab) + len(added_tokens_decoder))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=2) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n",
    }


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence save-time noise: transformers' shard progress bar, and diffusers' warning that the edit pipelines'
    processor (None on purpose, see _build_pipeline) "cannot be saved"."""
    pipeline_log = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
    level = pipeline_log.level
    bars_were_disabled = transformers_logging.is_progress_bar_enabled() is False
    pipeline_log.setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        pipeline_log.setLevel(level)
        if not bars_were_disabled:
            transformers_logging.enable_progress_bar()


def _write_files(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ models


def _text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": math.ceil(len(tokenizer) / 64) * 64,  # padded, like the real 152064
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(SEED)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _transformer(layered: bool = False) -> QwenImageTransformer2DModel:
    torch.manual_seed(SEED)
    # Qwen-Image-Layered's transformer differs by two switches: a RoPE that gives each layer its own frame index
    # (the input image's frame counted negatively) and a time embedding with an extra RGB/RGBA condition.
    return QwenImageTransformer2DModel(
        use_layer3d_rope=layered,
        use_additional_t_cond=layered,
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 packing
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),  # frame, height, width; sums to attention_head_dim
    ).eval()


def _vae(input_channels: int = 3) -> AutoencoderKLQwenImage:
    """``input_channels`` 4: Qwen-Image-Layered's VAE, which encodes and decodes RGBA."""
    torch.manual_seed(SEED)
    # Three downsamplings keep the real 8x spatial factor; 4 channels keep 1-megapixel edits affordable on a CPU.
    # latents_mean/std keep their (real) defaults.
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        input_channels=input_channels,
    ).eval()


def _image_processor_config() -> dict[str, Any]:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": CLIP_STD,
        "max_pixels": 12845056,
        "merge_size": MERGE_SIZE,
        "min_pixels": 3136,
        "patch_size": PATCH_SIZE,
        "processor_class": "Qwen2VLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }


def _video_processor_config() -> dict[str, Any]:
    # Never read by the worker (see qwen_worker.processor); kept so the folder stays a complete Qwen2VLProcessor
    # that the stock class loads wherever torchvision is installed.
    keys = ("image_mean", "image_std", "max_pixels", "merge_size", "min_pixels", "patch_size", "processor_class")
    config = {key: _image_processor_config()[key] for key in keys}
    return {**config, "temporal_patch_size": TEMPORAL_PATCH_SIZE, "video_processor_type": "Qwen2VLVideoProcessor"}


# --------------------------------------------------------------------------------------------------- pipelines


def _check_drop_prefix(pipe: Any, tokenizer: Qwen2Tokenizer) -> None:
    """The tokens the pipeline drops must be exactly the template's system part, as with the real tokenizer."""
    template: str = pipe.prompt_template_encode
    prefix = template[: template.index("<|im_start|>user\n") + len("<|im_start|>user\n")]
    n = len(tokenizer(prefix)["input_ids"])
    if n != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(
            f"{type(pipe).__name__}: template prefix is {n} tokens, the pipeline drops "
            f"{pipe.prompt_template_encode_start_idx}; update MERGE_CORPUS to match its template"
        )


def _build_pipeline(folder: Path, pipeline_class: type, tokenizer_files: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as staging:
        _write_files(Path(staging), tokenizer_files)
        tokenizer = Qwen2Tokenizer.from_pretrained(staging, local_files_only=True)

    layered = pipeline_class is QwenImageLayeredPipeline
    components: dict[str, Any] = {
        # Qwen-Image-Layered: assumed to ship Qwen-Image's scheduler config (not checked against the repo offline);
        # its pipeline passes its own sigmas and mu, so only the shift settings could differ.
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        "vae": _vae(input_channels=4 if layered else 3),
        "text_encoder": _text_encoder(tokenizer),
        "tokenizer": tokenizer,
        "transformer": _transformer(layered=layered),
    }
    edit = pipeline_class is not QwenImagePipeline
    if edit:
        # Saved by hand below: the class that loads without torchvision is ours, and model_index.json must name
        # the stock one, as the real repos do.
        components["processor"] = None
    pipe = pipeline_class(**components)
    _check_drop_prefix(pipe, tokenizer)
    with _quiet():
        pipe.save_pretrained(str(folder), safe_serialization=True)

    # The real repos ship the original vocab.json/merges.txt tokenizer files, not the tokenizer.json that
    # transformers 5 writes; loading them exercises the same conversion the worker performs on real weights.
    shutil.rmtree(folder / "tokenizer")
    _write_files(folder / "tokenizer", tokenizer_files)
    if edit:
        processor_files = dict(tokenizer_files)
        processor_files["preprocessor_config.json"] = json.dumps(_image_processor_config(), indent=2) + "\n"
        processor_files["video_preprocessor_config.json"] = json.dumps(_video_processor_config(), indent=2) + "\n"
        _write_files(folder / "processor", processor_files)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _build_safety_checker(folder: Path) -> None:
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 1000,
            "max_position_embeddings": 77,
            # CLIP's defaults (49406/49407) lie outside the tiny vocabulary
            "bos_token_id": 998,
            "eos_token_id": 999,
            "pad_token_id": 1,
            "projection_dim": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": SAFETY_IMAGE_SIZE,
            "patch_size": 4,
            "projection_dim": 16,
        },
        projection_dim=16,
    )
    torch.manual_seed(SEED)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        # An image is flagged when a cosine similarity (at most 1) exceeds its concept's weight, so these never
        # flag anything. Tests that want flags lower them.
        checker.concept_embeds_weights.fill_(1e4)
        checker.special_care_embeds_weights.fill_(1e4)
    with _quiet():
        checker.save_pretrained(str(folder), safe_serialization=True)
    preprocessor = {
        "crop_size": {"height": SAFETY_IMAGE_SIZE, "width": SAFETY_IMAGE_SIZE},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": SAFETY_IMAGE_SIZE},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ Qwen-Image-2.1

# Qwen-Image-2.1 pairs a Qwen3-VL text encoder (16-pixel vision patches merged 2x2, so one vision token covers the
# 32x32 pixels of a 2x2 group of the VAE's 16x latents) with a single-stream transformer reading those latents
# unpatched. The tiny one keeps that geometry; only widths and depths shrink.
QWEN21_PATCH_SIZE = 16
QWEN21_LATENT_CHANNELS = 16  # 64 in the real VAE; anything but 4 (the pipeline takes 4-channel input as latents)

# The real processor/preprocessor_config.json of Qwen3-VL (and so of Qwen/Qwen-Image-2.1).
QWEN21_IMAGE_MEAN = [0.5, 0.5, 0.5]
QWEN21_IMAGE_STD = [0.5, 0.5, 0.5]

# A Qwen3-VL chat template reduced to what the pipeline renders (system/user/assistant turns of text and images):
# the pipeline counts the tokens of its rendered system turn to know how many hidden states to drop, so the
# processor must carry a template, and it must render that turn as the real one does.
QWEN21_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _qwen21_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen3VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": math.ceil(len(tokenizer) / 64) * 64,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            # mrope sections cover head_dim / 2, interleaved, as in the real config ([24, 20, 20] of 128).
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": QWEN21_PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],  # the real (8, 16, 24) need 25+ vision layers
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return Qwen3VLForConditionalGeneration(config).eval()


def _qwen21_transformer() -> QwenImage21Transformer2DModel:
    torch.manual_seed(SEED)
    return QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=QWEN21_LATENT_CHANNELS,
        out_channels=QWEN21_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=TEXT_HIDDEN,
        mlp_ratio=3,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) does to 128
        causal_condition=True,
    ).eval()


def _qwen21_vae() -> AutoencoderKLQwenImage21:
    # Five stages (four spatial downsamplings) keep the real 16x factor; the real latents_mean/std are cut to size.
    defaults = inspect.signature(AutoencoderKLQwenImage21.__init__).parameters
    torch.manual_seed(SEED)
    return AutoencoderKLQwenImage21(
        base_dim=4,
        decoder_base_dim=6,
        z_dim=QWEN21_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True, True],
        latents_mean=list(defaults["latents_mean"].default[:QWEN21_LATENT_CHANNELS]),
        latents_std=list(defaults["latents_std"].default[:QWEN21_LATENT_CHANNELS]),
        in_channels=4,  # RGBA in and out
        out_channels=4,
    ).eval()


def _qwen21_processor_files(tokenizer_files: dict[str, str]) -> dict[str, str]:
    image = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": QWEN21_IMAGE_MEAN,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "image_std": QWEN21_IMAGE_STD,
        "merge_size": MERGE_SIZE,
        "patch_size": QWEN21_PATCH_SIZE,
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    # Never read by the worker (see qwen_worker.processor); kept so the folder is a complete Qwen3VLProcessor.
    video = {
        **{key: image[key] for key in ("image_mean", "image_std", "merge_size", "patch_size", "processor_class")},
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    return {
        **tokenizer_files,
        "preprocessor_config.json": json.dumps(image, indent=2) + "\n",
        "video_preprocessor_config.json": json.dumps(video, indent=2) + "\n",
        "chat_template.jinja": QWEN21_CHAT_TEMPLATE,
    }


def _build_qwen21_pipeline(folder: Path, tokenizer_files: dict[str, str]) -> None:
    """Written component by component, as the real repo is laid out: the pipeline's constructor needs a processor
    (it renders the chat template), and the stock Qwen3VLProcessor cannot be built here without torchvision."""
    with tempfile.TemporaryDirectory() as staging:
        _write_files(Path(staging), tokenizer_files)
        tokenizer = Qwen2Tokenizer.from_pretrained(staging, local_files_only=True)
    with _quiet():
        _qwen21_transformer().save_pretrained(str(folder / "transformer"), safe_serialization=True)
        _qwen21_vae().save_pretrained(str(folder / "vae"), safe_serialization=True)
        _qwen21_text_encoder(tokenizer).save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(str(folder / "scheduler"))
    _write_files(folder / "processor", _qwen21_processor_files(tokenizer_files))
    index = {
        "_class_name": QwenImage21Pipeline.__name__,
        "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen3VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
        "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage21"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------------------------- main


def _build_controlnet(folder: Path) -> None:
    """A ControlNet for the tiny Qwen-Image transformer (same widths, one block), saved as the real checkpoints are:
    a diffusers model folder (config.json + weights)."""
    transformer = _transformer()
    torch.manual_seed(SEED + 1)
    # Built from the transformer's own settings (those the ControlNet class takes; from_transformer would also copy
    # the layered switches into its config, which it then warns about on every load) and initialised from its weights.
    accepted = inspect.signature(QwenImageControlNetModel.__init__).parameters
    config = {key: value for key, value in transformer.config.items() if key in accepted}
    controlnet = QwenImageControlNetModel(**{**config, "num_layers": 1})
    for name in ("pos_embed", "time_text_embed", "img_in", "txt_in"):
        getattr(controlnet, name).load_state_dict(getattr(transformer, name).state_dict())
    controlnet.transformer_blocks.load_state_dict(transformer.transformer_blocks.state_dict(), strict=False)
    # diffusers zero-initialises these so a fresh ControlNet starts as a no-op; trained checkpoints are not zero, and
    # tests that compare outputs with and without it need it to act. Scaled small so the tiny images stay finite.
    with torch.no_grad():
        for linear in [*controlnet.controlnet_blocks, controlnet.controlnet_x_embedder]:
            linear.weight.normal_(0.0, 0.2)
            linear.bias.normal_(0.0, 0.2)
    with _quiet():
        controlnet.eval().save_pretrained(str(folder), safe_serialization=True)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_all(out_dir: Path) -> dict[str, Path]:
    """Write the tiny model folders under ``out_dir``, replacing earlier ones; return them by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_files = _tokenizer_files()
    builders = {
        "qwen-image": lambda f: _build_pipeline(f, QwenImagePipeline, tokenizer_files),
        "qwen-image-edit": lambda f: _build_pipeline(f, QwenImageEditPipeline, tokenizer_files),
        "qwen-image-edit-plus": lambda f: _build_pipeline(f, QwenImageEditPlusPipeline, tokenizer_files),
        "qwen-image-layered": lambda f: _build_pipeline(f, QwenImageLayeredPipeline, tokenizer_files),
        "qwen-image-controlnet": _build_controlnet,
        "qwen-image-2.1": lambda f: _build_qwen21_pipeline(f, tokenizer_files),
        "safety-checker": _build_safety_checker,
    }
    written: dict[str, Path] = {}
    for name, build in builders.items():
        started = time.perf_counter()
        final = out_dir / name
        # Built beside the target and swapped in, so an interrupted run never leaves a half-written model behind.
        staging = out_dir / f".{name}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        build(staging)
        for path in staging.rglob("*"):
            # safetensors writes its files 0600; others (a container user, a CI cache) must be able to read them
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        written[name] = final
        print(
            f"{final}: {_folder_size(final) / 1e6:.2f} MB in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the tiny models into (created if missing)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    build_all(args.out_dir)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
