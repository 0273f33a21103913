"""§4: video classifiers (C2D / I3D ResNets with non-local blocks), their registry and weights."""

from nlnet.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
