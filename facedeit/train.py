"""Train one recipe: data, model, optimizer, loop; writes the run folder.

steps.csv gets one row per update: loss, lr, gradient norm, images/s and
data wait time. epochs.csv gets val loss, top-1, top-5 and balanced accuracy
per epoch, and eval_batches.csv the timing of each eval batch. A checkpoint is
written after every epoch, and `resume=True` continues from the last one with
the same batches and random draws as an uninterrupted run.
"""

import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from facedeit.data import build_loaders, build_mixup, device_batch_size, read_split
from facedeit.distributed import World, barrier, gather_objects, mean_over_ranks, pick_device
from facedeit.io import write_csv_atomic, write_json_atomic
from facedeit.models import build_model
from facedeit.optim import build_optimizer, build_scheduler, build_train_loss, schedule_lengths
from facedeit.recipes import Recipe, Resolved, resolve
from facedeit.runs import environment, file_sha256, now_utc, read_run_info, run_name, same_recipe_values
from facedeit.timing import BatchTimer

log = logging.getLogger(__name__)

# The first updates after a start include allocator and kernel warm-up; they
# are flagged in steps.csv and left out of throughput figures.
WARMUP_STEPS = 3


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite loss at update `step` (numbered from 1, as in steps.csv)."""

    def __init__(self, step: int, value: float, rows: list[dict]):
        super().__init__(f"loss is {value} at update {step}")
        self.step = step
        self.value = value
        self.rows = rows  # the epoch's updates before it


class RunExistsError(RuntimeError):
    """A run folder that cannot be used as it is: unfinished without resume, or trained on
    another split.csv or other recipe values."""


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_step(model, images, targets, optimizer, loss_fn, device, params, clip_grad=None,
               accum_steps: int = 1) -> tuple:
    """Run one update: forward, backward, optional clipping, optimizer step.

    With `accum_steps` > 1 the batch is split into that many micro-batches
    whose gradients add up to the gradient of the whole batch; a
    DistributedDataParallel model synchronises only after the last one.
    Returns (loss tensor, gradient norm before clipping). Training and the
    benchmarks both call this function, so they time the same work.
    """
    from timm.utils import dispatch_clip_grad

    if accum_steps == 1:
        with autocast_for(device):
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    else:
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, images, targets, loss_fn, device, accum_steps)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if clip_grad is not None:
        dispatch_clip_grad(params, value=clip_grad, mode="norm")
    optimizer.step()
    return loss, grad_norm


def accumulate_gradients(model, images, targets, loss_fn, device, accum_steps: int) -> torch.Tensor:
    """Back-propagate the batch in `accum_steps` micro-batches; return the loss of the whole batch.

    Each micro-batch loss is weighted by its share of the images, so the
    summed gradients equal those of one pass over the batch for any model
    without batch statistics. BatchNorm normalises each micro-batch on its own.
    """
    from torch.nn.parallel import DistributedDataParallel

    image_parts, target_parts = images.chunk(accum_steps), targets.chunk(accum_steps)
    total = torch.zeros((), device=images.device)
    for index, (part_images, part_targets) in enumerate(zip(image_parts, target_parts)):
        last = index == len(image_parts) - 1
        defer_sync = isinstance(model, DistributedDataParallel) and not last
        with model.no_sync() if defer_sync else nullcontext():
            with autocast_for(device):
                part_loss = loss_fn(model(part_images), part_targets)
            share = len(part_images) / len(images)
            (part_loss * share).backward()
        total = total + part_loss.detach().float() * share
    return total


def uses_channels_last(model, device: torch.device) -> bool:
    """CNNs run channels_last on CUDA; the transformers (which have `blocks`) do not."""
    return device.type == "cuda" and not hasattr(getattr(model, "module", model), "blocks")


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, mixup, device, epoch, first_update,
                    clip_grad=None, progress=None, warmup_steps=0, world: World = World(),
                    accum_steps: int = 1) -> list[dict]:
    """Run one epoch of updates and return one row per update.

    `first_update` is the number of updates done before this epoch; the
    scheduler is stepped after each update with the new count. Loss and
    images are counted over all ranks. Raises NonFiniteLoss on a NaN or
    infinite loss, on every rank alike.
    """
    model.train()
    timer = BatchTimer(device)
    channels_last = uses_channels_last(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    update = first_update
    data_start = time.perf_counter()
    for images, targets in loader:
        data_ms = (time.perf_counter() - data_start) * 1000.0
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        lr = optimizer.param_groups[0]["lr"]

        timer.start()
        loss, grad_norm = train_step(model, images, targets, optimizer, loss_fn, device, params, clip_grad,
                                     accum_steps)
        step_ms = timer.stop()

        loss_value = mean_over_ranks(loss, world)
        images_done = len(images) * world.size
        if not np.isfinite(loss_value):
            raise NonFiniteLoss(update + 1, loss_value, rows)
        update += 1
        scheduler.step_update(num_updates=update)
        rows.append({
            "epoch": epoch, "step": update, "lr": lr, "loss": loss_value, "grad_norm": float(grad_norm),
            "images": images_done, "step_ms": step_ms, "data_ms": data_ms,
            "images_per_s": images_done / (step_ms / 1000.0), "warmup": len(rows) < warmup_steps,
        })
        if progress is not None:
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", img_s=f"{rows[-1]['images_per_s']:.0f}")
        data_start = time.perf_counter()
    return rows


@torch.inference_mode()
def evaluate(model, loader, device, num_classes: int, epoch: int = 0,
             world: World = World()) -> tuple[dict, list[dict]]:
    """Return (val metrics, per-batch timing rows): loss, top-1, top-5 (top-k when
    there are fewer than 5 classes) and balanced accuracy, accuracies in percent.

    Under torchrun each rank evaluates its share of the val images and the
    metrics are computed over all of them; timing rows are this rank's.
    """
    model.eval()
    timer = BatchTimer(device)
    channels_last = uses_channels_last(model, device)
    k = min(5, num_classes)
    loss_sum, correct1, correctk, count = 0.0, 0, 0, 0
    predictions, labels, batches = [], [], []
    for batch, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        timer.start()
        with autocast_for(device):
            logits = model(images)
        ms = timer.stop()
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        topk = logits.topk(k, dim=1).indices
        correct1 += (topk[:, 0] == targets).sum().item()
        correctk += (topk == targets[:, None]).any(dim=1).sum().item()
        count += len(targets)
        predictions.append(topk[:, 0].cpu())
        labels.append(targets.cpu())
        batches.append({"epoch": epoch, "batch": batch, "images": len(targets), "ms": ms,
                        "images_per_s": len(targets) / (ms / 1000.0)})
    y_pred = torch.cat(predictions).numpy() if predictions else np.zeros(0, dtype=np.int64)
    y_true = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    if world.size > 1:
        shares = gather_objects((loss_sum, correct1, correctk, count, y_pred, y_true), world)
        loss_sum, correct1, correctk, count = (sum(share[i] for share in shares) for i in range(4))
        y_pred = np.concatenate([share[4] for share in shares])
        y_true = np.concatenate([share[5] for share in shares])
    metrics = {
        "val_loss": loss_sum / count,
        "val_top1": 100.0 * correct1 / count,
        # With fewer than 5 people this is top-k over all of them; top5_k records k.
        "val_top5": 100.0 * correctk / count,
        "top5_k": k,
        "val_balanced_acc": 100.0 * balanced_accuracy_score(y_true, y_pred),
        "val_images": count,
    }
    return metrics, batches


def departures_from_recipe(run: Resolved, device: torch.device, world: World = World()) -> list[str]:
    """Describe each way this run differs from the recipe as written."""
    notes = []
    for key, change in run.changes.items():
        used = f"{change['used']:.4g}" if isinstance(change["used"], float) else change["used"]
        if change["recipe"] is None:
            notes.append(f"{key} {used} (profile {run.profile})")
        else:
            notes.append(f"{key} {change['recipe']:g} -> {used} (profile {run.profile})")
    if run.recipe.source and run.recipe.model.img_size != 224:
        notes.append(f"img_size {run.recipe.model.img_size} on face crops; the paper trains at 224 on ImageNet")
    if run.recipe.source:
        notes.append(f"{world.size} process(es) on {device.type}; the paper's batch is spread over several GPUs")
    return notes


def _previous_state(info_file: Path, resume: bool, split_sha: str, run: Resolved) -> tuple[dict | None, dict | None]:
    """Return (run.json of an earlier attempt, its newest checkpoint), or raise RunExistsError.

    An earlier attempt counts only if it used the same split.csv and the
    same resolved recipe. Otherwise the folder must be removed first, so that
    a report cannot show old data under a new recipe. A finished or diverged
    run comes back with no checkpoint and is not trained again. An
    unfinished one needs `resume`.
    """
    if not info_file.is_file():
        return None, None
    info = read_run_info(info_file)
    run_dir = info_file.parent
    if info["data"]["split_sha256"] != split_sha:
        raise RunExistsError(f"{run_dir}: was trained on another split.csv; remove the folder or pass another "
                             "--results folder to train on the new data")
    if not same_recipe_values(info["resolved"]["recipe"], run.to_dict()["recipe"]):
        raise RunExistsError(f"{run_dir}: was trained with other recipe values; remove the folder or pass another "
                             "--results folder to train the changed recipe")
    if info["status"] in ("finished", "diverged"):
        return info, None
    if not resume:
        raise RunExistsError(f"{run_dir}: an unfinished run exists; pass --resume to continue it or remove the folder")
    return info, _latest_checkpoint(run_dir / "checkpoints")


def train_recipe(recipe: Recipe, crops_dir: Path, results_dir: Path, profile: str = "quick", seed: int = 0,
                 resume: bool = False, device: str | torch.device | None = None, progress: bool = True,
                 keep_checkpoints: int = 3, recipe_file: str | None = None, world: World | None = None,
                 accum_steps: int = 1) -> dict:
    """Train `recipe` under `profile` and write its run folder; return its run.json content.

    A finished run is returned as it is. An unfinished one is continued when
    `resume` is set and otherwise raises RunExistsError, so nothing trained is
    overwritten. A non-finite loss ends the run with status "diverged".
    Under torchrun (`world` from facedeit.distributed.init_world) every rank
    trains and only rank 0 writes; the recipe's batch is the global batch.
    """
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    world = world or World()
    main_rank = world.is_main
    run = resolve(recipe, profile)
    run_dir = Path(results_dir) / "runs" / run_name(recipe.name, profile, seed)
    ckpt_dir = run_dir / "checkpoints"
    info_file = run_dir / "run.json"
    dev = device if isinstance(device, torch.device) else pick_device(device)

    # ---- data
    data = read_split(crops_dir, run.max_people, run.max_images_per_person)
    split_sha = file_sha256(Path(crops_dir) / "split.csv")
    loaders = build_loaders(data, run, world.size, world.rank, accum_steps)
    steps_per_epoch = len(loaders.train)

    # ---- the run folder: refuse to overwrite, or pick up where it stopped
    previous, state = _previous_state(info_file, resume, split_sha, run)
    # Every rank reads the folder before rank 0 writes to it.
    barrier(world)
    if previous is not None and previous["status"] in ("finished", "diverged"):
        log.info("%s: already %s; skipping", run_dir, previous["status"])
        return previous
    start_epoch = state["epoch"] + 1 if state else 0

    # ---- model, optimizer, schedule, loss
    seed_everything(seed)
    cfg = recipe.model
    model = build_model(cfg.name, data.num_classes, cfg.img_size, cfg.dropout, cfg.drop_path_rate,
                        cfg.drop_path_mode, cfg.checkpoint).to(dev)
    if uses_channels_last(model, dev):
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, run)
    scheduler = build_scheduler(optimizer, run, steps_per_epoch)
    loss_fn = build_train_loss(run)
    mixup = build_mixup(run, data.num_classes)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        log.info("%s: resuming after epoch %d", run_dir, state["epoch"])
    train_model = model
    if world.size > 1:
        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    counts = data.train["label"].value_counts()
    info = {
        "run": run_dir.name, "recipe": recipe.name, "recipe_file": recipe_file, "profile": profile, "seed": seed,
        "status": "running", "epochs_done": start_epoch, "resolved": run.to_dict(),
        "schedule_updates": {"steps_per_epoch": steps_per_epoch, **schedule_lengths(run, steps_per_epoch)},
        "distributed": {"world_size": world.size, "accum_steps": accum_steps,
                        "device_batch_size": device_batch_size(run.batch_size, world.size, accum_steps)},
        "departures": departures_from_recipe(run, dev, world),
        "model": {"name": cfg.name, "parameters": sum(p.numel() for p in model.parameters()),
                  "drop_path_mode": cfg.drop_path_mode},
        "data": {"crops_dir": str(Path(crops_dir).resolve()), "split_sha256": split_sha,
                 "num_classes": data.num_classes, "train_images": len(data.train), "val_images": len(data.val),
                 "chance_top1": 100.0 / data.num_classes,
                 "majority_top1": 100.0 * (data.val["label"] == counts.idxmax()).mean()},
        "env": environment(dev), "started": previous["started"] if previous else now_utc(),
        "resumed": now_utc() if previous else None, "finished": None, "diverged_at_step": None,
    }

    def save_info(**changes) -> None:
        info.update(changes)
        if main_rank:
            write_json_atomic(info_file, info)

    save_info()
    steps = _read_rows(run_dir / "steps.csv", start_epoch)
    epochs = _read_rows(run_dir / "epochs.csv", start_epoch)
    evals = _read_rows(run_dir / "eval_batches.csv", start_epoch)

    # ---- the loop
    bar = tqdm(total=run.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, unit="step",
               desc=run_dir.name, disable=not (progress and main_rank), dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, run.epochs):
            seed_everything(seed * 1000 + epoch + 7_919 * world.rank)
            loaders.set_epoch(seed, epoch)
            epoch_start = time.perf_counter()
            rows = train_one_epoch(train_model, loaders.train, optimizer, scheduler, loss_fn, mixup, dev, epoch,
                                   epoch * steps_per_epoch, recipe.clip_grad, bar,
                                   WARMUP_STEPS if epoch == start_epoch else 0, world, accum_steps)
            train_s = time.perf_counter() - epoch_start
            metrics, eval_rows = evaluate(model, loaders.val, dev, data.num_classes, epoch, world)
            frame = pd.DataFrame(rows)
            epochs.append({"epoch": epoch, "train_loss": frame["loss"].mean(),
                           "train_images_per_s": frame.loc[~frame["warmup"], "images_per_s"].median(),
                           "train_s": train_s, "lr_end": optimizer.param_groups[0]["lr"], **metrics})
            steps.extend(rows)
            evals.extend(eval_rows)
            if main_rank:
                _save_checkpoint(ckpt_dir, epoch, model, optimizer, scheduler, keep_checkpoints)
                _write_tables(run_dir, steps, epochs, evals)
                bar.write(f"{run_dir.name} epoch {epoch}: train loss {epochs[-1]['train_loss']:.4f}, "
                          f"val top-1 {metrics['val_top1']:.2f}%, balanced {metrics['val_balanced_acc']:.2f}%")
            save_info(epochs_done=epoch + 1)
    except NonFiniteLoss as err:
        log.warning("%s: diverged: %s", run_dir.name, err)
        if main_rank:
            _write_tables(run_dir, steps + err.rows, epochs, evals)
        save_info(status="diverged", diverged_at_step=err.step, finished=now_utc())
        return info
    except KeyboardInterrupt:
        save_info(status="stopped", stopped=now_utc())
        raise
    except BaseException:
        save_info(status="failed", stopped=now_utc())
        raise
    finally:
        bar.close()

    save_info(status="finished", finished=now_utc())
    return info


def _read_rows(path: Path, before_epoch: int) -> list[dict]:
    """Rows of an earlier attempt's CSV for the epochs that its checkpoints cover."""
    if before_epoch == 0 or not path.is_file():
        return []
    frame = pd.read_csv(path)
    return frame[frame["epoch"] < before_epoch].to_dict("records")


def _write_tables(run_dir: Path, steps: list, epochs: list, evals: list) -> None:
    write_csv_atomic(run_dir / "steps.csv", pd.DataFrame(steps))
    write_csv_atomic(run_dir / "epochs.csv", pd.DataFrame(epochs))
    write_csv_atomic(run_dir / "eval_batches.csv", pd.DataFrame(evals))


def _save_checkpoint(ckpt_dir: Path, epoch: int, model, optimizer, scheduler, keep: int) -> None:
    """Write epoch_NNN.pt atomically, then delete all but the newest `keep` checkpoints."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"epoch_{epoch:03d}.pt"
    for stale in ckpt_dir.glob("*.pt.tmp"):  # left by a process killed while saving
        stale.unlink()
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp)
    tmp.replace(path)
    for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep]:
        old.unlink()


def _latest_checkpoint(ckpt_dir: Path) -> dict | None:
    found = sorted(ckpt_dir.glob("epoch_*.pt"))
    if not found:
        return None
    return torch.load(found[-1], map_location="cpu", weights_only=False)
