"""ScaleNet expansion: a trained L-layer ViT made L2 layers deep with weight-shared positions and
per-position adapters (DESIGN.md §5).

Position j runs source block g(j) (`cyclic`: j mod L, `interleave`: floor(j L / L2)). Its module is a
timm `Block` whose parameters *are* the source's `nn.Parameter` objects, not copies: one tensor,
every use adds to its gradient, `named_parameters` (so the optimizer and DDP) sees it once.

Each position has its own adapters, parallel to `attn.proj` and/or `mlp.fc2` (the layers that write
into the residual stream): `scale * up(act(down(x)))` with `up` zero, so at creation the network is
the pure weight-shared one. Parallel to a Linear rather than to the whole sublayer so that the linear
form (`act="none"`) merges into that Linear (W + s U D) and the export is a plain timm ViT.

State dict: a shared tensor is saved once, under the first position that uses it, and the spec (key
`scalenet`: sources, rank, where, act) travels with it so `restore` rebuilds the structure before
loading. Works on an MAE (which then runs `layer_plan = 0..L2-1`) and on a timm VisionTransformer.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .growth import sources
from .mae import build_mae
from .sizes import SIZES
from .vit import build_vit_encoder, load_encoder
from .width import restore as restore_width

MAPS = {"cyclic": "stack", "interleave": "interleave"}  # our names -> growth.sources' ops
WHERE = ("attn", "mlp", "both")
ACTS = ("none", "gelu")
SPEC_KEY = "scalenet"
_TARGETS = {"attn": [("attn", "proj")], "mlp": [("mlp", "fc2")],
            "both": [("attn", "proj"), ("mlp", "fc2")]}


class Adapter(nn.Module):
    """scale * up(act(down(x))); `up` starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, act: str):
        super().__init__()
        self.down = nn.Linear(in_features, rank)
        self.act = nn.GELU() if act == "gelu" else nn.Identity()
        self.up = nn.Linear(rank, out_features)
        self.scale = nn.Parameter(torch.ones(()))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(x)))

    @torch.no_grad()
    def delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, db) such that the adapter equals x @ dW.T + db; only for the linear form."""
        if not isinstance(self.act, nn.Identity):
            raise ValueError("adapters with a non-linearity (act=gelu) cannot be merged into a plain ViT; "
                             "expand with adapter act 'none' to export")
        u, d = self.up.weight.float(), self.down.weight.float()
        return self.scale * (u @ d), self.scale * (u @ self.down.bias.float() + self.up.bias.float())


class AdaptedLinear(nn.Module):
    """A Linear whose weight and bias are another Linear's parameters (shared), plus an adapter."""

    def __init__(self, base: nn.Linear, adapter: Adapter):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.adapter(x)


def _position_block(source: nn.Module, rank: int, where: str, act: str) -> nn.Module:
    # deepcopy with every parameter memoised to itself: new modules (own drop path, own adapters),
    # the very same Parameter objects.
    block = copy.deepcopy(source, memo={id(p): p for p in source.parameters()})
    for sub, name in _TARGETS[where]:
        parent = getattr(block, sub)
        lin = getattr(parent, name)
        setattr(parent, name, AdaptedLinear(lin, Adapter(lin.in_features, lin.out_features, rank, act)))
    return block


def is_adapter(param_name: str) -> bool:
    return ".adapter." in param_name


def is_expanded(model: nn.Module) -> bool:
    return hasattr(model, "scalenet_spec")


def expand(model: nn.Module, depth: int, map: str = "cyclic", rank: int = 16, where: str = "both",
           act: str = "none") -> None:
    """Expand `model`'s executed blocks to `depth` positions in place; ValueError on bad input."""
    if is_expanded(model):
        raise ValueError("the model is already ScaleNet-expanded")
    if map not in MAPS:
        raise ValueError(f"unknown map {map!r}; choose one of {', '.join(MAPS)}")
    plan = list(getattr(model, "layer_plan", range(len(model.blocks))))
    if depth <= len(plan):
        raise ValueError(f"depth={depth}: must be greater than the encoder's {len(plan)} layers")
    _expand(model, dict(sources=sources(MAPS[map], len(plan), depth), map=map, rank=rank,
                        where=where, act=act), [model.blocks[i] for i in plan])


def _expand(model: nn.Module, spec: dict, base: list[nn.Module]) -> None:
    rank, where, act = spec["rank"], spec["where"], spec["act"]
    width = base[0].attn.proj.in_features
    if not 0 < rank < width:
        raise ValueError(f"adapter rank={rank}: must be in 1..{width - 1} (the width is {width})")
    if where not in WHERE:
        raise ValueError(f"adapter where={where!r}; choose one of {', '.join(WHERE)}")
    if act not in ACTS:
        raise ValueError(f"adapter act={act!r}; choose one of {', '.join(ACTS)}")
    blocks = [_position_block(base[s], rank, where, act) for s in spec["sources"]]
    ref = next(model.parameters())
    # timm's ViT holds its blocks in a Sequential, the MAE in a ModuleList
    seq = isinstance(model.blocks, nn.Sequential)
    model.blocks = (nn.Sequential(*blocks) if seq else nn.ModuleList(blocks)).to(ref.device)
    if hasattr(model, "layer_plan"):  # an MAE: every position is a block of its own now
        model.layer_plan = list(range(len(blocks)))
        model.register_buffer("block_gate", torch.ones(len(blocks), device=ref.device), persistent=False)
        model.gated_blocks = frozenset()
    model.scalenet_spec = spec
    model.register_state_dict_post_hook(_save_once)
    model.register_load_state_dict_pre_hook(_fill_shared)


