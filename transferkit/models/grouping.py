"""Helpers shared by the adapters to turn tensor names into named layer groups."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from transferkit.models.backbone import LayerGroup


def common_module_prefix(tensor_names: Sequence[str]) -> str:
    """The longest module path shared by all names ('layer1' for 'layer1.0.conv1.weight', ...)."""
    paths = [name.split(".")[:-1] for name in tensor_names]
    if not paths:
        return ""
    prefix = paths[0]
    for path in paths[1:]:
        n = 0
        while n < min(len(prefix), len(path)) and prefix[n] == path[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix)


def output_module_for(model: nn.Module, tensor_names: Sequence[str], prefix: str = "") -> str:
    """The module whose output stands for a group's feature map.

    `prefix` (or the group's shared module) when that module lies wholly inside the group; otherwise the last registered module owning
    a tensor of the group, widened to its largest ancestor that lies wholly inside the group.
    """
    modules = dict(model.named_modules())
    members = set(tensor_names)
    for candidate in (prefix, common_module_prefix(tensor_names)):
        if candidate and candidate in modules:
            tensors = [f"{candidate}.{n}" for n in modules[candidate].state_dict(keep_vars=True)]
            if all(t in members for t in tensors):
                return candidate
    owners = [name.rsplit(".", 1)[0] for name in tensor_names if "." in name]
    if not owners:
        return ""
    order = {name: i for i, name in enumerate(modules)}
    owner = max(owners, key=lambda name: order.get(name, -1))
    parts = owner.split(".")
    best = owner
    for depth in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:depth])
        tensors = [
            f"{candidate}.{n}" for n, _ in modules[candidate].state_dict(keep_vars=True).items()
        ]
        if tensors and all(t in members for t in tensors):
            best = candidate
        else:
            break
    return best


def groups_from_prefixes(
    model: nn.Module, rules: Sequence[tuple[str, Sequence[str]]]
) -> list[LayerGroup]:
    """Groups from (name, [module prefixes]) rules, in forward order.

    A tensor belongs to the rule with the longest matching prefix. Tensors that no rule names go
    to the first group when they sit on the model itself (class tokens, position embeddings) and
    to the last group otherwise, so every tensor is always in exactly one group. Empty groups are
    dropped.
    """
    names = list(model.state_dict(keep_vars=True))
    members: dict[str, list[str]] = {name: [] for name, _ in rules}
    for tensor in names:
        best, best_len = None, -1
        for group_name, prefixes in rules:
            for prefix in prefixes:
                if (tensor == prefix or tensor.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = group_name, len(prefix)
        if best is None:
            best = rules[0][0] if "." not in tensor else rules[-1][0]
        members[best].append(tensor)
    modules = dict(model.named_modules())
    groups = []
    for group_name, prefixes in rules:
        tensors = members[group_name]
        if not tensors:
            continue
        present = [p for p in prefixes if p in modules]
        output = present[-1] if present else output_module_for(model, tensors)
        groups.append(LayerGroup(group_name, tuple(tensors), output))
    return groups


def fallback_groups(model: nn.Module) -> list[LayerGroup]:
    """One group per parameterized top-level child, expanding sequential containers one level.

    Used for models without a known rule: the order of registration is the forward order for
    every classification model in torchvision and timm that we checked.
    """
    rules: list[tuple[str, list[str]]] = []

    def has_tensors(module: nn.Module) -> bool:
        return any(True for _ in module.state_dict(keep_vars=True))

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        for child_name, child in module.named_children():
            if not has_tensors(child):
                continue
            path = f"{prefix}{child_name}"
            subs = [c for c in child.children() if has_tensors(c)]
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(subs) > 1 and depth < 2:
                visit(child, path + ".", depth + 1)
            else:
                rules.append((path, [path]))

    visit(model, "", 0)
    if not rules:
        rules = [("all", [""])]
    return groups_from_prefixes(model, rules)
