"""The HPT training loop that every Ray Train worker runs, for any of the three stages.

CPU: the model is wrapped in DDP over gloo (``ray.train.torch.prepare_model``). GPU: the same
loop hands the model to DeepSpeed with a ZeRO config and bf16. Either way:

* each worker reads only its own shards of the stage's instruction dataset;
* every ``checkpoint_every`` steps rank 0 reports a resumable checkpoint (trainable weights,
  optimizer, scheduler, step); after a worker failure Ray restarts the group and the loop
  resumes from the last one it finds;
* at the end rank 0 evaluates best-choice rank-1 on held-out identities and reports the final
  model as a ``save_pretrained`` directory under ``model/`` of the last checkpoint.
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from pydantic import BaseModel, Field
from transformers import Qwen2VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from chatreid.data.instructions import InstructionSample
from chatreid.model import save_checkpoint
from chatreid.model.vision_cache import VisionCache
from chatreid.tuning.collate import ImageLoader, collate, encode_sample
from chatreid.tuning.evaluate import evaluate_best_choice
from chatreid.tuning.stages import prepare_stage_model, rule_for

STATE_FILE = "train_state.pt"
FINAL_DIR = "model"
DEEPSPEED_TAG = "state"  # not "latest": DeepSpeed writes a file by that name beside the tag dir


class HPTConfig(BaseModel):
    """One stage's training recipe (what the manifest records as ``config``)."""

    stage: int = Field(ge=1, le=3)
    base_model: str = "offline-default"
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=1, ge=1, description="samples per worker per step")
    lr: float = 2e-5
    encoder_lr: float | None = Field(default=None, description="None: same as lr")
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_steps: int | None = Field(
        default=None, description="cap on optimizer steps (micro configs)")
    grad_clip: float = 1.0
    no_vision_cache: bool = Field(
        default=False, description="recompute the frozen encoder every step (the reference path; "
        "the cache gives the same loss)")
    seed: int = 0
    log_every: int = 5


def total_steps(cfg: HPTConfig, num_samples: int, world_size: int) -> int:
    """Same on every rank, so DDP ranks never wait on a peer that already stopped."""
    steps = cfg.epochs * math.ceil(num_samples / (world_size * cfg.batch_size))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def batch_indices(cfg: HPTConfig, step: int, n_local: int) -> list[int]:
    """The rank's samples for ``step``: a fresh permutation per epoch, deterministic by seed."""
    per_epoch = max(1, math.ceil(n_local / cfg.batch_size))
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n_local)
    picks = [offset * cfg.batch_size + j for j in range(cfg.batch_size)]
    return [int(order[p % n_local]) for p in picks]


