"""What the method and metric contract tests share: a small GAP CNN whose flags a careless
call would change, and a snapshot of everything a call must leave on a model as it came
(hooks, global hooks, ``training`` and ``requires_grad`` flags, parameters and buffers,
``.grad``, the global RNG state)."""

from __future__ import annotations

import torch
import torch.nn.modules.module as module_globals
from torch import nn

MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
GLOBAL_HOOKS = tuple(
    name
    for name in dir(module_globals)
    if name.startswith("_global_")
    and name.endswith("hooks")
    and isinstance(getattr(module_globals, name), dict)
)


class SmallGapCNN(nn.Module):
    """conv-BN-ReLU, max-pool, conv-BN-ReLU -> GAP -> Dropout -> Linear.

    The contract tests freeze the first conv and leave the dropout (p = 0, so the output is
    deterministic) in training mode in an otherwise eval model. A call runs the whole model
    in eval mode; afterwards both flags must be as they came, so a call that leaves either
    changed is caught.
    """

    def __init__(self, in_channels: int, n_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(p=0.0)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


def snapshot(model: nn.Module) -> dict:
    return {
        "hooks": {
            (mod_name, attr): len(getattr(mod, attr))
            for mod_name, mod in model.named_modules()
            for attr in MODULE_HOOKS
            if hasattr(mod, attr)
        },
        "global_hooks": {name: len(getattr(module_globals, name)) for name in GLOBAL_HOOKS},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "rng": torch.random.get_rng_state(),
    }


def changes(model: nn.Module, before: dict) -> list[str]:
    """What a call changed on the model (and the global RNG), in words; empty if nothing."""
    after = snapshot(model)
    found = []
    leftover = {k: v for k, v in after["hooks"].items() if v != before["hooks"][k]}
    if leftover:
        found.append(f"hooks left on modules: {leftover}")
    if after["global_hooks"] != before["global_hooks"]:
        found.append("global module hooks left")
    if after["training"] != before["training"]:
        found.append("training flags changed")
    if after["requires_grad"] != before["requires_grad"]:
        found.append("requires_grad flags changed")
    changed = [k for k, v in after["state"].items() if not torch.equal(v, before["state"][k])]
    if changed:
        found.append(f"parameters or buffers changed: {changed}")
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    if grads:
        found.append(f".grad accumulated on {grads}")
    if not torch.equal(after["rng"], before["rng"]):
        found.append("the global RNG state changed")
    return found
