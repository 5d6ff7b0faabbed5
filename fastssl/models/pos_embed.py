"""Fixed 2-D sin-cos position embeddings for any (h, w) patch grid.

Same values as facebookresearch/mae `util/pos_embed.py` on square grids: the first half of the
channels encodes the column index, the second half the row index (MAE's meshgrid puts w first),
tokens in row-major order, and an all-zero row for the cls token. Computed in float64 like MAE's
numpy code, then cast, so tables match the ones stored in their checkpoints.
"""
import torch

_cache: dict[tuple, torch.Tensor] = {}


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.reshape(-1, 1) * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """(1, [1 +] grid_h * grid_w, dim) float64 table; the cls row, if any, is zero."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb.unsqueeze(0)


@torch._dynamo.assume_constant_result
def cached_pos_embed(
    dim: int, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The cls-prefixed table for one grid, built once per (dim, grid, device, dtype).

    Under torch.compile the table is a constant of the graph: dynamo calls this at trace time
    instead of tracing the cache lookup, so a new grid costs one compile (guarding on the cache
    dict would cost two: one that fills it, one that finds it full), never work per step.
    """
    key = (dim, grid_h, grid_w, device, dtype)
    table = _cache.get(key)
    if table is None:
        table = _cache[key] = sincos_pos_embed_2d(dim, grid_h, grid_w).to(device=device, dtype=dtype)
    return table


@torch._dynamo.assume_constant_result
def cached_channel_pos_embed(
    dim: int, channels: tuple[int, ...], grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The `dim`-wide table with its channels rearranged: output channel i is table channel
    `channels[i]`, or zero where that is -1 (a width-grown model, see `width.py`)."""
    key = (dim, channels, grid_h, grid_w, device, dtype)
    table = _cache.get(key)
    if table is None:
        base = torch.cat([sincos_pos_embed_2d(dim, grid_h, grid_w), torch.zeros(1, 1 + grid_h * grid_w, 1,
                          dtype=torch.float64)], dim=-1)  # the extra zero channel is what -1 picks
        table = _cache[key] = base[..., list(channels)].to(device=device, dtype=dtype)
    return table
