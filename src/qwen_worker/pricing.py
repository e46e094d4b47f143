"""What a job costs: a price per output megapixel, as Runpod's own endpoints charge.

1024*1024 at $0.02/MP = 0.02097152.
"""

from __future__ import annotations

from collections.abc import Iterable

# Eight decimals keep Runpod's example figure exact; finer would only show float noise.
COST_DECIMALS = 8


def megapixels(width: int, height: int) -> float:
    return width * height / 1_000_000


def cost_of(sizes: Iterable[tuple[int, int]], price_per_megapixel: float) -> float:
    """Cost in USD of delivering images of these (width, height) sizes."""
    total_megapixels = sum(megapixels(width, height) for width, height in sizes)
    return round(total_megapixels * price_per_megapixel, COST_DECIMALS)
