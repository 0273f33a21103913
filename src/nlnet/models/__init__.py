"""§4: video classifiers (C2D / I3D ResNets with non-local blocks), their registry and weights."""

from nlnet.models import demo  # noqa: F401  (registers demo_c2d, demo_c2d_nl, demo_i3d)
from nlnet.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
