"""Image-to-image, inpainting and outpainting without running a model: the mode rule and its contradictions, the
routes to the pipelines that serve each mode, the paste-back, and that the from_pipe pipelines share their modules
with the loaded ones (tiny pipelines, in this process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_worker.errors import TaskNotServedError, ValidationError
from qwen_worker.inpainting import MAX_SEAM, PasteBack, inpainting_canvas, outpainting_canvas, seam_width
from qwen_worker.loading import LightningFiles, LoadedPipeline
from qwen_worker.models import ResolvedModel
from qwen_worker.runner import PipelineRunner
from qwen_worker.schema import Expand, Mode, OutputFormat, Task, denoising_steps, parse_request

URL = "https://example.invalid/photo.png"  # never fetched: parsing does no I/O
MASK = "https://example.invalid/mask.png"


def parse(**fields):
    return parse_request({"prompt": "p", **fields})


def error_of(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        parse(**fields)
    return str(caught.value)


# ------------------------------------------------------------------------------------------------- the mode rule


@pytest.mark.parametrize(
    "fields, mode",
    [
        ({}, Mode.TEXT_TO_IMAGE),
        ({"image": URL}, Mode.EDIT),
        ({"image": URL, "strength": 0.5}, Mode.IMAGE_TO_IMAGE),
        ({"image": URL, "mask_image": MASK}, Mode.INPAINTING),
        ({"image": URL, "mask": MASK, "strength": 0.7}, Mode.INPAINTING),  # mask_image comes before strength
        ({"image": URL, "mask_url": MASK}, Mode.INPAINTING),
        ({"image": URL, "expand": {"left": 64}}, Mode.OUTPAINTING),
        ({"image": URL, "expand": {"top": 32}, "strength": 0.9}, Mode.OUTPAINTING),  # expand before strength
        ({"images": [URL], "strength": 0.5}, Mode.IMAGE_TO_IMAGE),  # one image in 'images' is one image
    ],
)
def test_the_mode_rule_picks_one_mode_from_the_fields(fields, mode):
    assert parse(**fields).mode is mode


def test_defaults_per_mode():
    img2img = parse(image=URL, strength=0.5)
    assert (img2img.output_format, img2img.strength, img2img.width) == (OutputFormat.PNG, 0.5, None)
    inpaint = parse(image=URL, mask_image=MASK)
    assert (inpaint.output_format, inpaint.strength, inpaint.preserve_unmasked) == (OutputFormat.PNG, 1.0, True)
    assert inpaint.mask_url == MASK
    outpaint = parse(image=URL, expand={"left": 8, "bottom": 1024}, preserve_unmasked=False)
    assert outpaint.expand == Expand(left=8, bottom=1024) and outpaint.preserve_unmasked is False
    assert outpaint.output_format is OutputFormat.PNG and outpaint.strength == 1.0
    assert parse(image=URL, strength=0.5, size="512*768").width == 512  # image-to-image takes any size form


@pytest.mark.parametrize(
    "fields, expected",
    [
        # The mode's input image is missing.
        ({"strength": 0.5}, "Invalid parameter: strength needs the input image ('image') for image-to-image"),
        ({"mask": MASK}, "Invalid parameter: mask needs the input image ('image') for inpainting"),
        ({"expand": {"left": 8}}, "Invalid parameter: expand needs the input image ('image') for outpainting"),
        # One input image only.
        ({"images": [URL, URL], "strength": 0.5}, "Invalid parameter: images with several images is for Edit-Plus"),
        ({"images": [URL, URL], "mask_image": MASK}, "inpainting takes one input image"),
        # Two modes' fields.
        ({"image": URL, "mask_image": MASK, "expand": {"left": 8}}, "expand cannot be combined with mask_image"),
        ({"preserve_unmasked": True}, "Invalid parameter: preserve_unmasked applies only to inpainting"),
        ({"image": URL, "strength": 0.5, "preserve_unmasked": False}, "preserve_unmasked applies only to inpainting"),
        # Inpainting and outpainting decide their size.
        (
            {"image": URL, "mask_image": MASK, "size": "512*512"},
            "Invalid parameter: size cannot be combined with mask_image: inpainting returns the input image's own "
            "dimensions",
        ),
        ({"image": URL, "mask_url": MASK, "width": 512, "height": 512}, "width cannot be combined with mask_url"),
        (
            {"image": URL, "expand": {"left": 8}, "aspect_ratio": "1:1"},
            "Invalid parameter: aspect_ratio cannot be combined with expand: outpainting returns the input grown by "
            "expand",
        ),
        ({"image": URL, "expand": {"left": 8}, "image_size": "square"}, "image_size cannot be combined with expand"),
        # Aliases must agree.
        ({"image": URL, "mask_image": MASK, "mask": URL}, "Invalid parameter: mask contradicts mask_image"),
        # strength's range, and a strength that leaves no step.
        ({"image": URL, "strength": 0}, "Invalid parameter: strength must be greater than 0"),
        ({"image": URL, "strength": 1.5}, "Invalid parameter: strength must be between 0 and 1, got 1.5"),
        ({"image": URL, "strength": "0.5"}, "Invalid parameter: strength must be a number"),
        (
            {"image": URL, "strength": 5e-324},
            "Invalid parameter: strength 4.94066e-324 leaves no denoising step at 50 steps: use a strength of at "
            "least 0.02",
        ),
        # expand's shape and range.
        ({"image": URL, "expand": 64}, "Invalid parameter: expand must be an object"),
        ({"image": URL, "expand": {}}, "Invalid parameter: expand must be an object"),
        ({"image": URL, "expand": {"middle": 5}}, "Invalid parameter: expand must be an object"),
        ({"image": URL, "expand": {"left": 1025}}, "expand.left must be between 0 and 1024, got 1025"),
        ({"image": URL, "expand": {"top": -1}}, "Invalid parameter: expand.top must be between 0 and 1024"),
        ({"image": URL, "expand": {"right": 8.0}}, "Invalid parameter: expand.right must be an integer"),
        ({"image": URL, "expand": {"left": 0, "top": 0}}, "Invalid parameter: expand must add at least one pixel"),
        ({"image": URL, "mask_image": ""}, "Invalid parameter: mask_image must not be empty"),
    ],
)
def test_contradictions_fail_naming_the_field_and_the_rule(fields, expected):
    assert expected in error_of(**fields)


def test_strength_reports_the_steps_it_runs():
    request = parse_request({"prompt": "p", "image": URL, "strength": 0.3, "num_inference_steps": 10})
    assert (request.num_inference_steps, request.denoising_steps) == (10, 3)
    assert request.notes == ("strength 0.3 runs the last 3 of 10 steps",)
    assert parse(image=URL, mask_image=MASK).notes == ()  # strength 1 runs them all
    # Fast mode fixes the steps first; the strength then takes its share of those.
    assert parse(image=URL, strength=0.5, go_fast=True).denoising_steps == 4


def test_denoising_steps_mirror_the_pipelines_and_a_tiny_strength_still_runs_one():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageImg2ImgPipeline

    pipe = QwenImageImg2ImgPipeline.__new__(QwenImageImg2ImgPipeline)  # get_timesteps reads only the scheduler
    object.__setattr__(pipe, "scheduler", FlowMatchEulerDiscreteScheduler())
    for steps in range(1, 101):
        pipe.scheduler.set_timesteps(steps)
        for strength in (1e-9, 0.05, 1 / steps, 0.3, 0.5, 0.999, 1.0):
            _timesteps, expected = pipe.get_timesteps(steps, strength, "cpu")
            assert denoising_steps(steps, strength) == expected >= 1, (steps, strength)


# ------------------------------------------------------------------------------------------------------ the routes


def _loaded(pipeline_class: str, task: Task, multi: bool = False) -> LoadedPipeline:
    model = ResolvedModel(f"stub/{pipeline_class}", Path("/nonexistent"), None, "stub", pipeline_class)
    return LoadedPipeline(model, object(), task, multi, LightningFiles())


T2I = _loaded("QwenImagePipeline", Task.TEXT_TO_IMAGE)
EDIT = _loaded("QwenImageEditPipeline", Task.EDIT)
EDIT_PLUS = _loaded("QwenImageEditPlusPipeline", Task.EDIT, multi=True)


@pytest.mark.parametrize(
    "loaded, mode, source",
    [
        ([T2I, EDIT], Mode.INPAINTING, "QwenImageEditPipeline"),  # a plain Edit model: the prompt is an instruction
        ([T2I, EDIT_PLUS], Mode.INPAINTING, "QwenImagePipeline"),  # Edit-Plus: the text-to-image inpaint pipeline
        ([T2I], Mode.OUTPAINTING, "QwenImagePipeline"),
        ([EDIT], Mode.OUTPAINTING, "QwenImageEditPipeline"),
        ([T2I, EDIT_PLUS], Mode.IMAGE_TO_IMAGE, "QwenImagePipeline"),
    ],
)
def test_each_mode_runs_on_the_documented_model(loaded, mode, source):
    route, on = PipelineRunner(loaded, torch.device("cpu")).route_for(mode)
    assert on.model.pipeline_class == route.source == source


@pytest.mark.parametrize(
    "loaded, fields, expected",
    [
        ([EDIT_PLUS], {"strength": 0.5}, "does not serve image-to-image (strength)"),
        ([EDIT_PLUS], {"mask_image": MASK}, "does not serve inpainting (mask_image): it needs the text-to-image model"),
        ([EDIT_PLUS], {"expand": {"left": 8}}, "does not serve outpainting (expand)"),
        ([T2I], {}, "does not serve image editing"),
    ],
)
def test_a_mode_whose_model_is_not_configured_fails_naming_what_would_serve_it(loaded, fields, expected):
    runner = PipelineRunner(loaded, torch.device("cpu"))
    with pytest.raises(TaskNotServedError, match=r"QWEN_IMAGE_(EDIT_)?MODEL") as caught:
        runner.check_request(parse(image=URL, **fields))
    assert expected in str(caught.value)


def test_from_pipe_pipelines_share_the_loaded_modules_and_are_built_at_start_up(tiny_models):
    from qwen_worker.loading import ComponentPool, load_pipeline
    from qwen_worker.models import resolve_model

    device, pool = torch.device("cpu"), ComponentPool()
    models = [
        resolve_model(str(tiny_models[name]), volume_path=Path("/none"), baked_cache=None)
        for name in ("qwen-image", "qwen-image-edit")
    ]
    loaded = [load_pipeline(model, device, pool=pool) for model in models]
    runner = PipelineRunner(loaded, device)
    prepared = {served.mode: served for served in runner.prepare_modes()}
    assert {mode: served.pipeline_class for mode, served in prepared.items()} == {
        Mode.TEXT_TO_IMAGE: "QwenImagePipeline",
        Mode.EDIT: "QwenImageEditPipeline",
        Mode.IMAGE_TO_IMAGE: "QwenImageImg2ImgPipeline",
        Mode.INPAINTING: "QwenImageEditInpaintPipeline",
        Mode.OUTPAINTING: "QwenImageEditInpaintPipeline",
    }
    for mode in (Mode.IMAGE_TO_IMAGE, Mode.INPAINTING):
        served = prepared[mode]
        assert type(served.pipeline).__name__ == served.pipeline_class
        source = served.loaded.pipeline
        assert served.pipeline is not source
        components = served.pipeline.components
        assert components and all(module is source.components[name] for name, module in components.items())
        # The edit pipelines' processor (processor.py, no torchvision) is the loaded one, not a fresh stock one.
        assert mode is not Mode.INPAINTING or components["processor"] is source.processor
        # from_pipe casts to its dtype argument: the loaded weights must keep theirs.
        assert served.pipeline.transformer.dtype == source.transformer.dtype
    # Built once: outpainting runs the very pipeline object inpainting runs.
    assert runner.served(Mode.OUTPAINTING).pipeline is prepared[Mode.INPAINTING].pipeline


# ----------------------------------------------------------------------------------------------------- paste-back


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_paste_back_keeps_every_pixel_outside_the_mask_and_feathers_inside_it():
    original, generated = _noise((320, 256), 1), _noise((320, 256), 2)
    mask = Image.new("L", (160, 128), 0)  # half the image's size: stretched over it
    mask.paste(255, (40, 30, 100, 90))
    canvas = inpainting_canvas(original, mask)
    paste = PasteBack(canvas)
    out = np.asarray(paste(generated), np.int16)
    repaint = np.asarray(canvas.mask) >= 128
    assert repaint.sum() == 120 * 120
    assert (out[~repaint] == np.asarray(original, np.int16)[~repaint]).all()
    assert paste.seam == seam_width((320, 256)) == 8 <= MAX_SEAM
    # Deeper than the seam inside the mask: the generated pixels themselves.
    deep = np.zeros_like(repaint)
    deep[60 + paste.seam : 180 - paste.seam, 80 + paste.seam : 200 - paste.seam] = True
    assert (out[deep] == np.asarray(generated, np.int16)[deep]).all()


def test_a_thin_mask_gets_a_narrower_seam_so_it_is_really_repainted():
    mask = Image.new("L", (1024, 1024), 0)
    mask.paste(255, (500, 0, 506, 1024))  # 6 px wide
    paste = PasteBack(inpainting_canvas(_noise((1024, 1024), 3), mask))
    assert paste.seam < 6 and paste.weights.max() == 1.0


def test_outpainting_canvas_holds_the_input_and_masks_only_the_border():
    image = _noise((100, 60), 4)
    canvas = outpainting_canvas(image, Expand(left=10, right=20, top=0, bottom=5))
    assert canvas.image.size == canvas.mask.size == (130, 65)
    assert canvas.image.crop((10, 0, 110, 60)).tobytes() == image.tobytes()
    mask = np.asarray(canvas.mask)
    assert (mask[0:60, 10:110] == 0).all() and (mask[:, :10] == 255).all() and (mask[60:, :] == 255).all()
    out = PasteBack(canvas)(_noise((130, 65), 5))
    assert out.crop((10, 0, 110, 60)).tobytes() == image.tobytes()


def test_blending_only_the_masks_box_gives_what_the_whole_image_would():
    from qwen_worker.inpainting import _feathered

    original, generated = _noise((300, 200), 6), _noise((300, 200), 7)
    mask = Image.new("L", (300, 200), 0)
    mask.paste(255, (0, 50, 90, 120))  # touching the image's left edge
    mask.paste(255, (200, 150, 240, 200))  # and its bottom
    canvas = inpainting_canvas(original, mask)
    paste = PasteBack(canvas)
    assert paste.box != (0, 0, 300, 200)
    weights = _feathered(np.asarray(canvas.mask) >= 128, paste.seam)[..., None]
    before, after = np.asarray(original, np.float32), np.asarray(generated, np.float32)
    whole = before + weights * (after - before)
    assert (np.asarray(paste(generated)) == np.clip(np.rint(whole), 0, 255).astype(np.uint8)).all()
    nothing = PasteBack(inpainting_canvas(original, Image.new("L", (300, 200), 0)))
    assert nothing(generated).tobytes() == original.tobytes()


def test_every_mode_has_a_route_and_its_call_arguments():
    """The one table a new mode is added to: a mode missing from it would fail its jobs with a KeyError."""
    from qwen_worker import modes

    assert set(modes.MODES) == set(Mode)
    assert all(row.routes and callable(row.arguments) and callable(row.unpack) for row in modes.MODES.values())
