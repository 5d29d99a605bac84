"""The data side of a run: loading once for every process, batch sizes, loaders.

The run's build (`build.py`) calls these; they are apart so that each file reads in one go.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from transferkit.data import StreamedTaskDataset, collate, load_data, reader_batches
from transferkit.errors import UserError
from transferkit.recipes import Recipe


def load_shared_data(recipe: Recipe, accelerator: Accelerator):
    """`load_data` on every process, decoding the images (to find unreadable ones) only once.

    The main process loads first (datasets' caches fill once) and finds the unreadable rows;
    the others receive those rows instead of decoding every image again. An error on the main
    process reaches every process, so none waits forever.
    """
    if accelerator.num_processes == 1:
        return load_data(recipe.data, recipe.tasks, recipe.seed)
    from accelerate.utils import broadcast_object_list

    data, message = None, None
    if accelerator.is_main_process:
        try:
            data = load_data(recipe.data, recipe.tasks, recipe.seed)
        except UserError as err:
            message = str(err)
    payload = [(data.bad_rows if data else None, message)]
    broadcast_object_list(payload)
    bad_rows, message = payload[0]
    if message is not None:
        raise UserError(message)
    if data is None:
        data = load_data(recipe.data, recipe.tasks, recipe.seed, bad_rows=bad_rows)
    return data


# The default batch is halved (32, 16, 8) while an epoch would have fewer batches than this:
# small train sets need steps more than large batches. LP-FT on 100 images ended 3 points
# higher at 8 (13 steps an epoch) than at 16 or 32. On 250 images, 8 (31 steps) ended 0.6
# points higher than 16 but fell by up to 25 points in the epochs after the unfreeze, so 16
# it is there (docs/quality.md). Per process: 8 up to 240 images, 16 up to 480, then 32.
MIN_BATCHES_PER_EPOCH = 16


def default_batch_size(chosen: int | None, samples: int, processes: int, say: bool) -> int:
    """`train.batch_size`, or by default 32 halved (down to 8) while each process would get
    fewer than `MIN_BATCHES_PER_EPOCH` batches an epoch."""
    if chosen is not None:
        return chosen
    size, share = 32, math.ceil(samples / processes)
    while size > 8 and math.ceil(share / size) < MIN_BATCHES_PER_EPOCH:
        size //= 2
    if say and size < 32:
        print(f"batch size: {size} per process ({samples} training images; train.batch_size)")
    return size


def drop_last(samples: int, batch_size: int, processes: int = 1) -> bool:
    """Whether the training loader drops its last, incomplete batch.

    On one process only a last batch of a single image is dropped (batch norm cannot train on
    it); dropping every incomplete batch cost small train sets dearly (50 images at batch 32
    gave one step per epoch). Several processes drop it, so that no process pads its last batch
    with repeated samples and every process count sees the same samples.
    """
    if processes > 1:
        return samples > batch_size
    return samples % batch_size == 1 and samples > batch_size


def make_loaders(
    train_set, val_set, cfg, workers: int, processes: int = 1, sampler=None
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training batches (or drawn by `sampler`) and ordered validation batches."""
    # Workers live across epochs (a restart cost a tenth of a small epoch); they read the
    # dataset's `epoch`, which seeds the augmentation, from shared memory.
    args = {"collate_fn": collate, "num_workers": workers, "persistent_workers": workers > 0,
            "pin_memory": torch.cuda.is_available()}  # fmt: skip
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=drop_last(len(train_set), cfg.batch_size, processes),
        **args,
    )
    return train_loader, eval_loader(val_set, cfg, workers)


def release_workers(*loaders) -> None:
    """Stop the persistent workers of `loaders` now, not whenever the loaders are collected
    (Accelerate holds prepared loaders as long as its Accelerator lives). A loader iterated
    again starts new ones."""
    for loader in loaders:
        if isinstance(loader, StreamLoader):
            loader.release()
            continue
        loader = getattr(loader, "base_dataloader", loader)  # under Accelerate's wrapper
        iterator = getattr(loader, "_iterator", None)  # torch keeps persistent workers here
        if iterator is not None:
            iterator._shutdown_workers()  # what its __del__ calls; there is no public call
            loader._iterator = None


def eval_loader(dataset, cfg, workers: int) -> DataLoader:
    """Ordered batches of an evaluated split."""
    return DataLoader(dataset, batch_size=cfg.eval_batch_size or cfg.batch_size,
                      collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())  # fmt: skip


