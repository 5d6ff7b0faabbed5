"""Typed configs: a YAML recipe, then `key=value` overrides, checked against dataclass schemas.

Every user mistake ends in a `ConfigError` whose message is one line naming the key, the bad value
and what is allowed; entry points print it and exit 2 before anything is written.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from fastssl import atomic
from fastssl.errors import ConfigError
from fastssl.models import width
from fastssl.models.sizes import get_size
from fastssl.train.progressive import check_search, from_config


@dataclass
class DataConfig:
    train: str = ""  # .beton written by data_prep/write_ffcv.py
    val: str = ""
    num_workers: int = 8  # per process
    res: int = 224
    os_cache: bool = True  # share the page cache between processes (FFCV os_cache)
    # decode only each crop's JPEG blocks, with the decoder built at install (fastssl/data/jpeg_crop.c);
    # false: the full image, then the crop (about half the loader's throughput; needs no compiled decoder)
    crop_decode: bool = True


SizeName = Literal["micro", "mini", "midi", "tiny", "small", "base", "large", "huge"]  # models/sizes.py


@dataclass
class ModelConfig:
    size: SizeName = "base"
    patch_size: int = 16
    norm_pix_loss: bool = True
    drop_path: float = 0.0
    depth: Optional[int] = None  # encoder blocks, when not the size's (e.g. a deeper from-scratch baseline)


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # lr = blr * global_batch / 256, as in MAE
    lr: Optional[float] = None  # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    clip_grad: Optional[float] = None  # max global grad norm
    # cosine: MAE's warmup + half-cosine; wsd: warmup, stable at lr, linear decay over the last
    # `decay_frac` of training (a single late growth lands in the stable phase)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_frac: float = 0.2


@dataclass
class LogConfig:
    # auto: online when WANDB_API_KEY is set, else offline (an online init without network hangs)
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "fastssl"
    every_steps: int = 20
    recon_every_epochs: int = 0  # 0: never; else save a reconstruction PNG grid every N epochs
    progress: bool = True
    # per-GPU dense peak (TFLOP/s) for the logged MFU; null: the nominal bf16 peak of an A100, H100
    # or H200 by the device's name (no MFU logged on other devices)
    peak_tflops: Optional[float] = None


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    every_steps: int = 0  # 0: only at epoch ends
    keep_last: int = 2
    # when the run folder has checkpoints and none of them loads (all corrupt): true starts the run
    # over from step 0 there; false (default) stops with an error listing them
    restart: bool = False


@dataclass
class RunConfig:
    """What every entry point shares: where, how long, how precise, how fast."""

    run_dir: str = "runs/default"
    epochs: int = 800
    batch_size: int = 4096  # global, over all processes and accumulation steps
    accum_steps: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        _check(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        _check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        _check(self.accum_steps > 0, "accum_steps", self.accum_steps, "must be > 0")
        _check(self.data.num_workers >= 0, "data.num_workers", self.data.num_workers, "must be >= 0")
        _check(self.model.patch_size > 0, "model.patch_size", self.model.patch_size, "must be > 0")
        _check(self.model.depth is None or self.model.depth > 0, "model.depth", self.model.depth, "must be > 0")
        _check(
            self.data.res > 0 and self.data.res % self.model.patch_size == 0,
            "data.res", self.data.res,
            f"must be a positive multiple of model.patch_size={self.model.patch_size}",
        )
        _check(0.0 <= self.model.drop_path < 1.0, "model.drop_path", self.model.drop_path, "must be in [0, 1)")
        _check(self.optim.blr > 0, "optim.blr", self.optim.blr, "must be > 0")
        _check(self.optim.lr is None or self.optim.lr > 0, "optim.lr", self.optim.lr, "must be > 0 or null")
        _check(self.optim.weight_decay >= 0, "optim.weight_decay", self.optim.weight_decay, "must be >= 0")
        _check(self.optim.warmup_epochs >= 0, "optim.warmup_epochs", self.optim.warmup_epochs, "must be >= 0")
        _check(all(0 <= b < 1 for b in self.optim.betas), "optim.betas", list(self.optim.betas), "each must be in [0, 1)")
        _check(0.0 < self.optim.decay_frac <= 1.0, "optim.decay_frac", self.optim.decay_frac, "must be in (0, 1]")
        _check(
            self.optim.clip_grad is None or self.optim.clip_grad > 0,
            "optim.clip_grad", self.optim.clip_grad, "must be > 0 or null",
        )
        _check(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", self.checkpoint.keep_last, "must be >= 1")
        _check(self.checkpoint.every_epochs >= 0, "checkpoint.every_epochs", self.checkpoint.every_epochs, "must be >= 0")
        _check(self.checkpoint.every_steps >= 0, "checkpoint.every_steps", self.checkpoint.every_steps, "must be >= 0")
        _check(self.log.every_steps > 0, "log.every_steps", self.log.every_steps, "must be > 0")
        _check(self.log.peak_tflops is None or self.log.peak_tflops > 0, "log.peak_tflops", self.log.peak_tflops,
               "must be > 0 or null")
        _check(0 <= self.seed < 2**32, "seed", self.seed, "must be in 0..2**32-1")

    def check_run_dir(self) -> None:
        """A probe file in run_dir (or the folder it would be made in). Not part of `validate`: tools
        that only read recipes (flops, the Slurm planner on a login node) validate them too."""
        problem = atomic.why_unwritable(self.run_dir)
        _check(problem is None, "run_dir", self.run_dir, f"not writable: {problem}")

    def check_batches(self, batches: int) -> None:
        """`batches`: what the train loader gives each process per epoch; a step needs accum_steps."""
        _check(batches >= self.accum_steps, "batch_size", self.batch_size,
               f"the training set gives {batches} batches per process, fewer than accum_steps="
               f"{self.accum_steps}; lower batch_size")

    def micro_batch(self, world_size: int) -> int:
        """Images per process per forward pass: batch_size / (world_size x accum_steps)."""
        return self.batch_size // (world_size * self.accum_steps)

    def validate_world(self, world_size: int) -> None:
        """Checks that need the number of processes, known only after distributed init."""
        per = world_size * self.accum_steps
        _check(
            self.batch_size % per == 0,
            "batch_size", self.batch_size,
            f"must be divisible by world_size x accum_steps = {world_size} x {self.accum_steps} = {per}",
        )

    def lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else self.optim.blr * self.batch_size / 256


@dataclass
class KNNConfig:
    """Weighted kNN on encoder features (cosine, k nearest, weights exp(sim / temperature))."""

    every_epochs: int = 0  # pretraining: 0 never; else run the monitor every N epochs
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256  # per process, for feature extraction
    # memory bank: null = the whole train split; N = a seeded N images of each class (DINOv2's
    # n_per_class), e.g. 100 on ImageNet: a 100k bank, a twelfth of the per-epoch monitor's encoding
    bank_per_class: Optional[int] = None

    def validate(self) -> None:
        _check(self.every_epochs >= 0, "knn.every_epochs", self.every_epochs, "must be >= 0")
        _check(self.bank_per_class is None or self.bank_per_class >= 1, "knn.bank_per_class",
               self.bank_per_class, "must be >= 1, or null for the whole train split")
        _check(self.k >= 1, "knn.k", self.k, "must be >= 1")
        _check(self.temperature > 0, "knn.temperature", self.temperature, "must be > 0")
        _check(self.batch_size >= 1, "knn.batch_size", self.batch_size, "must be >= 1")


@dataclass
class RampConfig:
    """ffcv-imagenet's resolution ramp: min_res until start_ramp, linear to max_res at end_ramp."""

    min_res: int = 160
    max_res: int = 224
    start_ramp: int = 0
    end_ramp: int = 0
    step: int = 32  # resolutions are rounded to a multiple of this


