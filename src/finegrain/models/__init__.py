"""Models: one file per paper, built on timm backbones, one registry."""

from .registry import create_model, list_models, load_model, register_model

__all__ = ["create_model", "list_models", "load_model", "register_model"]
