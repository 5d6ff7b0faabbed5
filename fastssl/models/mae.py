"""Masked autoencoder with a ViT encoder (He et al. 2021), after facebookresearch/mae `models_mae.py`.

Parameter names are theirs, so their checkpoints load unchanged, and the encoder's names are timm
`VisionTransformer`'s (see `vit.encoder_state_dict`). Differences that keep the keys:
- any input resolution, non-square included: position tables are regenerated per patch grid
  (`pos_embed.cached_pos_embed`); the `pos_embed` / `decoder_pos_embed` parameters keep the default
  grid only so state dicts match theirs, and forward never reads them; a width-grown model runs
  the table of the width it was trained at, its channels placed as growth mapped them
  (`pos_channels`, see `width.py`);
- the encoder runs `self.layer_plan` (executed position -> block index) for progressive depth,
  and a block in `gated_blocks` adds only `block_gate[i]` of its residual update (see `growth.py`);
- `noise` makes the masking reproducible;
- `views` = K > 1 trains K disjoint masked views of each image (DMJD's disjoint masking, Zhang et al.
  2022): the encoder and decoder see K*N sequences, the loss is the mean over views.
"""
from functools import partial

import torch
from einops import rearrange
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from .pos_embed import cached_channel_pos_embed, cached_pos_embed, sincos_pos_embed_2d
from .sizes import get_size


def len_keep(num_patches: int, mask_ratio: float) -> int:
    """Visible tokens per image, rounded down as MAE does."""
    return int(num_patches * (1 - mask_ratio))


def max_views(num_patches: int, mask_ratio: float) -> int:
    """Most disjoint masked views of `num_patches` tokens: each keeps `len_keep` of them visible."""
    return num_patches // max(len_keep(num_patches, mask_ratio), 1)


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None, views: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the `len_keep` tokens with the lowest noise, per sample. With `views` = K > 1, K masked
    views of each sample with disjoint visible sets: view k keeps the tokens ranked k*len_keep ..
    (k+1)*len_keep - 1 by the same noise, so one (N, L) draw serves every view.

    Returns (kept tokens (K*N, len_keep, D), mask (K*N, L) with 1 = removed, ids_restore (K*N, L)),
    view-major: rows k*N .. (k+1)*N - 1 are view k.
    """
    n, num_patches, dim = x.shape
    keep = len_keep(num_patches, mask_ratio)
    if views * keep > num_patches:
        raise ValueError(f"views={views}: {views} x {keep} visible tokens exceed {num_patches} patches "
                         f"(at most {max_views(num_patches, mask_ratio)} views at mask_ratio={mask_ratio})")
    if noise is None:
        noise = torch.rand(n, num_patches, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    if views > 1:  # view k: the permutation rotated to start at its run (the masked rest's order is moot)
        ids_shuffle = torch.cat([ids_shuffle.roll(-k * keep, dims=1) for k in range(views)])
        x = x.repeat(views, 1, 1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # rank of each patch in the shuffle
    x_kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = (ids_restore >= keep).float()
    return x_kept, mask, ids_restore


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(embed_dim, *grid).float(), requires_grad=False
        )
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth rule of timm/MAE-FT
        self.blocks = nn.ModuleList([block(embed_dim, num_heads, drop_path=d) for d in dpr])
        self.norm = norm_layer(embed_dim)
        self._layer_plan = list(range(depth))
        # Not state: growth.py sets them, checkpoints restore them (a buffer, so a changing gate
        # value is a tensor update for torch.compile, not a recompile).
        self.register_buffer("block_gate", torch.ones(depth), persistent=False)
        self.gated_blocks: frozenset[int] = frozenset()
        # set by width growth: table name -> (width of its sin-cos table, channel -> table channel or -1)
        self.pos_channels: dict[str, tuple[int, tuple[int, ...]]] = {}

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_embed_dim, *grid).float(), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE: the conv as a Linear on its flattened view, tokens N(0, .02), xavier Linears.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def layer_plan(self) -> list[int]:
        """Executed encoder position -> index into `self.blocks`. A plain attribute, not state-dict
        content (their checkpoints have no such key): checkpoint code saves and restores it."""
        return self._layer_plan

    @layer_plan.setter
    def layer_plan(self, plan: list[int]) -> None:
        plan = [int(i) for i in plan]
        bad = [i for i in plan if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"layer_plan indices {bad} out of range for {len(self.blocks)} blocks")
        self._layer_plan = plan

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patch pixels ordered (row, col, channel) as in MAE."""
        p = self.patch_size
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W) for a patch grid (h, w); the inverse of `patchify`."""
        p = self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p)

    def grid_size(self, imgs: torch.Tensor) -> tuple[int, int]:
        return imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size

    def _pos_table(self, name: str, grid: tuple[int, int]) -> torch.Tensor:
        param = getattr(self, name)
        if name in self.pos_channels:
            return cached_channel_pos_embed(*self.pos_channels[name], *grid, param.device, param.dtype)
        return cached_pos_embed(param.shape[-1], *grid, param.device, param.dtype)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None, views: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (latent (K*N, 1 + len_keep, D) with cls first, mask (K*N, L), ids_restore (K*N, L))
        for K = `views` disjoint masked views of the N images (`random_masking`)."""
        pos = self._pos_table("pos_embed", self.grid_size(imgs))
        x = self.patch_embed(imgs) + pos[:, 1:]  # once per image, whatever the views
        x, mask, ids_restore = random_masking(x, mask_ratio, noise, views)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for i in self._layer_plan:
            y = self.blocks[i](x)
            x = x + self.block_gate[i] * (y - x) if i in self.gated_blocks else y
        return self.norm(x), mask, ids_restore

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Returns per-patch pixel predictions (N, L, p*p*C) in the original patch order."""
        x = self.decoder_embed(latent)
        n, num_patches, dim = x.shape[0], ids_restore.shape[1], x.shape[2]
        mask_tokens = self.mask_token.expand(n, num_patches + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, dim))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self._pos_table("decoder_pos_embed", grid)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch pixel MSE (against per-patch normalised
        pixels with `norm_pix_loss`). With K views (`pred` has K*N rows) every view removes the same
        number of patches per image, so this is the mean over views of each view's MAE loss."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        views = pred.shape[0] // target.shape[0]
        if views > 1:
            target = target.repeat(views, 1, 1)
        # float32 whatever the autocast dtype: a bf16 squared error loses the small residuals.
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None, views: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss (scalar), pred (K*N, L, p*p*C), mask (K*N, L) with 1 = removed) for K =
        `views` disjoint masked views of each image (view-major rows)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, views)
        pred = self.forward_decoder(latent, ids_restore, self.grid_size(imgs))
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_mae(
    size: str,
    patch_size: int | None = None,
    img_size: int = 224,
    norm_pix_loss: bool = True,
    drop_path: float = 0.0,
    depth: int | None = None,
) -> MaskedAutoencoderViT:
    """An MAE of a registered size (`sizes.SIZES`); `patch_size=None` takes the size's own (16, or
    14 for huge). `img_size` only sets the default grid stored in the state dict."""
    s = get_size(size)
    return MaskedAutoencoderViT(
        img_size=img_size,
        patch_size=patch_size or s.patch_size,
        embed_dim=s.embed_dim,
        depth=depth or s.depth,
        num_heads=s.num_heads,
        decoder_embed_dim=s.decoder_embed_dim,
        decoder_depth=s.decoder_depth,
        decoder_num_heads=s.decoder_num_heads,
        mlp_ratio=s.mlp_ratio,
        norm_pix_loss=norm_pix_loss,
        drop_path_rate=drop_path,
    )