@dataclass
class StageConfig:
    """One explicit stage, from `epoch` until the next stage's; a null field keeps the previous
    stage's value (the first stage's null fields take data.res, mask_ratio, the full depth and
    model.drop_path)."""

    epoch: int = 0
    res: Optional[int] = None
    depth: Optional[int] = None  # executed encoder blocks
    # the model size from this stage on: a wider one grows the width (progressive.growth.width),
    # and the encoder has that size's blocks (`depth` still says how many run)
    size: Optional[SizeName] = None
    mask_ratio: Optional[float] = None
    drop_path: Optional[float] = None
    # per-process micro-batch; the global batch stays batch_size, so this stage accumulates
    # batch_size / (world_size x micro_batch) micro-batches per step (null: batch_size / (world x accum_steps))
    micro_batch: Optional[int] = None


@dataclass
class GrowthConfig:
    op: Literal["stack", "interleave", "interpolate", "zero", "gated", "mogrow"] = "zero"
    optimizer: Literal["reset", "carry", "copy"] = "carry"  # what new/old params' AdamW state becomes
    rewarmup_steps: int = 0  # linear LR re-warmup after each growth; the global schedule continues
    gate_steps: int = 5000  # `gated`: new blocks' gate m ramps 0 -> 1 over this many steps (MSG)
    ema_decay: float = 0.9996  # `mogrow`: EMA of the encoder blocks that grown blocks copy (AutoProg)
    # which old layer each new position copies (copying ops): floor = j L / L' rounded down; autoprog =
    # AutoProg's `new_idx` (the last L' - L layers duplicated in place: 6 -> 8 is [0,1,2,3,4,4,5,5])
    map: Literal["floor", "autoprog"] = "floor"
    # a stage's wider `size`: duplicate (integer width ratios, function-preserving) or masked (any
    # ratio; new channels open linearly over `mask_steps` optimizer steps); models/width.py
    width: Literal["duplicate", "masked"] = "duplicate"
    mask_steps: int = 1000


