"""RMSprop for JAX as an optax GradientTransformation, with every standard variant."""

from rmsprop_jax import interop, presets
from rmsprop_jax.alias import RMSpropState, rmsprop
from rmsprop_jax.transform import ScaleByRmsState, scale_by_rms

__version__ = "0.2.0"

__all__ = ["RMSpropState", "ScaleByRmsState", "__version__", "interop", "presets", "rmsprop", "scale_by_rms"]
