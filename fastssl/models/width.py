"""Width growth of a trained MAE: a wider model (embedding width, heads at a fixed head dim, MLP
hidden; the decoder's too where its size changes) holding the old one's weights, every parameter
mapped. Depth stays `growth.py`'s business: `widen(..., blocks=n)` allocates blocks for it, then
`growth.grow` grows the executed depth (width first, then depth).

Every grown axis maps new channel i to an old channel `src[i]`, or -1 for a fresh one; old channels
keep their indices 0..d-1. Two operators:

- `duplicate` (integer ratios, e.g. small -> base): channel i copies channel i mod d on every axis
  (residual width, attention heads, MLP hidden). Every channel is copied equally often, so a
  LayerNorm over the copies sees the old mean and variance, and a Linear reading a duplicated axis
  has its input weights *split* between the copies: W'[o, j] = c[o, j] W[o, src j], the c of one
  source summing to 1. The grown model computes the same function (up to float rounding).
  Symmetry breaking: c is drawn per element (seeded, uniform shares in [1, 3] before normalising),
  not per column. Copies then get different gradients that are not multiples of each other, so
  they differ after one AdamW step (with a per-column split the gradients of copies would be
  proportional, and Adam's normalised step would move them identically).
- `masked` (any ratio, e.g. base -> large), after Masked Structural Growth (Yao et al. 2023): new
  channels and heads are freshly initialised and masked out. Masks sit where a grown axis is read:
  every LayerNorm over a grown width normalises over the *active* channels only (mean and variance
  weighted by the mask) and multiplies its output by the mask; `attn.proj` and `mlp.fc2` multiply
  their input by the head / hidden mask. With the new channels' mask at 0 the old channels compute
  exactly what they did, so growth is function-preserving; `set_mask` ramps the new channels 0 -> 1
  (a buffer update, not a recompile under torch.compile), and at 1 every module is a plain one.
  A model saved mid-ramp has no plain-ViT form: `export` refuses it.

Position tables: the sin-cos table of a wider model is not its old table duplicated (the
frequencies differ), so a grown model keeps running the table of the width it was first trained
at, its channels placed by the same map (`model.pos_channels`; fresh channels get 0). The stored
`pos_embed` / `decoder_pos_embed` hold that table at the default grid, so the timm export runs it.

Checkpoints keep facebookresearch/mae and timm key names; the state dict carries the growth spec
under `width` (position channels, and while masks exist, the old widths and the mask value), which
`restore` reads to rebuild the structure before loading.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .growth import _zero_residual, apply_plan
from .mae import MaskedAutoencoderViT
from .pos_embed import cached_channel_pos_embed
from .sizes import ViTSize, get_size

METHODS = ("duplicate", "masked")
SPEC_KEY = "width"
# axes: the residual width, the attention channels (heads x head dim), the MLP hidden; and the decoder's
_AXES = ("embed", "attn", "hidden", "dec_embed", "dec_attn", "dec_hidden")


@dataclass
class WidthGrowth:
    """What `widen` did: the channel map of every axis, and per parameter the (dim, axis) pairs it
    was gathered along and the split applied to it (the optimizer state follows the same map)."""

    old: dict[str, int]  # axis -> width before growth
    src: dict[str, torch.Tensor]  # axis -> new channel -> old channel, -1 fresh
    axes: dict[str, list[tuple[int, str]]]  # parameter -> (dim, axis) it is gathered along
    split: dict[str, torch.Tensor]  # parameter -> elementwise factor on its copied entries


def _dims(model: MaskedAutoencoderViT) -> dict[str, int]:
    b, d = model.blocks[0], model.decoder_blocks[0]
    return {"embed": model.cls_token.shape[-1], "attn": b.attn.qkv.out_features // 3,
            "hidden": b.mlp.fc1.out_features, "dec_embed": model.mask_token.shape[-1],
            "dec_attn": d.attn.qkv.out_features // 3, "dec_hidden": d.mlp.fc1.out_features}


def _size_dims(s: ViTSize) -> dict[str, int]:
    return {"embed": s.embed_dim, "attn": s.embed_dim, "hidden": int(s.embed_dim * s.mlp_ratio),
            "dec_embed": s.decoder_embed_dim, "dec_attn": s.decoder_embed_dim,
            "dec_hidden": int(s.decoder_embed_dim * s.mlp_ratio)}


def _head_dims(model: MaskedAutoencoderViT) -> tuple[int, int]:
    return model.blocks[0].attn.head_dim, model.decoder_blocks[0].attn.head_dim


def _param_axes(name: str) -> list[tuple[int, str, bool]]:
    """(dim, axis, read) for each grown dim of a parameter; read: the parameter consumes that axis
    (a Linear's input), so duplication splits it."""
    dec = name.startswith(("decoder_", "mask_token"))
    e, a, h = ("dec_embed", "dec_attn", "dec_hidden") if dec else ("embed", "attn", "hidden")
    leaf = name.split(".", 2)[-1] if name.startswith(("blocks.", "decoder_blocks.")) else name
    table = {
        "patch_embed.proj.weight": [(0, e, False)], "patch_embed.proj.bias": [(0, e, False)],
        "cls_token": [(2, e, False)], "mask_token": [(2, e, False)],
        "norm1.weight": [(0, e, False)], "norm1.bias": [(0, e, False)],
        "norm2.weight": [(0, e, False)], "norm2.bias": [(0, e, False)],
        "norm.weight": [(0, e, False)], "norm.bias": [(0, e, False)],
        "decoder_norm.weight": [(0, e, False)], "decoder_norm.bias": [(0, e, False)],
        "attn.qkv.weight": [(0, "qkv:" + a, False), (1, e, True)], "attn.qkv.bias": [(0, "qkv:" + a, False)],
        "attn.proj.weight": [(0, e, False), (1, a, True)], "attn.proj.bias": [(0, e, False)],
        "mlp.fc1.weight": [(0, h, False), (1, e, True)], "mlp.fc1.bias": [(0, h, False)],
        "mlp.fc2.weight": [(0, e, False), (1, h, True)], "mlp.fc2.bias": [(0, e, False)],
        "decoder_embed.weight": [(0, "dec_embed", False), (1, "embed", True)],
        "decoder_embed.bias": [(0, "dec_embed", False)],
        "decoder_pred.weight": [(1, "dec_embed", True)], "decoder_pred.bias": [],
    }
    if leaf not in table:
        raise ValueError(f"width growth does not know how to map parameter {name!r}")
    return table[leaf]


def _source_map(method: str, old: int, new: int) -> torch.Tensor:
    i = torch.arange(new)
    return i % old if method == "duplicate" else torch.where(i < old, i, -1)


def _src(g: WidthGrowth, axis: str) -> torch.Tensor:
    if not axis.startswith("qkv:"):
        return g.src[axis]
    s, old = g.src[axis[4:]], g.old[axis[4:]]  # q, k and v each laid out as the attention channels
    return torch.cat([torch.where(s >= 0, s + k * old, -1) for k in range(3)])


def _check(method: str, old: dict[str, int], new: dict[str, int], head_dims: tuple, new_head_dims: tuple) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown width growth method {method!r}; choose one of {', '.join(METHODS)}")
    for axis in _AXES:
        if new[axis] < old[axis]:
            raise ValueError(f"{axis} width {new[axis]} is smaller than the model's {old[axis]}; width growth "
                             f"only grows")
    if head_dims != new_head_dims:
        raise ValueError(f"head dims {new_head_dims} (encoder, decoder) differ from the model's {head_dims}: "
                         f"width growth adds heads at a fixed head dim")
    for axis in _AXES:
        if method == "duplicate" and new[axis] % old[axis]:
            raise ValueError(f"duplicate needs integer width ratios, but {axis} grows {old[axis]} -> "
                             f"{new[axis]}; use masked")


def _splits(src: torch.Tensor, shape: torch.Size, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Per-element shares along `dim` summing to 1 over the copies of each source (see module doc)."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 + 1
    moved = u.movedim(dim, -1)
    total = torch.zeros(*moved.shape[:-1], int(src.max()) + 1, dtype=torch.float64)
    total.index_add_(-1, src, moved)
    return (moved / total[..., src]).movedim(-1, dim)  # float64: one rounding when applied


def _gather(t: torch.Tensor, dims: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` gathered along each (dim, src); and where every src was an old channel (copied entries)."""
    copied = torch.ones((), dtype=torch.bool)
    for dim, s in dims:
        t = t.index_select(dim, s.clamp(min=0))
        shape = [1] * t.dim()
        shape[dim] = len(s)
        copied = copied & (s >= 0).view(shape)
    return t, copied.expand_as(t)


def map_tensor(old: torch.Tensor, fresh: torch.Tensor, name: str, g: WidthGrowth, power: int = 1) -> torch.Tensor:
    """`old` laid out as the grown parameter `name`: copied entries from their source (times the
    split ** `power`), fresh entries from `fresh`."""
    dims = [(dim, _src(g, axis)) for dim, axis in g.axes[name]]
    out, copied = _gather(old.detach().to(fresh.device), dims)
    if name in g.split:
        out = (out.double() * g.split[name].to(out.device) ** power).to(out.dtype)
    return torch.where(copied, out.to(fresh.dtype), fresh)


def _target_size(model: MaskedAutoencoderViT, size: str | ViTSize) -> ViTSize:
    s = get_size(size) if isinstance(size, str) else size
    return replace(s, patch_size=model.patch_size)


@torch.no_grad()
def widen(model: MaskedAutoencoderViT, size: str | ViTSize, method: str, seed: int = 0,
          blocks: int | None = None) -> tuple[MaskedAutoencoderViT, WidthGrowth]:
    """A new MAE of `size`'s widths (its depths: the encoder keeps `model`'s blocks, `blocks` of them
    if given, for depth growth after; a deeper decoder gets identity blocks appended) computing
    what `model` computes, and the map its optimizer state follows (`map_optimizer_state`).
    ValueError for a size it cannot grow to. Fresh and split values come from `seed`."""
    s = _target_size(model, size)
    old, dims = _dims(model), _size_dims(s)
    _check(method, old, dims, _head_dims(model), (s.embed_dim // s.num_heads,
                                                  s.decoder_embed_dim // s.decoder_num_heads))
    n_blocks = blocks or len(model.blocks)
    if n_blocks < len(model.blocks):
        raise ValueError(f"blocks={n_blocks}: fewer than the model's {len(model.blocks)}")
    if s.decoder_depth < len(model.decoder_blocks):
        raise ValueError(f"decoder depth {s.decoder_depth} is below the model's {len(model.decoder_blocks)}: "
                         f"growth only grows")
    if hasattr(model, "width_masked"):
        raise ValueError("the model's new channels from a masked growth are still ramping in; grow it "
                         "again once they are fully open")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = _like(model, s, n_blocks)
    g = WidthGrowth(old, {a: _source_map(method, old[a], dims[a]) for a in _AXES}, {}, {})
    gen = torch.Generator().manual_seed(seed)
    live = dict(new.named_parameters())
    for name, p in model.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            continue
        axes = _param_axes(name)
        g.axes[name] = [(dim, axis) for dim, axis, _ in axes]
        if method == "duplicate":
            for dim, axis, read in axes:
                if read and len(g.src[axis]) > old[axis]:  # at most one read axis per parameter
                    g.split[name] = _splits(g.src[axis], live[name].shape, dim, gen)
        live[name].copy_(map_tensor(p, live[name], name, g))
    for j in range(len(model.decoder_blocks), s.decoder_depth):
        _zero_residual(new.decoder_blocks[j])  # pre-norm blocks that add nothing: the identity
    _carry_positions(model, new, g)
    apply_plan(new, list(model.layer_plan))
    for old_block, block in zip(model.blocks, new.blocks):  # stochastic depth as it was (parameter-free)
        block.drop_path1, block.drop_path2 = copy.deepcopy(old_block.drop_path1), copy.deepcopy(old_block.drop_path2)
    new.block_gate[: len(model.block_gate)] = model.block_gate
    new.gated_blocks = model.gated_blocks
    if method == "masked":
        _install_masks(new, old)
    _register(new)
    return new, g


def _like(model: MaskedAutoencoderViT, s: ViTSize, blocks: int) -> MaskedAutoencoderViT:
    """A fresh MAE of `s`'s widths with `blocks` encoder blocks, on `model`'s grid, device and dtype."""
    grid = model.patch_embed.grid_size
    new = MaskedAutoencoderViT(
        img_size=grid[0] * model.patch_size, patch_size=model.patch_size,
        in_chans=model.patch_embed.proj.in_channels, embed_dim=s.embed_dim, depth=blocks,
        num_heads=s.num_heads, decoder_embed_dim=s.decoder_embed_dim, decoder_depth=s.decoder_depth,
        decoder_num_heads=s.decoder_num_heads, mlp_ratio=s.mlp_ratio, norm_pix_loss=model.norm_pix_loss)
    return new.to(model.cls_token.device, model.cls_token.dtype)


def check_sizes(method: str, old: ViTSize, new: ViTSize) -> None:
    """ValueError when a model of size `old` cannot be width-grown to `new` by `method` (a recipe's
    stages are checked before anything is built)."""
    _check(method, _size_dims(old), _size_dims(new),
           (old.embed_dim // old.num_heads, old.decoder_embed_dim // old.decoder_num_heads),
           (new.embed_dim // new.num_heads, new.decoder_embed_dim // new.decoder_num_heads))
    if new.decoder_depth < old.decoder_depth:
        raise ValueError(f"decoder depth {new.decoder_depth} is below {old.decoder_depth}: growth only grows")


def rebuilt(model: MaskedAutoencoderViT, size: str, blocks: int, saved_spec: dict | None) -> MaskedAutoencoderViT:
    """An MAE shaped like one that `widen` grew from `model` to `size` with `blocks` encoder blocks,
    its position channels and masks as `saved_spec` (`spec` of that model) says: what a resumed run
    loads the grown model's state into. The values are placeholders."""
    new = _like(model, _target_size(model, size), blocks)
    restore(new, {SPEC_KEY: saved_spec} if saved_spec is not None else {})
    return new


def _carry_positions(model: MaskedAutoencoderViT, new: MaskedAutoencoderViT, g: WidthGrowth) -> None:
    """The new model runs the old model's position tables, channels mapped like the residual width."""
    for name, axis in (("pos_embed", "embed"), ("decoder_pos_embed", "dec_embed")):
        dim, channels = model.pos_channels.get(name, (getattr(model, name).shape[-1], None))
        base = torch.tensor(channels) if channels is not None else torch.arange(dim)
        s = g.src[axis]
        new.pos_channels[name] = (dim, tuple(torch.where(s >= 0, base[s.clamp(min=0)], -1).tolist()))
        grid = new.patch_embed.grid_size
        table = new._pos_table(name, tuple(grid))
        getattr(new, name).copy_(table.to(getattr(new, name).dtype))


class ActiveLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels a mask keeps (weighted mean and variance), output masked."""

    def __init__(self, norm: nn.LayerNorm, active: int):
        super().__init__(norm.normalized_shape, eps=norm.eps, device=norm.weight.device)
        self.weight, self.bias = norm.weight, norm.bias
        self.register_buffer("mask", _initial_mask(len(norm.weight), active, norm.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, xf = self.mask, x.float()  # fp32 like LayerNorm under autocast
        mean = (xf * m).sum(-1, keepdim=True) / m.sum()
        var = ((xf - mean).square() * m).sum(-1, keepdim=True) / m.sum()
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.float() + self.bias.float()
        return (y * m).to(x.dtype)

    def plain(self) -> nn.LayerNorm:
        norm = nn.LayerNorm(self.normalized_shape, eps=self.eps, device=self.weight.device)
        norm.weight, norm.bias = self.weight, self.bias
        return norm


class MaskedInputLinear(nn.Linear):
    """A Linear whose input channels are scaled by a mask (new heads / hidden units fade in)."""

    def __init__(self, linear: nn.Linear, active: int):
        super().__init__(linear.in_features, linear.out_features, device=linear.weight.device)
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("mask", _initial_mask(linear.in_features, active, linear.weight.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.mask.to(x.dtype), self.weight, self.bias)

    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, device=self.weight.device)
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def _initial_mask(n: int, active: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, device=device) < active).float()


def _masked_sites(model: MaskedAutoencoderViT) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, axis) of every module that reads a growable axis."""
    sites = [(model, "norm", "embed"), (model, "decoder_norm", "dec_embed")]
    for blocks, (e, a, h) in ((model.blocks, ("embed", "attn", "hidden")),
                              (model.decoder_blocks, ("dec_embed", "dec_attn", "dec_hidden"))):
        for b in blocks:
            sites += [(b, "norm1", e), (b, "norm2", e), (b.attn, "proj", a), (b.mlp, "fc2", h)]
    return sites


def _install_masks(model: MaskedAutoencoderViT, old: dict[str, int]) -> None:
    dims = _dims(model)
    for parent, attr, axis in _masked_sites(model):
        if dims[axis] > old[axis]:
            module = getattr(parent, attr)
            wrap = ActiveLayerNorm if isinstance(module, nn.LayerNorm) else MaskedInputLinear
            setattr(parent, attr, wrap(module, old[axis]))
            getattr(parent, attr).axis = axis
    model.width_masked = {"old": dict(old), "value": 0.0}


def set_mask(model: nn.Module, value: float) -> None:
    """Open the new channels of a `masked` growth to `value` in [0, 1]; at 1 the modules are plain ones
    again (`unmask`)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"width mask value {value}: must be in [0, 1]")
    state = getattr(model, "width_masked", None)
    if state is None:
        raise ValueError("the model has no width masks (not grown with method 'masked', or already open)")
    for m in model.modules():
        if isinstance(m, (ActiveLayerNorm, MaskedInputLinear)):
            m.mask[state["old"][m.axis]:] = value
    state["value"] = float(value)
    if value == 1.0:
        unmask(model)


def unmask(model: nn.Module) -> None:
    """Masked modules replaced by plain ones (the new channels fully open)."""
    for parent, attr, _ in _masked_sites(model) if hasattr(model, "width_masked") else ():
        module = getattr(parent, attr)
        if isinstance(module, (ActiveLayerNorm, MaskedInputLinear)):
            setattr(parent, attr, module.plain())
    if hasattr(model, "width_masked"):
        del model.width_masked


def ramp(steps_since_growth: int, steps: int) -> float:
    """The mask value `steps_since_growth` optimizer steps after growth, opening linearly over `steps`."""
    return min(1.0, steps_since_growth / steps) if steps > 0 else 1.0


# ---- checkpoints: the spec travels in the state dict ----

def spec(model: nn.Module) -> dict | None:
    if not getattr(model, "pos_channels", None):
        return None
    out = {"pos_channels": {k: [d, list(c)] for k, (d, c) in model.pos_channels.items()}}
    if hasattr(model, "width_masked"):
        out["masked"] = {"old": dict(model.width_masked["old"]), "value": model.width_masked["value"]}
    return out


def _save_spec(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    s = spec(module)
    if s is not None:
        state_dict[prefix + SPEC_KEY] = s


def _drop_spec(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    state_dict.pop(prefix + SPEC_KEY, None)


def _register(model: nn.Module) -> None:
    if not getattr(model, "_width_hooks", False):
        model._register_state_dict_hook(_save_spec)
        model._register_load_state_dict_pre_hook(_drop_spec, with_module=True)
        model._width_hooks = True


def restore(model: MaskedAutoencoderViT, state_dict: dict) -> None:
    """Rebuild the structure a width-grown state dict was saved from (position channels, masks at
    their saved value) before `load_state_dict`; a no-op for a plain state dict."""
    s = state_dict.get(SPEC_KEY)
    if s is None:
        return
    model.pos_channels = {k: (int(d), tuple(int(i) for i in c)) for k, (d, c) in s["pos_channels"].items()}
    if "masked" in s:
        _install_masks(model, {k: int(v) for k, v in s["masked"]["old"].items()})
        if s["masked"]["value"] > 0:
            set_mask(model, float(s["masked"]["value"]))
    _register(model)


def pos_table(state_dict: dict, grid: tuple[int, int]) -> torch.Tensor | None:
    """The encoder position table (cls row first) a width-grown state dict runs at `grid`: its first
    width's sin-cos table, channels mapped (evaluations at another resolution regenerate it, as for a
    plain MAE, rather than resample the stored one). None for a plain state dict."""
    s = state_dict.get(SPEC_KEY)
    if not isinstance(s, dict) or "pos_embed" not in s.get("pos_channels", {}):
        return None
    dim, channels = s["pos_channels"]["pos_embed"]
    return cached_channel_pos_embed(int(dim), tuple(int(c) for c in channels), *grid, torch.device("cpu"),
                                    torch.float32)


def ramping(state_dict: dict) -> float | None:
    """The mask value of a state dict saved mid-ramp of a masked width growth, else None."""
    s = state_dict.get(SPEC_KEY)
    return float(s["masked"]["value"]) if isinstance(s, dict) and "masked" in s else None


# ---- optimizer state ----

_SQUARED = ("exp_avg_sq", "max_exp_avg_sq")


def map_optimizer_state(old_opt: torch.optim.Optimizer, old_model: nn.Module, new_opt: torch.optim.Optimizer,
                        new_model: nn.Module, g: WidthGrowth) -> None:
    """`new_opt` (built over `new_model` as `old_opt` was over `old_model`) takes `old_opt`'s state,
    laid out like the weights: a copied entry takes its source's moments, exp_avg times the split and
    exp_avg_sq times its square where the weight was split (so its Adam step m / sqrt(v) is its
    source's); fresh entries start at zero moments; `step` is kept. Parameters are matched by name."""
    old_names = {id(p): n for n, p in old_model.named_parameters()}
    new_params = dict(new_model.named_parameters())
    new_opt.state.clear()
    for group in old_opt.param_groups:
        for p in group["params"]:
            state, name = old_opt.state.get(p), old_names.get(id(p))
            if not state or name not in g.axes:
                continue
            target = new_params[name]
            out = {}
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    out[k] = map_tensor(v, torch.zeros_like(target), name, g, power=2 if k in _SQUARED else 1)
                else:
                    out[k] = v.clone() if torch.is_tensor(v) else v
            new_opt.state[target] = out
