"""A Runpod serverless worker for Qwen-Image text-to-image and Qwen-Image-Edit."""

__version__ = "0.1.0"