def lr_lambda(cfg: HPTConfig, steps: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def param_groups(model: torch.nn.Module, cfg: HPTConfig) -> list[dict[str, Any]]:
    encoder, decoder = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (encoder if ".visual." in f".{name}" else decoder).append(p)
    groups = [{"params": decoder, "lr": cfg.lr}]
    if encoder:
        groups.append({"params": encoder, "lr": cfg.encoder_lr or cfg.lr})
    return groups


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def deepspeed_config(cfg: HPTConfig, zero_stage: int, bf16: bool) -> dict[str, Any]:
    """ZeRO config for the GPU path; optimizer and schedule stay the loop's own (one recipe)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


class StageTrainer:
    """One worker's training state for a stage; ``run`` is the whole loop."""

    def __init__(
        self,
        cfg: HPTConfig,
        samples: list[InstructionSample],
        eval_samples: list[InstructionSample],
        load: ImageLoader,
        parent_dir: Path | None,
        *,
        deepspeed: bool,
        zero_stage: int,
        bf16: bool,
        checkpoint_every: int,
    ) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg, self.samples, self.eval_samples, self.load = cfg, samples, eval_samples, load
        self.rule = rule_for(cfg.stage)
        self.checkpoint_every = checkpoint_every
        self.use_deepspeed, self.bf16 = deepspeed, bf16
        torch.manual_seed(cfg.seed)
        self.model, self.processor = prepare_stage_model(cfg.stage, cfg.base_model, parent_dir)
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.steps = total_steps(cfg, sum_over_ranks(len(samples)), self.world)
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(param_groups(self.model, cfg),
                                           weight_decay=cfg.weight_decay)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, self.steps)
        )
        self.engine = self._wrap(zero_stage)
        self.step = 0
        # A frozen encoder computes each crop once (the cache is dropped if it ever trains).
        self.vision_cache = None if self.rule.train_encoder or cfg.no_vision_cache \
            else VisionCache(self.model)

    # --- setup ---------------------------------------------------------------------------

    def _wrap(self, zero_stage: int) -> Any:  # a DeepSpeedEngine or the DDP-wrapped model
        if self.use_deepspeed:
            import deepspeed

            # DeepSpeed's wrappers replace the torch optimizer and schedule (its engine steps
            # them); its hints predate torch's public LRScheduler
            engine, self.optimizer, _, self.scheduler = deepspeed.initialize(  # pyright: ignore[reportAttributeAccessIssue]
                model=self.model,
                optimizer=self.optimizer,
                lr_scheduler=self.scheduler,  # pyright: ignore[reportArgumentType]
                config=deepspeed_config(self.cfg, zero_stage, self.bf16),
            )
            return engine
        return ray.train.torch.prepare_model(self.model)

    @property
    def core(self) -> Qwen2VLForConditionalGeneration:
        """The bare model under the DDP/DeepSpeed wrapper."""
        return getattr(self.engine, "module", self.engine)

    # --- checkpoints -----------------------------------------------------------------------

    def restore(self) -> bool:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as d:
            if self.use_deepspeed:
                _, client = self.engine.load_checkpoint(d, tag=DEEPSPEED_TAG)
                self.step = int(client["step"])
            else:
                state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
                self.core.load_state_dict(state["model"], strict=False)
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
                self.step = int(state["step"])
        if self.vision_cache is not None:
            self.vision_cache.check(self.core)
        return True

    def _save_state(self, directory: Path) -> None:
        if self.use_deepspeed:  # collective: every rank writes its ZeRO shards
            self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG,
                                        client_state={"step": self.step})
            return
        if self.rank == 0:
            torch.save({
                "model": trainable_state(self.core),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
            }, directory / STATE_FILE)

    def report(self, metrics: dict[str, float], *, final: bool = False) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            self._save_state(d)
            if final and self.rank == 0:
                save_checkpoint(self.core, self.processor, d / FINAL_DIR)
            has_files = any(d.iterdir())
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None
            )

    # --- training --------------------------------------------------------------------------

    def train_step(self) -> tuple[float, int]:
        idx = batch_indices(self.cfg, self.step, len(self.samples))
        encoded = [encode_sample(self.samples[i], self.processor, self.load, self.rule)
                   for i in idx]
        batch = collate(encoded, self.pad_id)
        inputs = self._to_device(batch)
        if self.vision_cache is not None and "pixel_values" in inputs:
            inputs = self._cached_vision(inputs, idx, encoded)
        # DeepSpeed casts the model to bf16 itself; plain DDP autocasts on its own device.
        with torch.autocast(inputs["input_ids"].device.type, dtype=torch.bfloat16,
                            enabled=self.bf16 and not self.use_deepspeed):
            loss = self.engine(**inputs).loss
        if self.use_deepspeed:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.core.parameters() if p.requires_grad], self.cfg.grad_clip
            )
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss.detach()), len(idx)

    def _cached_vision(self, inputs: dict[str, torch.Tensor], idx: list[int],
                       encoded: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Swap the batch's pixels for the cached encoder outputs of its crops (the same order
        ``collate`` concatenated them in)."""
        assert self.vision_cache is not None  # train_step calls this only with a cache
        feats: list[torch.Tensor] = []
        param = next(self.core.parameters())
        for i, enc in zip(idx, encoded, strict=True):
            if "pixel_values" not in enc:
                continue
            keys = [f"{path}|{self.rule.stage}" for path in self.samples[i].images]
            feats += self.vision_cache.features(
                self.core, keys, enc["pixel_values"].to(param.device, param.dtype),
                enc["image_grid_thw"].to(param.device))
        out: dict[str, Any] = {k: v for k, v in inputs.items() if k != "pixel_values"}
        out["mm_encoder_outputs"] = {
            # Qwen2-VL's image features are one tensor per image (as get_image_features returns)
            "image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}  # pyright: ignore[reportArgumentType]
        return out

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        param = next(self.core.parameters())
        out = {k: v.to(param.device) for k, v in batch.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(param.dtype)
        return out

    def run(self) -> None:
        resumed_from = self.step if self.restore() else 0
        self.core.train()
        window: list[float] = []
        first_loss: float | None = None
        t0, seen, busy = time.perf_counter(), 0, 0.0
        while self.step < self.steps:
            t_step = time.perf_counter()
            loss, n = self.train_step()
            busy += time.perf_counter() - t_step
            seen += n
            first_loss = loss if first_loss is None else first_loss
            window.append(loss)
            done = self.step == self.steps
            metrics = {
                "step": self.step, "steps": self.steps, "loss": float(np.mean(window)),
                "first_loss": first_loss, "resumed_from_step": resumed_from,
                "samples_per_s": seen * self.world / (time.perf_counter() - t0),
                "train_samples_per_s": seen * self.world / busy,  # without checkpoint uploads
                "vision_cache_hits": float(self.vision_cache.hits if self.vision_cache else 0),
                "peak_rss_mib": peak_rss_mib(),
            }
            if done:
                metrics.update(self.final_metrics())
                self.report(metrics, final=True)
            elif self.step % self.checkpoint_every == 0:
                self.report(metrics)
                window = []
            elif self.step % self.cfg.log_every == 0:
                ray.train.report(metrics)
                window = []
            if self.rank == 0 and (done or self.step % self.cfg.log_every == 0):
                self._progress(metrics)

    def _progress(self, m: dict[str, float]) -> None:
        """One line per log interval (worker stdout reaches the driver's console)."""
        print(f"[stage {self.cfg.stage}] step {m['step']}/{m['steps']} loss {m['loss']:.3f} "
              f"{m['samples_per_s']:.2f} samples/s rss {m['peak_rss_mib']:.0f} MiB", flush=True)

    def final_metrics(self) -> dict[str, float]:
        if self.rank != 0 or not self.eval_samples:
            return {}
        scores = evaluate_best_choice(
            self.core, self.processor, self.eval_samples, self.load, rule_for(3)
        )
        return {f"eval/{k}": v for k, v in scores.items()}


def sum_over_ranks(n: int) -> int:
    """Total samples across workers (all-reduce), so every rank agrees on the step count."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())
