"""FFCV loaders for pretraining / linear probing (RandomResizedCrop + flip) and evaluation (centre crop).

Both yield ``(images, labels)``: images ``(N, 3, res, res)`` in ``dtype`` (float32 by default),
normalised with the ImageNet mean/std, on ``device``, in channels_last memory format (values are
those of a plain NCHW tensor; ``.contiguous()`` if a consumer needs NCHW strides); labels int64 ``(N,)``.
Both are fresh tensors each batch (ffcv recycles its own buffers a few batches later). On the CPU the
normalisation runs in ffcv's worker threads into a new array (:mod:`fastssl.data.normalize`), so the
training thread does no per-pixel work; on a GPU uint8 batches cross PCIe and are normalised there.

Training batches are a pure function of (seed, epoch): the order comes from ffcv's RANDOM order
(seeded by seed + epoch; DistributedSampler-style sharding when ``distributed``), and crops and flips
from :class:`~fastssl.data.decoders.SeededRandomResizedCropFlip` (seeded per sample).

ffcv is imported inside the functions so that ``import fastssl.data`` works where ffcv is absent.
"""
from __future__ import annotations

import functools
import os
import threading
from queue import Empty
from typing import Iterator, Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FFCVLoader:
    """An ffcv ``Loader`` plus epoch/resolution control and normalisation.

    ``iter(loader)`` produces the epoch set by :meth:`set_epoch` (0 at first) and then advances it,
    so a plain ``for epoch ...: for batch in loader`` loop and an explicit ``set_epoch`` agree.
    """

    def __init__(self, loader, decoder, device: torch.device, dtype: torch.dtype):
        self.loader = loader
        self.decoder = decoder
        self.device = device
        self.dtype = dtype
        self.epoch = 0
        self.start_batch = 0
        # when set: this process's real samples; the rest of its shard is ffcv's distributed padding
        self.shard_samples: int | None = None
        # float32 arithmetic whatever the output dtype: bf16 cannot hold 255 * mean exactly.
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).mul(255).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).mul(255).view(1, 3, 1, 1)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def resolution(self) -> int:
        return self.decoder.output_size[0]

    def set_resolution(self, res: int) -> None:
        """Output size for the next epoch; no rebuild (ffcv re-allocates buffers at each epoch)."""
        self.decoder.output_size = (int(res), int(res))

    def set_batch_size(self, batch_size: int) -> None:
        """Batch size from the next epoch on (a progressive stage's micro-batch); no rebuild: ffcv
        allocates its batch buffers per epoch. Samples keep their augmentation (seeded per sample),
        so a different batch size regroups the same epoch, with `len` following."""
        self.loader.batch_size = int(batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``iter()`` yields epoch ``epoch``'s batches from batch ``start_batch`` on, whatever
        ran before. Skipped batches are not decoded, and the rest are bitwise those of a full epoch
        (augmentation depends on the sample, not its position): this is how to resume mid-epoch."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} not in 0..{len(self)}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # ffcv's Loader.__iter__, plus the start offset and the epoch for the seeded decoder.
        from ffcv.pipeline.compiler import Compiler

        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        self.decoder.epoch = epoch  # read by the seeded crop; the centre crop ignores it
        ld = self.loader
        Compiler.set_num_threads(ld.num_workers)
        order = ld.traversal_order.sample_order(epoch)[: len(ld) * ld.batch_size]
        ld.next_epoch = epoch + 1
        keep = None if self.shard_samples is None else self.shard_samples - start * ld.batch_size
        return self._normalised(_epoch_iterator()(ld, order[start * ld.batch_size:]), keep)

    def _normalised(self, batches, keep: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised batches, of which the first `keep` samples (all when None)."""
        try:
            for images, labels in batches:
                if keep is not None:
                    kept = max(0, min(len(labels), keep))
                    keep -= len(labels)
                    if not kept:
                        continue  # a batch of padding only: decoded, not yielded
                    images, labels = images[:kept], labels[:kept]
                if images.dtype == torch.uint8:  # on the GPU: normalise there
                    x = images.float().sub_(self._mean).div_(self._std).to(self.dtype)
                else:  # normalised by the CPU pipeline into a fresh array
                    x = images.to(self.dtype)
                yield x, labels.reshape(-1).clone()
        finally:  # also when the consumer stops early (break, an exception, the iterator dropped)
            batches.close()
        if batches.error is not None:
            raise RuntimeError(f"loading {self.loader.fname} failed: {batches.error}") from batches.error


class _Closed(Exception):
    """The consumer closed the epoch: its pipeline thread stops before the next batch."""


@functools.cache
def _epoch_iterator() -> type:
    """ffcv's epoch iterator, except that
    - an error in its pipeline thread (a corrupt JPEG, ...) ends the epoch and is raised to the
      consumer; ffcv 1.0.2's thread just dies, and the consumer waits for the next batch forever (a
      hung job instead of a failed one);
    - ``close()`` stops the thread and waits for it, then releases the epoch's memory. In ffcv 1.0.2
      an epoch left early (a training loop's ``break``) keeps its thread, which holds the epoch's
      batch buffers and polls its full queue forever: every such epoch leaked a thread and 120-190 MB
      (batch 64, 160-224 px crops of 500 px JPEGs), and ffcv's own ``close()`` released the memory
      under a running thread.
    """
    from ffcv.loader.epoch_iterator import EpochIterator

    class ReportingEpochIterator(EpochIterator):
        error: BaseException | None = None

        def run(self) -> None:
            try:
                super().run()
            except _Closed:
                pass
            except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer's thread
                self.error = e
                self.output_queue.put(None)

        def run_pipeline(self, *args):
            if self.terminate_event.is_set():
                raise _Closed
            return super().run_pipeline(*args)

        def close(self) -> None:
            self.terminate_event.set()
            while self.is_alive() and threading.current_thread() is not self:
                try:  # unblock a put into the full queue; the thread then stops at the next batch
                    while True:
                        self.output_queue.get_nowait()
                except Empty:
                    pass
                self.join(0.01)
            if not self.closed:
                self.closed = True
                self.memory_context.__exit__(None, None, None)

    return ReportingEpochIterator


def _build(path: str | os.PathLike, batch_size: int, decoder, *, order_random: bool, num_workers: int,
           seed: int, distributed: bool, device: torch.device, drop_last: bool, os_cache: bool,
           dtype: torch.dtype, batches_ahead: int, indices: Sequence[int] | None = None) -> FFCVLoader:
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    from .decoders import CachedKernelDecoder, Labels, ffcv_compiler
    from .normalize import NormalizeToFresh

    device = torch.device(device)
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    if to_device:  # uint8 crosses PCIe (4x less than float); FFCVLoader normalises on the GPU
        tail = [ToTensor(), *to_device]
    else:  # normalised in ffcv's worker threads into a fresh array, not on the training thread
        tail = [NormalizeToFresh(tuple(255 * m for m in IMAGENET_MEAN), tuple(255 * s for s in IMAGENET_STD)),
                ToTensor()]
    pipelines = {
        "image": [decoder, *tail, ToTorchImage(channels_last=True)],
        "label": [Labels(), ToTensor(), *to_device],
    }
    # Our decoders' work is compiled once per machine; ffcv's stock ones need its per-Loader compile.
    with ffcv_compiler(enabled=not isinstance(decoder, CachedKernelDecoder)):
        loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                        order=OrderOption.RANDOM if order_random else OrderOption.SEQUENTIAL,
                        distributed=distributed, seed=seed, pipelines=pipelines, drop_last=drop_last,
                        batches_ahead=batches_ahead, indices=indices)
    return FFCVLoader(loader, decoder, device, dtype)


def make_pretrain_loader(path: str | os.PathLike, batch_size: int, res: int, num_workers: int, seed: int,
                         distributed: bool = False, device: torch.device | str = "cpu",
                         drop_last: bool = True, scale: tuple[float, float] = (0.2, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
                         os_cache: bool = True, dtype: torch.dtype = torch.float32,
                         batches_ahead: int = 3, crop_decode: bool = True) -> FFCVLoader:
    """Shuffled, RandomResizedCrop(res, scale, ratio) + flip; deterministic in (seed, epoch).

    Also the linear-probe train loader (MAE protocol: RRC + flip, labels used). ``batch_size`` is per
    process. ``num_workers`` sets ffcv's numba threads *and* ``torch.set_num_threads`` (ffcv does so).
    ``crop_decode`` decodes JPEGs crop-aware (see :mod:`fastssl.data.decoders`); False decodes the
    whole image first, as ffcv's stock decoder does.
    """
    from .decoders import SeededRandomResizedCropFlip

    decoder = SeededRandomResizedCropFlip((res, res), seed=seed, scale=scale, ratio=ratio, flip_prob=flip_prob,
                                          crop_decode=crop_decode)
    return _build(path, batch_size, decoder, order_random=True, num_workers=num_workers, seed=seed,
                  distributed=distributed, device=device, drop_last=drop_last, os_cache=os_cache,
                  dtype=dtype, batches_ahead=batches_ahead)


def make_eval_loader(path: str | os.PathLike, batch_size: int, res: int = 224, crop_ratio: float = 224 / 256,
                     num_workers: int = 8, distributed: bool = False, device: torch.device | str = "cpu",
                     os_cache: bool = True, dtype: torch.dtype = torch.float32,
                     batches_ahead: int = 3, indices: Sequence[int] | None = None) -> FFCVLoader:
    """Sequential, every sample once (no drop_last): centre crop of ``crop_ratio`` x the short side,
    resized to ``res``. With ``distributed``, ffcv pads the shards to equal length by repeating
    samples (as DistributedSampler does); each process yields its shard without that padding, so
    summed over processes every sample counts once (shards then differ by up to one sample: no
    per-batch collectives over an eval loader). ``indices``: only these samples (e.g.
    :func:`fastssl.data.subset.per_class`)."""
    from .decoders import CenterCrop

    decoder = CenterCrop((res, res), ratio=crop_ratio)
    loader = _build(path, batch_size, decoder, order_random=False, num_workers=num_workers, seed=0,
                    distributed=distributed, device=device, drop_last=False, os_cache=os_cache,
                    dtype=dtype, batches_ahead=batches_ahead, indices=indices)
    if distributed:  # the sampler gives rank r positions r, r + W, ...; those past the end are padding
        n, world = len(loader.loader.indices), torch.distributed.get_world_size()
        loader.shard_samples = len(range(torch.distributed.get_rank(), n, world))
    return loader
