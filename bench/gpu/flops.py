"""The analytic FLOP model of one transformer forward, per model (bench/gpu_bench.py's docstring has the
formulas)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpu.models import BenchModel, ModeSpec


def transformer_forward_flops(
    config: dict[str, Any], image_tokens: int, text_tokens: int, lora_rank: int = 0, cached: bool = False
) -> dict[str, float]:
    """Analytic FLOPs of one QwenImageTransformer2DModel forward for one sample (see bench/gpu_bench.py's docstring).

    A multiply-add counts 2. ``config`` is the transformer's config (published or tiny). ``cached`` is ignored:
    Qwen-Image keeps no cache between steps (it is there for the model table's common signature)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    ff = 4 * d  # diffusers FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate"): mult 4
    joint = config["joint_attention_dim"]
    c_in = config["in_channels"]
    c_out = config["patch_size"] ** 2 * (config.get("out_channels") or c_in)
    s = image_tokens + text_tokens
    per_token_block = 4 * d * d + 2 * d * ff  # q, k, v, out + MLP in/out, one stream's weights
    blocks = 2.0 * s * per_token_block * layers
    attention = 4.0 * s * s * d * layers
    modulation = 2.0 * 2 * (d * 6 * d) * layers
    timestep = 2.0 * (256 * d + d * d)  # sinusoidal 256 -> D -> D
    embeddings = 2.0 * image_tokens * c_in * d + 2.0 * text_tokens * joint * d + 2.0 * image_tokens * d * c_out
    norm_out = 2.0 * d * 2 * d
    lora = 2.0 * s * lora_rank * (10 * d + 2 * ff) * layers if lora_rank else 0.0
    return _breakdown(blocks, attention, modulation, embeddings + timestep + norm_out, lora)


def _breakdown(blocks: float, attention: float, modulation: float, embeddings: float, lora: float) -> dict[str, float]:
    """One forward's FLOPs by part (both models' formulas report these keys), and their total."""
    return {
        "total": blocks + attention + modulation + embeddings + lora,
        "blocks_linear": blocks,
        "attention": attention,
        "modulation": modulation,
        "embeddings": embeddings,  # patch/text/output projections, the timestep MLP and the output norm
        "lora": lora,
    }


def active_params_per_token(config: dict[str, Any]) -> float:
    """Block weights each token goes through (one stream's q, k, v, out and MLP): 12*D^2*L."""
    return 12 * (config["num_attention_heads"] * config["attention_head_dim"]) ** 2 * config["num_layers"]


def analytic_transformer_params(config: dict[str, Any]) -> float:
    """The weight count the FLOP formula assumes (no biases or norms): a cross-check against the real module."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    ff = 4 * d
    c_out = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    per_block = 2 * (4 * d * d + 2 * d * ff) + 2 * (d * 6 * d)
    return (
        per_block * config["num_layers"]
        + config["in_channels"] * d
        + config["joint_attention_dim"] * d
        + d * c_out
        + 256 * d
        + d * d
        + d * 2 * d
    )


def qwen21_forward_flops(
    config: dict[str, Any], image_tokens: int, text_tokens: int, lora_rank: int = 0, cached: bool = False
) -> dict[str, float]:
    """Analytic FLOPs of one QwenImage21Transformer2DModel forward for one sample, text-to-image (diffusers 0.42.1).

    The 2.1 transformer is single-stream: text and image tokens share every block's weights. Per block: q, k, v, out
    (D x D each, no biases) and a SwiGLU MLP (proj and gate D -> F, out F -> D; F = mlp_ratio*D = 3D), so a token
    goes through 13*D^2 weights per block. The VAE compresses 16x and patch_size is 1: N = (H/16)*(W/16) image
    tokens. Attention is block-causal: text tokens attend causally (T(T+1)/2 pairs), the image block to the whole
    text and to itself (N*(T+N)). With causal_condition the text is modulated from t = 0, so the pipeline
    (use_kv_cache=True, its default) prefills text+image in the first step (``cached`` False: S = T+N tokens through
    the blocks) and later steps (``cached`` True) run only the N image tokens, attending to the cached text K/V.
    Per sample and forward: txt_in (norm, C -> D -> D) on the T text embeddings, img_in (64 -> D), one shared
    modulation (D -> 4D) and norm_out (D -> D) on two rows (the timestep's and t = 0's), proj_out (D -> 64) on every
    token that went through the blocks. Norms, RoPE, SiLU/GELU, gates, residuals left out (< 1 %)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    ff = config["mlp_ratio"] * d
    context = config["context_in_dim"]
    patch = config["patch_size"]
    c_in = config["in_channels"] * patch * patch
    c_out = patch * patch * (config.get("out_channels") or config["in_channels"])
    n, t = image_tokens, text_tokens
    through_blocks = n if cached else n + t
    pairs = n * (t + n) + (0 if cached else t * (t + 1) // 2)
    blocks = 2.0 * through_blocks * (4 * d * d + 3 * d * ff) * layers
    attention = 4.0 * pairs * d * layers  # Q.K^T and P.V, all heads
    rows = 2 if config.get("causal_condition", True) else 1  # the sample's timestep row and t = 0's
    modulation = 2.0 * rows * (d * 4 * d)  # one shared modulation for every block
    timestep = 2.0 * rows * (256 * d + d * d)
    embeddings = 2.0 * t * (context * d + d * d) + 2.0 * n * c_in * d + 2.0 * through_blocks * d * c_out
    norm_out = 2.0 * rows * d * d
    # rank-r A/B pairs on q, k, v, out (D+D each) and proj, gate, out (D+F each), for the tokens in the blocks
    lora = 2.0 * through_blocks * lora_rank * (8 * d + 3 * (d + ff)) * layers if lora_rank else 0.0
    return _breakdown(blocks, attention, modulation, embeddings + timestep + norm_out, lora)


def qwen21_active_params_per_token(config: dict[str, Any]) -> float:
    """Block weights each token goes through: (4 + 3*mlp_ratio)*D^2*L (13*D^2*L at mlp_ratio 3)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    return (4 + 3 * config["mlp_ratio"]) * d * d * config["num_layers"]


def qwen21_transformer_params(config: dict[str, Any]) -> float:
    """The weight count qwen21_forward_flops assumes (2.1 has no biases; norms left out)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    patch = config["patch_size"]
    c_in = config["in_channels"] * patch * patch
    c_out = patch * patch * (config.get("out_channels") or config["in_channels"])
    return (
        qwen21_active_params_per_token(config)
        + config["context_in_dim"] * d + d * d  # txt_in
        + c_in * d  # img_in
        + d * 4 * d  # modulation
        + 256 * d + d * d  # timestep MLP
        + d * d  # norm_out
        + d * c_out  # proj_out
    )


def run_flops(
    bench_model: BenchModel, config: dict[str, Any], spec: ModeSpec, image_tokens: int, cond_tokens: int,
    uncond_tokens: int, steps: int, lora_rank: int = 0,
) -> tuple[float, float]:
    """Analytic transformer FLOPs of (one steady step, ``steps`` steps) in ``spec``'s mode: the first step prefills
    any cache, later steps read it."""

    def step(cached: bool) -> float:
        total = bench_model.forward_flops(config, image_tokens, cond_tokens, lora_rank, cached)["total"]
        if spec.true_cfg_scale > 1:
            total += bench_model.forward_flops(config, image_tokens, uncond_tokens, lora_rank, cached)["total"]
        return total

    first, later = step(False), step(bench_model.kv_cache)
    return later, first + later * (steps - 1)