def stream_readers(workers: int, processes: int, shards: int, say: bool) -> int:
    """Data-loader workers per process for a stream: each reads its own shards, so at most
    shards / processes of them (fewer shards than processes is an error)."""
    if shards < processes:
        raise UserError(
            f"the training stream has {shards} shard(s) for {processes} processes; each process "
            "reads shards of its own: write the data in more shards, or train on fewer processes"
        )
    fitting = min(workers, shards // processes)
    if say and fitting < workers:
        print(f"data loader: {fitting} workers per process, not {workers}: {shards} shard(s) "
              f"shared by {processes} process(es)")  # fmt: skip
    return fitting


def streamed_training(recipe: Recipe, cfg, data, transform, accelerator: Accelerator,
                      workers: int) -> StreamLoader:  # fmt: skip
    """The loader of a streamed training split (`data.stream`) on this process."""
    processes = accelerator.num_processes
    workers = stream_readers(workers, processes, len(data.stream.shards),
                             accelerator.is_main_process)  # fmt: skip
    dataset = StreamedTaskDataset(data.stream, data.encoder, transform,
                                  batch_size=cfg.batch_size, seed=recipe.seed,
                                  shuffle_buffer=recipe.data.shuffle_buffer,
                                  bad_images=recipe.data.bad_images,
                                  process=accelerator.process_index, processes=processes,
                                  readers=max(workers, 1))  # fmt: skip
    return StreamLoader(dataset, cfg.steps_per_epoch * cfg.grad_accum, workers, accelerator.device)


class StreamLoader:
    """An epoch of a streamed training split on this process: `len(self)` batches (the
    recipe's steps per epoch, times its accumulation), from data-loader workers each reading
    its own shards (data/stream_dataset.py).

    One data loader serves epoch after epoch (the stream never ends; its workers stay, so an
    epoch starts where the last ended without reading anything again), dealing batch `j` of the
    run to reader `j % readers`. `skipping(n)` starts `n` batches into an epoch: a new loader
    whose readers start at their next batch, reading past the rows before it without decoding
    them, so a resumed run trains on the batches an uninterrupted one would have. Its state
    (processes and readers) is checkpointed: a run resumes exactly only with that layout.
    """

    def __init__(self, dataset: StreamedTaskDataset, batches: int, workers: int, device,
                 first: int = 0, live: dict | None = None) -> None:  # fmt: skip
        self.dataset, self.batches, self.workers, self.device = dataset, batches, workers, device
        self.epoch, self.first = 0, first
        self._live = {} if live is None else live  # the running loader, shared with `skipping`

    def __len__(self) -> int:
        return self.batches - self.first

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skipping(self, batches: int) -> StreamLoader:
        later = StreamLoader(self.dataset, self.batches, self.workers, self.device, batches,
                             self._live)  # fmt: skip
        later.epoch = self.epoch
        return later

    def __iter__(self):
        from accelerate.utils import send_to_device

        readers, live = self.dataset.readers, self._live
        start = self.epoch * self.batches + self.first  # batches of the run before this one
        if live.get("taken") != start:  # not where the running loader is: start one there
            live.clear()  # (the old one's workers stop)
            # The loader deals to worker 0 first: it plays the reader of batch `start`.
            plays = [(w + start) % readers for w in range(readers)]
            self.dataset.start = {w: (r, reader_batches(start, readers, r))
                                  for w, r in enumerate(plays)}  # fmt: skip
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                pin_memory=torch.cuda.is_available())  # fmt: skip
            live.update(batches=iter(loader), taken=start)
        for _ in range(len(self)):
            batch = next(live["batches"])
            # Batch j of the run is batch j // readers of reader j % readers.
            taken = live["taken"]
            if tuple(batch.pop("reader")) != (taken % readers, taken // readers):
                raise RuntimeError("stream batches arrived out of order; cannot resume exactly")
            live["taken"] += 1
            yield send_to_device(batch, self.device, non_blocking=True)

    def release(self) -> None:
        """Stop the running loader's workers (dropping its iterator stops them)."""
        self._live.clear()

    def state_dict(self) -> dict:
        return {"processes": self.dataset.processes, "readers": self.dataset.readers}

    def load_state_dict(self, state: dict) -> None:
        saved, now = (state["processes"], state["readers"]), tuple(self.state_dict().values())
        if saved != now:
            raise UserError(
                f"this run streamed with {saved[0]} process(es) x {saved[1]} reader(s) each, and "
                f"would resume with {now[0]} x {now[1]}, which reads the shards in another "
                f"order; resume with {saved[0]} process(es) and data.num_workers: "
                f"{saved[1] if saved[1] > 1 else '0 or 1'} to continue exactly"
            )


def auto_batch_size(model, cfg, input_size, accelerator: Accelerator):
    """Halve the per-device batch until a training step fits in memory; accumulate gradients to
    keep the global batch. The probe's effects on weights and statistics are undone."""
    from accelerate.utils import find_executable_batch_size

    model.to(accelerator.device)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @find_executable_batch_size(starting_batch_size=cfg.batch_size)
    def probe(batch_size: int) -> int:
        model.zero_grad(set_to_none=True)
        outputs = model(torch.randn(batch_size, *input_size, device=accelerator.device))
        sum(out.float().mean() for out in outputs.values()).backward()
        return batch_size

    try:
        fitted = probe()
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    if accelerator.num_processes > 1:
        # Ranks may fit different sizes (other memory in use); all must take the same one, or
        # their accumulation windows (and DDP's all-reduces) would fall out of step.
        sizes = accelerator.gather(torch.tensor([fitted], device=accelerator.device))
        fitted = int(sizes.min())
    accumulation = cfg.grad_accum * math.ceil(cfg.batch_size / fitted)
    accelerator.gradient_accumulation_steps = accumulation
    if accelerator.is_main_process:
        print(
            f"auto batch size: {fitted} per device, {accumulation} accumulation steps (train.batch_size {cfg.batch_size}, the smallest that fits on every process)"
        )
    return dataclasses.replace(cfg, batch_size=fitted, grad_accum=accumulation)