@dataclass
class SearchStageConfig:
    """A stage whose encoder depth the run picks among `depths` (those >= the depth it has then)."""

    epoch: int = 0
    depths: list[int] = field(default_factory=list)


@dataclass
class SearchConfig:
    """AutoProg's automated growth (fastssl/train/search.py): at each stage start with two or more
    candidate depths, `search_epochs` epochs train a supernet (one uniformly drawn candidate per step,
    counted in the budget), then each candidate's MAE loss L on a fixed evaluation set and its time T
    per step decide the depth. Empty `stages`: no search. Resolution and mask ratio stay the manual
    schedule's (progressive.stages / ramp): the search picks depth only."""

    stages: list[SearchStageConfig] = field(default_factory=list)
    search_epochs: int = 2
    snapshots: int = 5  # evaluations of every candidate, evenly spaced over the last search epoch
    eval_images: int = 6400  # the fixed evaluation set: this many train images, centre crops
    eval_batch: int = 128
    time: Literal["flops", "measured"] = "flops"  # flops: reproducible; measured: fwd+bwd, max over ranks
    ema_decay: float = 0.998  # the EMA of the whole MAE that is scored (AutoProg's first decay)
    in_warmup: bool = False  # allow a search that starts inside the LR warm-up


@dataclass
class ElasticDepthConfig:
    """Apollo's per-step elastic depth (`train/elastic_depth.py`): each step runs a depth drawn by LVPS
    from round(linspace(N, max_depth, num_depths)), p ∝ exp(-(L - N) / (max_depth - N) / temperature),
    its positions sharing the stage's N physical blocks."""

    max_depth: Optional[int] = None  # null: the encoder's full depth
    num_depths: int = 4  # at most this many depths per stage (one compiled graph each)
    temperature: float = 0.5  # p(max_depth) / p(N) = exp(-1 / temperature)


@dataclass
class ProgressiveConfig:
    """Empty (no ramp, no stages): a fixed-size run."""

    ramp: Optional[RampConfig] = None
    stages: list[StageConfig] = field(default_factory=list)
    # mask ratio per resolution such that the visible tokens per image stay those of the final stage
    couple_mask: bool = False
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    elastic_depth: Optional[ElasticDepthConfig] = None  # null: every step runs the stage's depth

    def stage_list(self) -> list[StageConfig]:
        """The explicit stages, or one from epoch 0 that keeps every recipe value."""
        return self.stages or [StageConfig()]


@dataclass
class ScaleNetConfig:
    """Training a ScaleNet-expanded `init` (python -m fastssl.expand)."""

    freeze_shared: bool = False  # train only the adapters
    adapter_lr_scale: float = 1.0  # adapters' LR = this x the schedule's


