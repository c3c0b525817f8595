"""Parameter shapes of the benchmark workloads and the optimizer variants measured on them."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Workload(NamedTuple):
    """A named list of parameter shapes (float32)."""

    name: str
    shapes: dict[str, tuple[int, ...]]

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def n_leaves(self) -> int:
        return len(self.shapes)


def single_leaf(n: int) -> Workload:
    return Workload(f"1 leaf x {n:.0e}".replace("e+0", "e"), {"w": (n,)})


def gpt2_small_tree() -> Workload:
    """GPT-2 small without the token embedding: 12 blocks, final norm and position table (147 leaves, 85.9M)."""
    d, ff, ctx = 768, 3072, 1024
    shapes: dict[str, tuple[int, ...]] = {"wpe": (ctx, d), "ln_f.g": (d,), "ln_f.b": (d,)}
    for i in range(12):
        block = {
            "ln_1.g": (d,),
            "ln_1.b": (d,),
            "attn.c_attn.w": (d, 3 * d),
            "attn.c_attn.b": (3 * d,),
            "attn.c_proj.w": (d, d),
            "attn.c_proj.b": (d,),
            "ln_2.g": (d,),
            "ln_2.b": (d,),
            "mlp.c_fc.w": (d, ff),
            "mlp.c_fc.b": (ff,),
            "mlp.c_proj.w": (ff, d),
            "mlp.c_proj.b": (d,),
        }
        shapes.update({f"h{i:02d}.{k}": v for k, v in block.items()})
    return Workload("GPT-2-small tree", shapes)


def many_small(n_leaves: int = 2000, size: int = 256) -> Workload:
    return Workload(f"{n_leaves} leaves x {size}", {f"p{i:04d}": (size,) for i in range(n_leaves)})


def dqn() -> Workload:
    """The Nature DQN (Mnih et al., 2015) with 18 actions: 3 convolutions and 2 dense layers (10 leaves, 1.69M)."""
    return Workload(
        "DQN (Nature)",
        {
            "conv1.w": (8, 8, 4, 32),
            "conv1.b": (32,),
            "conv2.w": (4, 4, 32, 64),
            "conv2.b": (64,),
            "conv3.w": (3, 3, 64, 64),
            "conv3.b": (64,),
            "fc.w": (3136, 512),
            "fc.b": (512,),
            "out.w": (512, 18),
            "out.b": (18,),
        },
    )


def arrays(workload: Workload, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """float32 params and gradients for a workload (NumPy, so each framework copies them in)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in workload.shapes.items()}
    grads = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(1e-2) for k, s in workload.shapes.items()}
    return params, grads


class Variant(NamedTuple):
    """One RMSprop configuration, as keyword arguments of each library (None: the library lacks it)."""

    name: str
    ours: dict
    optax: dict
    torch: dict | None
    state_arrays: int  # parameter-sized state buffers (nu, mu, momentum)


LR, DECAY, EPS = 1e-3, 0.9, 1e-8
VARIANTS = {
    v.name: v
    for v in (
        Variant("plain", {}, {}, {}, 1),
        Variant("centered", {"centered": True}, {"centered": True}, {"centered": True}, 2),
        Variant("momentum", {"momentum": 0.9}, {"momentum": 0.9}, {"momentum": 0.9}, 2),
        Variant(
            "centered+momentum",
            {"centered": True, "momentum": 0.9},
            {"centered": True, "momentum": 0.9},
            {"centered": True, "momentum": 0.9},
            3,
        ),
        Variant("nesterov", {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}, None, 2),
        Variant("bias_correction", {"bias_correction": True}, {"bias_correction": True}, None, 1),
    )
}


def min_bytes_per_param(variant: Variant, itemsize: int = 4) -> int:
    """The unavoidable traffic: read g, x and the state; write x and the state."""
    return itemsize * (1 + 1 + variant.state_arrays + 1 + variant.state_arrays)