def restore(model: nn.Module, state_dict: dict) -> None:
    """Rebuild the expanded structure a state dict was saved from (a no-op for a plain one)."""
    spec = state_dict.get(SPEC_KEY)
    if spec is not None and not is_expanded(model):
        plan = list(getattr(model, "layer_plan", range(len(model.blocks))))
        _expand(model, dict(spec), [model.blocks[i] for i in plan])


def _shared_names(block: nn.Module) -> list[str]:
    return [n for n, _ in block.named_parameters() if not is_adapter(n)]


def _owners(spec: dict) -> list[int]:
    """Position -> the first position that runs the same source (where its tensors are saved)."""
    first: dict[int, int] = {}
    return [first.setdefault(s, j) for j, s in enumerate(spec["sources"])]


def _save_once(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    names = _shared_names(module.blocks[0])
    for j, owner in enumerate(_owners(module.scalenet_spec)):
        if owner != j:
            for n in names:
                del state_dict[f"{prefix}blocks.{j}.{n}"]
    state_dict[prefix + SPEC_KEY] = dict(module.scalenet_spec)


def _fill_shared(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                 missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    spec = state_dict.pop(prefix + SPEC_KEY, None)
    ours = {k: module.scalenet_spec[k] for k in ("sources", "rank", "where", "act")}
    if spec is not None and {k: spec[k] for k in ours} != ours:
        error_msgs.append(f"ScaleNet spec of the state dict {spec} differs from the model's {ours}")
        return
    names = _shared_names(module.blocks[0])
    for j, owner in enumerate(_owners(module.scalenet_spec)):
        for n in names:
            src = f"{prefix}blocks.{owner}.{n}"
            if owner != j and src in state_dict:
                state_dict[f"{prefix}blocks.{j}.{n}"] = state_dict[src]


def freeze_shared(model: nn.Module) -> None:
    """Train only the adapters. Listed in `model.frozen_params` so that `growth.apply_plan` (which
    sets what trains from the layer plan, also on resume) keeps them frozen."""
    model.frozen_params = [p for n, p in model.blocks.named_parameters() if not is_adapter(n)]
    for p in model.frozen_params:
        p.requires_grad_(False)


@torch.no_grad()
def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each position's weights materialised (shared tensors copied, linear adapters merged): the
    state dict of a plain model of depth L2 (timm ViT keys for the encoder). ValueError for
    non-mergeable adapters."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()
          if k != SPEC_KEY and not k.startswith("blocks.")}
    for j, block in enumerate(model.blocks):
        for n, p in block.named_parameters():
            if not is_adapter(n):
                sd[f"blocks.{j}.{n}"] = p.detach().clone()
        for n, m in block.named_modules():
            if isinstance(m, AdaptedLinear):
                dw, db = m.adapter.delta()
                sd[f"blocks.{j}.{n}.weight"] += dw.to(m.weight.dtype)
                sd[f"blocks.{j}.{n}.bias"] += db.to(m.bias.dtype)
    return sd


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(unique parameters, adapter parameters); a shared tensor counts once."""
    total = adapters = 0
    for n, p in model.named_parameters():
        total += p.numel()
        adapters += p.numel() if is_adapter(n) else 0
    return total, adapters


def build_for(sd: dict) -> nn.Module:
    """The model (an MAE if the state dict has a decoder, else a timm ViT) these weights load into,
    ScaleNet structure included."""
    dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    size = next((name for name, s in SIZES.items() if s.embed_dim == dim), None)
    if size is None:
        raise ValueError(f"embed dim {dim} matches no model size ({', '.join(SIZES)})")
    spec = sd.get(SPEC_KEY)
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    depth = len(set(spec["sources"])) if spec else len(blocks)
    img_size = round((sd["pos_embed"].shape[1] - 1) ** 0.5) * patch if "pos_embed" in sd else 224
    if any(k.startswith("decoder_") for k in sd):
        model = build_mae(size, patch_size=patch, img_size=img_size, depth=depth)
    else:
        model = build_vit_encoder(size, patch_size=patch, img_size=img_size, depth=depth)
    restore(model, sd)
    restore_width(model, sd)
    try:
        if spec or hasattr(model, "decoder_embed"):
            model.load_state_dict(sd, strict=True)
        else:
            load_encoder(model, sd)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"weights do not fit a {size} model: {str(e).splitlines()[0]}") from None
    return model


def plain_state_dict(sd: dict) -> dict:
    """An expanded checkpoint's state dict materialised for a plain model of depth L2 (ValueError for
    non-mergeable adapters)."""
    return export_state_dict(build_for(sd))