@dataclass
class PretrainConfig(RunConfig):
    mask_ratio: float = 0.75
    # weight decay on cls_token and mask_token, as MAE's pretraining; false: none, as timm (and
    # runs started before this option: their optimizer state has the tokens in the no-decay group)
    decay_tokens: bool = True
    # K disjoint masked views of each image (DMJD): K x the encoder/decoder work per image, one decode.
    # batch_size, steps per epoch and the LR rule count images; the loss is the mean over views.
    mask_views: int = 1
    init: str = ""  # start from these weights (a fresh run only; resume always wins)
    init_unsafe: bool = False  # allow arbitrary unpickling of `init` (only for files you trust)
    knn: KNNConfig = field(default_factory=KNNConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    scalenet: ScaleNetConfig = field(default_factory=ScaleNetConfig)

    def validate(self) -> None:
        super().validate()
        _check(0.0 <= self.mask_ratio < 1.0, "mask_ratio", self.mask_ratio, "must be in [0, 1)")
        _check(self.mask_views >= 1, "mask_views", self.mask_views, "must be >= 1")
        _check(bool(self.data.train), "data.train", self.data.train, "must name a .beton file")
        self.knn.validate()
        _check(not self.knn.every_epochs or bool(self.data.val), "data.val", self.data.val,
               "must name a .beton file when knn.every_epochs > 0")
        _check(self.scalenet.adapter_lr_scale > 0, "scalenet.adapter_lr_scale", self.scalenet.adapter_lr_scale,
               "must be > 0")
        from_config(self)  # every schedule mistake, before anything runs
        check_search(self, self.model.depth or get_size(self.model.size).depth)

    def validate_world(self, world_size: int) -> None:
        super().validate_world(world_size)
        per = self.batch_size // world_size
        allowed = ", ".join(str(d) for d in range(1, per + 1) if per % d == 0)
        for i, st in enumerate(self.progressive.stages):
            _check(st.micro_batch is None or per % st.micro_batch == 0,
                   f"progressive.stages[{i}].micro_batch", st.micro_batch,
                   f"must divide the per-process batch batch_size / world_size = {self.batch_size} / {world_size} "
                   f"= {per} (allowed: {allowed})")


@dataclass
class MemberConfig:
    """One member of a model family, trained after it is grown from the member before it."""

    size: SizeName = "base"
    epochs: int = 100  # its own warmup and cosine; the family's optim.warmup_epochs each
    blr: Optional[float] = None  # null: the family's per-size rule (FamilyConfig.member_blr)
    width: Optional[Literal["duplicate", "masked"]] = None  # its width growth; null: progressive.growth.width
    micro_batch: Optional[int] = None  # per process, as a progressive stage's


@dataclass
class FamilyConfig(PretrainConfig):
    """A model family in one run (`python -m fastssl.family`): the members in order, each grown in
    width and depth from the one before and trained on as its own MAE run in `members/<size>/`."""

    members: list[MemberConfig] = field(default_factory=list)
    # max LR by size: the largest member trains at optim.blr, a narrower one at
    # blr x (largest width / its width) ** lr_width_power (0: MAE's one blr for every size)
    lr_width_power: float = 0.5

    def member_blr(self, k: int) -> float:
        m = self.members[k]
        if m.blr is not None:
            return m.blr
        widest = get_size(self.members[-1].size).embed_dim
        return self.optim.blr * (widest / get_size(m.size).embed_dim) ** self.lr_width_power

    def member(self, k: int) -> PretrainConfig:
        """Member k's own pretraining run: from member k - 1's final state (model size k - 1, a first
        stage that grows it to size k), in run_dir/members/<size>."""
        m = self.members[k]
        cfg = PretrainConfig(**{f.name: copy.deepcopy(getattr(self, f.name))
                                for f in dataclasses.fields(PretrainConfig)})
        cfg.run_dir = str(Path(self.run_dir) / "members" / m.size)
        cfg.epochs = m.epochs
        cfg.optim.blr = self.member_blr(k)
        cfg.model.size = self.members[k - 1].size if k else m.size
        cfg.init = self.init if k == 0 else ""
        growth = cfg.progressive.growth
        growth.width = m.width or growth.width
        cfg.progressive.stages = [StageConfig(epoch=0, size=m.size, depth=get_size(m.size).depth,
                                              micro_batch=m.micro_batch)]
        return cfg

    def validate(self) -> None:
        _check(bool(self.members), "members", self.members, "must list the family's members, smallest first")
        _check(not self.progressive.stages, "progressive.stages", "[...]",
               "a family's members set its stages (one per member); leave it empty")
        _check(self.optim.lr is None, "optim.lr", self.optim.lr, "a family scales optim.blr by size; set that")
        _check(self.model.depth is None, "model.depth", self.model.depth, "a family's members have their sizes' depths")
        _check(not self.progressive.search.stages, "progressive.search.stages", "[...]",
               "a family's members grow in width, which the search's shared blocks do not follow; leave it empty")
        _check(self.progressive.elastic_depth is None, "progressive.elastic_depth", "{...}",
               "a family's members grow in width, which elastic depth's shared blocks do not follow; leave it null")
        total = sum(m.epochs for m in self.members)
        _check(self.epochs == total, "epochs", self.epochs,
               f"a family trains its members one after another: set it to their sum, {total}")
        for k, m in enumerate(self.members):
            key = f"members[{k}]"
            _check(m.epochs > 0, f"{key}.epochs", m.epochs, "must be > 0")
            _check(m.epochs > self.optim.warmup_epochs, f"{key}.epochs", m.epochs,
                   f"must be > optim.warmup_epochs={self.optim.warmup_epochs} (every member warms up)")
            _check(m.blr is None or m.blr > 0, f"{key}.blr", m.blr, "must be > 0 or null")
            if k:
                prev = self.members[k - 1]
                method = m.width or self.progressive.growth.width
                try:
                    width.check_sizes(method, get_size(prev.size), get_size(m.size))
                except ValueError as e:
                    raise ConfigError(f"{key}.size={m.size!r}: cannot grow from {prev.size} ({method}): {e}") from None
                _check(m.size != prev.size and get_size(m.size).depth >= get_size(prev.size).depth,
                       f"{key}.size", m.size, f"must be a larger size than {prev.size} (wider, at least as deep)")
        super().validate()
        for k in range(len(self.members)):
            self.member(k).validate()


@dataclass
class EvalConfig(RunConfig):
    """What the evaluations of a pretrained encoder share: the weights to evaluate and the data."""

    init: str = ""  # checkpoint to evaluate (ours, facebookresearch/mae, timm), or 'random'
    init_unsafe: bool = False  # allow arbitrary unpickling of `init` (only for files you trust)

    def validate(self) -> None:
        super().validate()
        _check(bool(self.init), "init", self.init, "must name a checkpoint or be 'random'")
        _check(bool(self.data.train), "data.train", self.data.train, "must name a .beton file")
        _check(bool(self.data.val), "data.val", self.data.val, "must name a .beton file")


@dataclass
class LinProbeConfig(EvalConfig):
    global_pool: Literal["token", "avg"] = "token"  # MAE probes the cls token
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range: MAE's main_linprobe.py
    # 0: encode every batch live (the MAE protocol). K > 0: encode K augmented (RRC + flip) views of
    # the train set once, then train the head on the cached features, epoch e on view e mod K.
    cache_views: int = 0
    cache_dtype: Literal["float16", "float32"] = "float16"
    # One head per entry, trained together at entry x lr on the same features (an lr sweep in one
    # run); results.json reports each, and the best on val.
    lr_scales: list[float] = field(default_factory=lambda: [1.0])
    flip_prob: float = 0.5  # the train views' horizontal flips (MAE: RRC + flip)
    # also write predictions.pt: the best head's top-1 class and the label of every val image, in the
    # val loader's order (several processes: rank by rank), for comparing probes image by image
    save_predictions: bool = False

    def validate(self) -> None:
        super().validate()
        _check(self.cache_views >= 0, "cache_views", self.cache_views, "must be >= 0")
        _check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale", list(self.crop_scale),
               "must be [lo, hi] with 0 < lo <= hi <= 1")
        _check(0 <= self.flip_prob <= 1, "flip_prob", self.flip_prob, "must be in [0, 1]")
        _check(bool(self.lr_scales) and all(s > 0 for s in self.lr_scales), "lr_scales", self.lr_scales,
               "must be a non-empty list of numbers > 0")


