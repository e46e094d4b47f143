"""Every message the request parser gives for a single fault, pinned word for word: the wording the hand-written
parser gave before the request was validated through its pydantic declaration (contract.RequestInput), one case for
each way a value can break a declared rule (type, range, length, Unicode, unknown or extra fields, nested paths) and for
the rules across fields after it. A pydantic error the translation (schema._translated) does not word would show here as
a changed message."""

from __future__ import annotations

import math
from typing import Any

import pytest

from qwen_worker.errors import ValidationError
from qwen_worker.schema import parse_request

U = "https://example.invalid/a.png"

CASES: list[tuple[Any, str]] = [
    ({'prompt': 'p', 'loras': [{'path': 'a.safetensors'}, {'path': 'b.safetensors', 'scale': 4.5}]},
     'loras[1].scale must be between -4 and 4, got 4.5'),
    ({'prompt': 'p', 'loras': [{'path': 'a.safetensors', 'scale': '1'}]},
     "loras[0].scale must be a number, got a string '1'"),
    ({'prompt': 'p', 'loras': [{'path': '  '}]}, 'loras[0].path must not be empty'),
    ({'prompt': 'p', 'loras': [{'path': 'a', 'weight': 1}]},
     'loras[0] must be an object {"path": string, "scale": number}'),
    ({'prompt': 'p', 'loras': [{'scale': 1}]}, 'loras[0] must be an object {"path": string, "scale": number}'),
    ({'prompt': 'p', 'loras': 'a'}, 'loras must be an array of at most 3 {"path", "scale"} objects'),
    ({'prompt': 'p', 'loras': [{'path': 'a'}, {'path': 'a'}, {'path': 'a'}, {'path': 'a'}]},
     'loras must be an array of at most 3 {"path", "scale"} objects'),
    ({'prompt': 'p', 'loras': ['a']}, 'loras[0] must be an object {"path": string, "scale": number}'),
    ({'prompt': 'p', 'lora_weights': '', 'lora_scale': 1}, 'lora_weights must not be empty'),
    ({"prompt": "p", "lora_weights": "a" * 5000}, 'lora_weights must be at most 4096 characters, got 5000'),
    ({'prompt': 'p', 'lora_scale': 1}, 'lora_scale needs lora_weights'),
    ({'prompt': 'p', 'lora_weights': 'a', 'lora_scale': 5}, 'lora_scale must be between -4 and 4, got 5'),
    ({'prompt': 'p', 'sead': 1, 'colour': 2},
     "input has unknown field(s) 'sead' (did you mean 'seed'?), 'colour'; see the README's parameter table"),
    ({'prompt': 'p', 'num_inference_step': 20},
     "input has unknown field(s) 'num_inference_step' (did you mean 'num_inference_steps'?); see the README's "
     'parameter table'),
    ({'prompt': 'p', 5: 1}, "input has unknown field(s) '5'; see the README's parameter table"),
    ({'prompt': 'p', 'x\ud800': 1}, "input has unknown field(s) 'x\\ud800'; see the README's parameter table"),
    ({'prompt': 'p', 'a': 1, 'b': 2, 'c': 3, 'd': 4, 'e': 5, 'f': 6, 'g': 7},
     "input has unknown field(s) 'a', 'b', 'c', 'd', 'e' and 2 more; see the README's parameter table"),
    ({'prompt': 'p', 'unknown': None}, "input has unknown field(s) 'unknown'; see the README's parameter table"),
    ({'prompt': 'p\ud800'}, 'prompt must be valid Unicode text (it contains an unpaired surrogate such as \\ud800)'),
    ({'prompt': ''}, 'prompt must not be empty'),
    ({'prompt': '   '}, 'prompt must not be empty'),
    ({}, 'prompt is required'),
    ({'prompt': None}, 'prompt is required'),
    ({'prompt': 5}, 'prompt must be a string, got an integer'),
    ({"prompt": "x" * 10001}, 'prompt must be at most 10000 characters, got 10001'),
    ({'prompt': 'p', 'negative_prompt': 3}, 'negative_prompt must be a string, got an integer'),
    ({'prompt': 'p', 'seed': '12'}, "seed must be an integer, got a string '12'"),
    ({'prompt': 'p', 'seed': 1.0}, 'seed must be an integer, got a number 1.0'),
    ({'prompt': 'p', 'seed': True}, 'seed must be an integer, got a boolean True'),
    ({'prompt': 'p', 'seed': -2}, 'seed must be -1 (random) or an integer from 0 to 4294967295, got -2'),
    ({'prompt': 'p', 'seed': 4294967296},
     'seed must be -1 (random) or an integer from 0 to 4294967295, got 4294967296'),
    ({'prompt': 'p', 'seed': 10000000000000000000000000000000000000000},
     'seed must be -1 (random) or an integer from 0 to 4294967295, got an integer of 133 bits'),
    ({'prompt': 'p', 'num_inference_steps': 0}, 'num_inference_steps must be between 1 and 100, got 0'),
    ({'prompt': 'p', 'num_inference_steps': 101}, 'num_inference_steps must be between 1 and 100, got 101'),
    ({'prompt': 'p', 'num_inference_steps': 2.0}, 'num_inference_steps must be an integer, got a number 2.0'),
    ({'prompt': 'p', 'true_cfg_scale': 0.5}, 'true_cfg_scale must be between 1 and 20, got 0.5'),
    ({"prompt": "p", "true_cfg_scale": 10**400},
     'true_cfg_scale must be between 1 and 20, got an integer of 1329 bits'),
    ({'prompt': 'p', 'true_cfg_scale': math.nan}, 'true_cfg_scale must be between 1 and 20, got nan'),
    ({'prompt': 'p', 'true_cfg_scale': math.inf}, 'true_cfg_scale must be between 1 and 20, got inf'),
    ({'prompt': 'p', 'guidance': True}, 'guidance must be a number, got a boolean True'),
    ({'prompt': 'p', 'guidance': 4, 'guidance_scale': 5},
     'guidance_scale contradicts guidance (4.0 vs 5.0): give one of them'),
    ({'prompt': 'p', 'n': 2, 'num_images': 3}, 'n contradicts num_images (3 vs 2): give one of them'),
    ({'prompt': 'p', 'n': 5}, 'n must be between 1 and 4, got 5'),
    ({'prompt': 'p', 'n': 0}, 'n must be between 1 and 4, got 0'),
    ({'prompt': 'p', 'enhance_prompt': 1}, 'enhance_prompt must be a boolean (true or false), got an integer 1'),
    ({'prompt': 'p', 'prompt_extend': True, 'enhance_prompt': False},
     'prompt_extend contradicts enhance_prompt (False vs True): give one of them'),
    ({'prompt': 'p', 'sync_mode': 'true'}, "sync_mode must be a boolean (true or false), got a string 'true'"),
    ({'prompt': 'p', 'watermark': True}, 'watermark true is not supported: this worker never watermarks images'),
    ({'prompt': 'p', 'dry_run': 0}, 'dry_run must be a boolean (true or false), got an integer 0'),
    ({'prompt': 'p', 'size': '1024x1024'}, 'size format must be width*height (e.g. "1024*1024"), got \'1024x1024\''),
    ({'prompt': 'p', 'size': 1024}, 'size format must be width*height (a string such as "1024*1024"), got an integer'),
    ({'prompt': 'p', 'size': '100*100'}, 'size width must be between 256 and 2048 pixels, got 100'),
    ({'prompt': 'p', 'size': '1024*1024', 'width': 512},
     'width cannot be combined with size: give the size in one form only'),
    ({'prompt': 'p', 'width': 512}, 'height is required when the other side is given'),
    ({'prompt': 'p', 'width': '512', 'height': 512}, "width must be an integer, got a string '512'"),
    ({'prompt': 'p', 'width': 500, 'height': 512}, 'width/height width must be a multiple of 16, got 500'),
    ({'prompt': 'p', 'aspect_ratio': '5:7'},
     "aspect_ratio must be one of 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3, got '5:7'"),
    ({'prompt': 'p', 'aspect_ratio': 1}, 'aspect_ratio must be one of 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3, got 1'),
    ({'prompt': 'p', 'image_size': 'huge'},
     'image_size must be one of square_hd, square, portrait_4_3, portrait_16_9, landscape_4_3, landscape_16_9, '
     'optimize_for_quality, optimize_for_speed, or {"width", "height"}; got \'huge\''),
    ({'prompt': 'p', 'image_size': {'width': 1024}},
     'image_size as an object must be exactly {"width": int, "height": int}'),
    ({'prompt': 'p', 'image_size': {'width': '1', 'height': 2}},
     "image_size.width must be an integer, got a string '1'"),
    ({'prompt': 'p', 'image_size': {'width': 100, 'height': 100}},
     'image_size width must be between 256 and 2048 pixels, got 100'),
    ({'prompt': 'p', 'image_size': 5},
     'image_size must be one of square_hd, square, portrait_4_3, portrait_16_9, landscape_4_3, landscape_16_9, '
     'optimize_for_quality, optimize_for_speed, or {"width", "height"}; got 5'),
    ({'prompt': 'p', 'output_format': 'gif'},
     'output_format must be one of "png", "jpeg" (or "jpg"), "webp", got \'gif\''),
    ({'prompt': 'p', 'output_format': 1},
     'output_format must be one of "png", "jpeg" (or "jpg"), "webp", got an integer'),
    ({'prompt': 'p', 'output_quality': 0}, 'output_quality must be between 1 and 100, got 0'),
    ({'prompt': 'p', 'output_quality': 50}, 'output_quality applies to jpeg and webp only (png is lossless)'),
    ({'prompt': 'p', 'background': 'transparent'},
     "background transparent needs a model that draws alpha (Qwen-Image-2.1); this endpoint's model does not"),
    ({'prompt': 'p', 'background': 2}, 'background must be one of "auto", "opaque", "transparent", got an integer'),
    ({'prompt': 'p', 'background': 'x'}, 'background must be one of "auto", "opaque", "transparent", got \'x\''),
    ({'prompt': 'p', 'acceleration': 'ultra'}, 'acceleration must be one of "none", "regular", "high", got \'ultra\''),
    ({'prompt': 'p', 'acceleration': None, 'go_fast': 'yes'},
     "go_fast must be a boolean (true or false), got a string 'yes'"),
    ({'prompt': 'p', 'acceleration': 'none', 'go_fast': True},
     "go_fast contradicts acceleration 'none': give one of them"),
    ({'prompt': 'p', 'enable_safety_checker': True, 'disable_safety_checker': True},
     'disable_safety_checker contradicts enable_safety_checker (true): give one of them'),
    ({'prompt': 'p', 'enable_safety_checker': 'no'},
     "enable_safety_checker must be a boolean (true or false), got a string 'no'"),
    ({'prompt': 'p', 'image': ''}, 'image must not be empty'),
    ({'prompt': 'p', 'image': 5}, 'image must be a string, got an integer'),
    ({'prompt': 'p', 'image': U, 'images': [U]},
     "images cannot be combined with image: send one image as 'image' or several as 'images'"),
    ({'prompt': 'p', 'images': []}, 'images must be an array of 1 to 3 image URLs, data URIs or base64 strings'),
    ({'prompt': 'p', 'images': U}, 'images must be an array of 1 to 3 image URLs, data URIs or base64 strings'),
    ({'prompt': 'p', 'images': [U, 3]}, 'images[1] must be a non-empty string, got an integer'),
    ({'prompt': 'p', 'images': [U] * 4}, 'images must be an array of 1 to 3 image URLs, data URIs or base64 strings'),
    ({"prompt": "p", "images": [U] * 11}, 'images must be an array of 1 to 3 image URLs, data URIs or base64 strings'),
    ({'prompt': 'p', 'images': [U, ' ']}, 'images[1] must be a non-empty string, got a string'),
    ({'prompt': 'p', 'images': [U, 'a\ud800']},
     'images[1] must be valid Unicode text (it contains an unpaired surrogate such as \\ud800)'),
    ({'prompt': 'p', 'images': [U, None]}, 'images[1] must be a non-empty string, got null'),
    ({'prompt': 'p', 'strength': 0.5}, "strength needs the input image ('image') for image-to-image"),
    ({'prompt': 'p', 'image': U, 'strength': 0},
     'strength must be greater than 0 (0 would leave the input unchanged), got 0'),
    ({'prompt': 'p', 'image': U, 'strength': -1}, 'strength must be between 0 and 1, got -1'),
    ({'prompt': 'p', 'image': U, 'strength': 1.5}, 'strength must be between 0 and 1, got 1.5'),
    ({'prompt': 'p', 'image': U, 'strength': '0.5'}, "strength must be a number, got a string '0.5'"),
    ({'prompt': 'p', 'image': U, 'mask': U, 'mask_image': U + 'x'},
     "mask contradicts mask_image ('https://example.invalid/a.pngx' vs 'https://example.invalid/a.png'): give "
     'one of them'),
    ({'prompt': 'p', 'image': U, 'mask_url': ''}, 'mask_url must not be empty'),
    ({'prompt': 'p', 'image': U, 'expand': {}},
     'expand must be an object {"left", "right", "top", "bottom"} of pixels, each 0 to 1024'),
    ({'prompt': 'p', 'image': U, 'expand': {'left': 0}}, 'expand must add at least one pixel on one side'),
    ({'prompt': 'p', 'image': U, 'expand': {'left': 2000}}, 'expand.left must be between 0 and 1024, got 2000'),
    ({'prompt': 'p', 'image': U, 'expand': {'up': 5}},
     'expand must be an object {"left", "right", "top", "bottom"} of pixels, each 0 to 1024'),
    ({'prompt': 'p', 'image': U, 'expand': [5]},
     'expand must be an object {"left", "right", "top", "bottom"} of pixels, each 0 to 1024'),
    ({'prompt': 'p', 'image': U, 'expand': {'left': None}}, 'expand must add at least one pixel on one side'),
    ({'prompt': 'p', 'image': U, 'expand': {'left': 1.0}}, 'expand.left must be an integer, got a number 1.0'),
    ({'image': U, 'layers': 1}, 'layers must be between 2 and 10, got 1'),
    ({'image': U, 'layers': 4, 'resolution': 512}, 'resolution must be 640 or 1024, got 512'),
    ({'image': U, 'layers': 4, 'resolution': '640'}, "resolution must be an integer, got a string '640'"),
    ({'image': U, 'layers': 4, 'num_images': 2},
     'num_images must be 1 with layers: a job decomposes its image once (the layers count sets how many images '
     'return)'),
    ({'image': U, 'layers': 4, 'output_format': 'jpeg'},
     'output_format jpeg has no alpha channel, which layers need: use png or webp'),
    ({'prompt': 'p', 'control_image': U, 'controlnet_conditioning_scale': 3},
     'controlnet_conditioning_scale must be between 0 and 2, got 3'),
    ({'prompt': 'p', 'control_image': U, 'image': U},
     'image cannot be combined with control_image: controlnet draws from text and takes no input image'),
    ({'prompt': 'p', 'image': U, 'strength': 0.5, 'control_image': U},
     'control_image cannot be combined with strength: controlnet and image-to-image are separate jobs; send one '
     'of them'),
    ({'prompt': 'p', 'resolution': 640}, 'resolution applies only to layer decomposition (requests with layers)'),
    ({'prompt': 'p', 'image': U, 'match_input_size': True, 'size': '1024*1024'},
     'match_input_size cannot be combined with an explicit size'),
    ([], 'input must be a JSON object, got an array'),
    ('x', 'input must be a JSON object, got a string'),
    (None, 'input must be a JSON object, got null'),
]


@pytest.mark.parametrize("raw, message", CASES, ids=[str(index) for index in range(len(CASES))])
def test_the_message_for_each_fault(raw, message):
    with pytest.raises(ValidationError) as caught:
        parse_request(raw)
    assert str(caught.value) == "Invalid parameter: " + message
    assert message.startswith(caught.value.field + " ")


def test_null_means_absent_in_the_request_and_in_its_objects():
    request = parse_request({
        "prompt": "p", "seed": None, "negative_prompt": None, "loras": [{"path": "a.safetensors", "scale": None}],
    })
    assert request.seed >= 0 and request.negative_prompt == "" and request.loras[0].scale == 1.0