@dataclass
class AugmentConfig:
    """Fine-tuning augmentation (MAE: timm's create_transform + Mixup, all on the batch here)."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (in the FFCV decoder)
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm's notation; "" turns it off
    reprob: float = 0.25  # random erasing probability (per image, pixel mode)
    mixup: float = 0.8  # mixup alpha; 0 off
    cutmix: float = 1.0  # cutmix alpha; 0 off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1

    def validate(self) -> None:
        _check(0 < self.scale[0] <= self.scale[1] <= 1, "augment.scale", list(self.scale),
               "must be [lo, hi] with 0 < lo <= hi <= 1")
        _check(0 <= self.reprob <= 1, "augment.reprob", self.reprob, "must be in [0, 1]")
        _check(self.mixup >= 0 and self.cutmix >= 0, "augment.mixup", self.mixup, "alphas must be >= 0")
        _check(0 <= self.mixup_prob <= 1, "augment.mixup_prob", self.mixup_prob, "must be in [0, 1]")
        _check(0 <= self.mixup_switch_prob <= 1, "augment.mixup_switch_prob", self.mixup_switch_prob,
               "must be in [0, 1]")
        _check(0 <= self.smoothing < 1, "augment.smoothing", self.smoothing, "must be in [0, 1)")


@dataclass
class FinetuneConfig(EvalConfig):
    # MAE fine-tuning defaults (ViT-B); a recipe states them anyway
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        blr=5e-4, min_lr=1e-6, betas=(0.9, 0.999), warmup_epochs=5.0))
    layer_decay: float = 0.75  # lr scale per block from the head down (MAE: 0.65 B, 0.75 L/H)
    global_pool: Literal["token", "avg"] = "avg"  # MAE fine-tunes on the average-pooled tokens
    # at a resolution other than the checkpoint's: "sincos" regenerates an MAE's sin-cos table for
    # the new grid; "bicubic" resizes the stored table, as MAE's interpolate_pos_embed (its 448 px runs)
    pos_embed_resize: Literal["sincos", "bicubic"] = "sincos"
    ema: bool = False
    ema_decay: float = 0.9999
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        super().validate()
        _check(0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "must be in (0, 1]")
        _check(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in (0, 1)")
        self.augment.validate()


@dataclass
class KNNRunConfig(EvalConfig):
    global_pool: Literal["token", "avg"] = "token"
    knn: KNNConfig = field(default_factory=KNNConfig)

    def validate(self) -> None:
        super().validate()
        self.knn.validate()


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


# ---- loading -------------------------------------------------------------------------------------

T = typing.TypeVar("T")


def load_config(cls: type[T], recipe: str | Path | None, overrides: list[str] = ()) -> T:
    """Recipe YAML (may name a `_base_` recipe beside it) + `a.b=value` overrides -> validated `cls`."""
    raw: dict = _read_recipe(Path(recipe)) if recipe else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.blr=1e-4")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    cfg = _build(cls, raw, prefix="")
    cfg.validate()
    return cfg


def recipe_dict(recipe: str | Path) -> dict:
    """A recipe's keys as written, its `_base_` chain merged (before any schema check)."""
    return _read_recipe(Path(recipe))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _read_recipe(path: Path, _seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r}: no such file")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {str(path)!r}: _base_ chain loops")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r}: must be a mapping of keys to values")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_recipe(path.parent / base, _seen + (path.resolve(),))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[last] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={raw!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix + unknown[0]!r} (allowed: {', '.join(names)})")
    kwargs = {name: _coerce(hints[name], raw[name], prefix + name) for name in names if name in raw}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        n = len(args) if origin is tuple and Ellipsis not in args else None
        if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
            want = f"a list of {n}" if n else "a list"
            raise ConfigError(f"{key}={value!r}: expected {want}")
        inner = args[0] if args else Any
        return origin(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    return value
