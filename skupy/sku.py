"""The SKU pipeline: harmful knowledge acquisition, then knowledge negation.

Stage 1 fine-tunes a copy of the model (LoRA adapters or all weights) on

    loss = bad_weight * GD + random_weight * RD + normal_weight * PD

  GD  guided distortion: mean answer-token NLL of harmful answers to harmful questions;
  RD  random disassociation: the same NLL with each harmful question paired with
      K answers drawn from the pool of harmful answers;
  PD  preservation divergence: -KL(p_original || p_current) averaged over the real
      (non-padding) positions of normal question-answer pairs, so minimizing it
      pushes the harmful copy away from the original on normal text.

Stage 2 forms the task vector tau = theta_harmful - theta_original and writes
theta_unlearned = theta_original - lambda * tau.

Where skupy differs from the published SKU code on purpose: answer spans start
at the true first answer token of every sequence (the published code derives
them from padded lengths), PD averages over real tokens only, tied embeddings
are one parameter, and TruthfulQA's "Correct Answers" cell gives one normal
pair per answer.

With LoRA the original model is the base weights with the adapters switched
off, so PD needs no second copy of the model; with full fine-tuning the
original weights are kept as a frozen copy.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .atomic import atomic_folder, atomic_write_text
from .batching import (BatchSampler, PromptTooLongError, encode_pair, encode_pairs, make_kl_batch,
                       make_lm_batch, make_random_disassociation_batch, pad_id_for, split_by_length)
from .data import SKUData, load_sku_data
from .model import Model
from .optim import AdamW, LinearSchedule, clip_grad_norm, global_grad_norm
from .sku_config import SKUConfig
from .task_vector import TaskVector

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"


class TrainingDivergedError(RuntimeError):
    """A loss or gradient became NaN or infinite; the message names the step and the module."""


@dataclass
class SKUResult:
    """Outputs of one SKU run: task vector, unlearned weights, per-step log and held-out NLL."""

    out_dir: Optional[Path]
    task_vector: TaskVector
    unlearned_params: dict
    base_config: object
    log: list = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)


# ----------------------------------------------------------------------
# deterministic per-step randomness, so a resumed run draws what an
# uninterrupted one would


def replay_sampler(num_items: int, batch_size: int, seed, steps_done: int) -> BatchSampler:
    """Return a BatchSampler advanced past the batches of steps_done steps."""
    sampler = BatchSampler(num_items, batch_size, seed)
    for _ in range(steps_done):
        sampler.next_indices()
    return sampler


def step_rng(seed: int, step: int) -> np.random.Generator:
    """Generator for the random answers of 1-based step, independent of earlier steps."""
    return np.random.default_rng([seed, 7919, step])


# ----------------------------------------------------------------------


class SKU:
    """Runs SKU for one config.

    model: None to load config.model, or a (ModelConfig, params, tokenizer)
    tuple already in memory. data: None to load from config.data_dir or
    SKUPY_DATA_DIR, or an SKUData.
    """

    def __init__(self, config: SKUConfig, *, model=None, data: Optional[SKUData] = None,
                 progress: bool = True, recompute: bool = False, eval_pairs: int = 64):
        self.config = config
        self.progress = progress
        self.recompute = recompute
        self.eval_pairs = eval_pairs

        if model is None:
            from .checkpoint import load_checkpoint

            model = load_checkpoint(config.model)
        self.base_config, self.base_params, self.tokenizer = model
        self.data = data if data is not None else load_sku_data(config.data_dir, seed=config.seed)

        self.pad_id = pad_id_for(self.tokenizer)
        self.harmful_pairs, self.harmful = encode_fitting(self.tokenizer, self.data.harmful_train, config)
        self.normal_pairs, self.normal = encode_fitting(self.tokenizer, self.data.normal_train, config)
        if not self.harmful:
            raise ValueError("no harmful training pair fits in max_length; raise max_length")
        if not self.normal:
            raise ValueError("no normal training pair fits in max_length; raise max_length")
        self.answer_pool = self.data.harmful_answer_pool
        if config.num_random_answers > len(self.answer_pool):
            raise ValueError(f"num_random_answers (K) = {config.num_random_answers} is larger than the pool of "
                             f"{len(self.answer_pool)} harmful answers; lower K or add harmful data")

    # ------------------------------------------------------------------
    # model set-up

    def build_model(self) -> Model:
        """Build the model stage 1 trains: LoRA adapters on the base weights, or a full copy."""
        cfg = self.config
        if cfg.lora:
            model_config = self.base_config.replace(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                    lora_targets=tuple(cfg.lora_targets))
            return Model(model_config, self.base_params, recompute=self.recompute, trainable="lora",
                         seed=cfg.seed, tokenizer=self.tokenizer)
        params = {name: array.copy() for name, array in self.base_params.items()}
        return Model(self.base_config, params, recompute=self.recompute, trainable="all",
                     tokenizer=self.tokenizer)

    # ------------------------------------------------------------------
    # one step

    def step(self, model: Model, optimizer: AdamW, step: int, harmful_sampler: BatchSampler,
             normal_sampler: BatchSampler) -> dict:
        """Run one stage-1 step (1-based); returns the logged values."""
        cfg = self.config
        started = time.perf_counter()
        model.zero_grad()
        record = {"step": step}
        tokens_seen = 0

        # GD: harmful answers to their own questions
        harmful_idx = harmful_sampler.next_indices()
        gd_batch = make_lm_batch([self.harmful[i] for i in harmful_idx], self.pad_id)
        record["gd"] = self._accumulate_lm(model, gd_batch, cfg.bad_weight, step, "GD")
        tokens_seen += int(gd_batch["mask"].sum())

        # RD: the same questions, each paired with K random harmful answers
        questions = [self.harmful_pairs[i].question for i in harmful_idx]
        rd_batch, _ = make_random_disassociation_batch(self.tokenizer, questions, self.answer_pool,
                                                       cfg.num_random_answers, step_rng(cfg.seed, step),
                                                       cfg.template, cfg.max_length)
        record["rd"] = self._accumulate_lm(model, rd_batch, cfg.random_weight, step, "RD")
        tokens_seen += int(rd_batch["mask"].sum())

        # PD: -KL(p_original || p_current) on normal pairs
        normal_idx = normal_sampler.next_indices()
        pd_batch = make_kl_batch([self.normal[i] for i in normal_idx], self.pad_id)
        record["pd"] = self._accumulate_pd(model, pd_batch, cfg.normal_weight, step)
        tokens_seen += 2 * int(pd_batch["mask"].sum())

        record["loss"] = (cfg.bad_weight * record["gd"] + cfg.random_weight * record["rd"]
                          + cfg.normal_weight * record["pd"])
        if cfg.grad_clip > 0:
            record["grad_norm"] = clip_grad_norm(model.grads, cfg.grad_clip)
        else:
            record["grad_norm"] = global_grad_norm(model.grads)
        record["lr"] = optimizer.step(model.grads)
        record["tokens"] = tokens_seen
        record["seconds"] = time.perf_counter() - started
        return record

    def _accumulate_lm(self, model: Model, batch: dict, weight: float, step: int, module: str) -> float:
        # Chunks of similar length waste less compute on padding, and their weighted losses add up.
        total = 0.0
        for chunk in split_by_length(batch):
            if weight == 0.0:
                value, _ = model.token_nll(chunk["tokens"], chunk["targets"], chunk["weights"], chunk["mask"],
                                           chunk["positions"])
            else:
                value = model.accumulate_ce(chunk["tokens"], chunk["targets"], chunk["weights"], chunk["mask"],
                                            chunk["positions"], scale=weight)
            total += float(value)
        self._check_finite(model, total, step, module)
        return total

    def _accumulate_pd(self, model: Model, batch: dict, weight: float, step: int) -> float:
        kl = 0.0
        for chunk in split_by_length(batch):
            kl += self._accumulate_kl_chunk(model, chunk, weight)
        pd = -kl
        self._check_finite(model, pd, step, "PD")
        return pd

    def _accumulate_kl_chunk(self, model: Model, chunk: dict, weight: float) -> float:
        tokens, mask, positions = chunk["tokens"], chunk["mask"], chunk["positions"]
        if self.config.lora:
            reference = model.forward(tokens, mask, positions, use_lora=False)
        else:
            reference = model.forward(tokens, mask, positions, params=self._original)
        if weight == 0.0:
            model.run(tokens, mask, positions)
            kl, _ = model.engine.kl_div(reference, chunk["weights"])
        else:
            # PD = -KL, so the gradient of weight * PD is -weight times that of KL.
            kl = model.accumulate_kl(tokens, reference, chunk["weights"], mask, positions, scale=-weight)
        return float(kl)

    @staticmethod
    def _check_finite(model: Model, loss: float, step: int, module: str) -> None:
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"step {step}: the {module} loss is {loss}; lower lr or check the data")
        norm = global_grad_norm(model.grads)
        if not math.isfinite(norm):
            raise TrainingDivergedError(f"step {step}: the gradient became {norm} after the {module} term; "
                                        "lower lr or enable grad_clip")

    # ------------------------------------------------------------------
    # the whole run

    def run(self, out_dir=None, resume: bool = False, save_model: bool = True) -> SKUResult:
        """Run both stages; with out_dir, write the outputs there and resume from its checkpoints."""
        cfg = self.config
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
                raise FileExistsError(f"{out} already has checkpoints of an earlier run; pass resume=True "
                                      "(--resume) to continue it or choose another output folder")

        model = self.build_model()
        if not cfg.lora:
            self._original = self.base_params
        trainable = {name: model.params[name] for name in model.trainable}
        optimizer = AdamW(trainable, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                          weight_decay=cfg.weight_decay, schedule=LinearSchedule(cfg.lr, cfg.max_unlearn_steps))

        start = 0
        log = []
        if resume and out is not None:
            start, log = self._restore(out, model, optimizer)
        elif out is not None:
            (out / "log.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        harmful_sampler = replay_sampler(len(self.harmful), cfg.batch_size, [cfg.seed, 1], start)
        normal_sampler = replay_sampler(len(self.normal), cfg.batch_size, [cfg.seed, 2], start)

        self._train(model, optimizer, start, log, harmful_sampler, normal_sampler, out)

        task_vector = self.task_vector(model)
        unlearned = task_vector.negate_into(self.base_params, cfg.negation_lambda)
        result = SKUResult(out, task_vector, unlearned, self.base_config, log)
        if self.eval_pairs > 0:
            result.evaluation = self.evaluate_nll(unlearned)
        if out is not None:
            self._write_outputs(out, model, result, save_model)
        return result

    def _train(self, model, optimizer, start, log, harmful_sampler, normal_sampler, out) -> None:
        cfg = self.config
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_unlearn_steps, initial=start, desc="SKU stage 1", unit="step",
                       dynamic_ncols=True, file=sys.stderr)
        log_file = open(out / "log.jsonl", "a", encoding="utf-8") if out is not None else None
        try:
            for step in range(start + 1, cfg.max_unlearn_steps + 1):
                record = self.step(model, optimizer, step, harmful_sampler, normal_sampler)
                log.append(record)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if bar is not None:
                    bar.set_postfix(gd=f"{record['gd']:.3f}", rd=f"{record['rd']:.3f}", pd=f"{record['pd']:.3f}",
                                    tok_s=f"{record['tokens'] / record['seconds']:.0f}")
                    bar.update(1)
                elif cfg.log_every and step % cfg.log_every == 0:
                    logger.info("step %d: gd %.4f rd %.4f pd %.4f", step, record["gd"], record["rd"], record["pd"])
                if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(out, model, optimizer, step)
        finally:
            if bar is not None:
                bar.close()
            if log_file is not None:
                log_file.close()

    def task_vector(self, model: Model) -> TaskVector:
        """tau = theta_harmful - theta_original: the merged LoRA delta, or the full weight difference."""
        if self.config.lora:
            lora = {name: model.params[name] for name in model.lora_names()}
            return TaskVector.from_lora(lora, model.config.lora_scale)
        return TaskVector.from_weights(model.params, self.base_params)

    # ------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self, out: Path, model: Model, optimizer: AdamW, step: int) -> Path:
        """Write trainable weights, optimizer moments and the step count atomically."""
        from safetensors.numpy import save_file

        folder = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
        state = optimizer.state_dict()
        with atomic_folder(folder) as tmp:
            save_file({name: model.params[name] for name in model.trainable}, os.fspath(tmp / "trainable.safetensors"))
            moments = {key: value for key, value in state.items() if key != "step_count"}
            save_file(moments, os.fspath(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps({
                "step": step, "optimizer_step": state["step_count"], "config": self.config.to_dict(),
            }, indent=2))
        return folder

    def _restore(self, out: Path, model: Model, optimizer: AdamW):
        from safetensors.numpy import load_file

        folders = sorted((out / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")) if (out / "checkpoints").exists() else []
        folders = [f for f in folders if (f / "state.json").is_file()]
        if not folders:
            logger.info("no checkpoint in %s; starting from step 0", out)
            (out / "log.jsonl").unlink(missing_ok=True)
            return 0, []
        folder = folders[-1]
        state = json.loads((folder / "state.json").read_text())
        saved = SKUConfig.from_dict(state["config"])
        mismatched = [name for name in ("lora", "lora_rank", "lora_targets", "model", "seed", "batch_size",
                                        "num_random_answers", "template", "max_length", "max_unlearn_steps", "lr")
                      if getattr(saved, name) != getattr(self.config, name)]
        if mismatched:
            raise ValueError(f"cannot resume from {folder}: the config differs in {', '.join(mismatched)}")
        for name, array in load_file(os.fspath(folder / "trainable.safetensors")).items():
            np.copyto(model.params[name], array)
        moments = load_file(os.fspath(folder / "optimizer.safetensors"))
        optimizer.load_state_dict({"step_count": state["optimizer_step"], **moments})
        step = int(state["step"])

        # keep only the log lines of the steps the checkpoint contains
        log = []
        log_path = out / "log.jsonl"
        if log_path.exists():
            for line in log_path.read_text().splitlines():
                record = json.loads(line)
                if record["step"] <= step:
                    log.append(record)
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
        logger.info("resuming from %s (step %d)", folder, step)
        return step, log

    # ------------------------------------------------------------------
    # held-out NLL

    def evaluate_nll(self, unlearned: dict) -> dict:
        """Mean answer-token NLL on held-out harmful and normal pairs, original vs unlearned."""
        cfg = self.config
        harmful = encode_pairs(self.tokenizer, self.data.harmful_test[: self.eval_pairs], cfg.template, cfg.max_length)
        normal = encode_pairs(self.tokenizer, self.data.normal_test[: self.eval_pairs], cfg.template, cfg.max_length)
        results = {}
        for label, params in (("original", self.base_params), ("unlearned", unlearned)):
            model = Model(self.base_config, params, trainable=[])
            results[label] = {"harmful_nll": answer_nll(model, harmful, self.pad_id),
                              "normal_nll": answer_nll(model, normal, self.pad_id)}
        results["harmful_nll_change"] = results["unlearned"]["harmful_nll"] - results["original"]["harmful_nll"]
        results["normal_nll_change"] = results["unlearned"]["normal_nll"] - results["original"]["normal_nll"]
        results["pairs"] = {"harmful": len(harmful), "normal": len(normal)}
        return results

    # ------------------------------------------------------------------
    # outputs

    def _write_outputs(self, out: Path, model: Model, result: SKUResult, save_model: bool) -> None:
        from .hf_io import save_hf

        result.task_vector.save(out / "task_vector.safetensors")
        if self.config.lora:
            from safetensors.numpy import save
            from .atomic import atomic_write_bytes

            adapters = {name: model.params[name] for name in model.lora_names()}
            atomic_write_bytes(out / "harmful_lora.safetensors", save(adapters))
        if save_model:
            save_hf(out / "unlearned", self.base_config, result.unlearned_params, self.tokenizer)
        atomic_write_text(out / "evaluation.json", json.dumps(result.evaluation, indent=2))
        atomic_write_text(out / "manifest.json", json.dumps(self.manifest(result), indent=2))
        plot_losses(result.log, out / "loss_curve.png")

    def manifest(self, result: SKUResult) -> dict:
        """Config, data file hashes, package versions and seed of the run."""
        data_files = {}
        root = self.data.data_dir
        if root is not None:
            for relative in ("pku-saferlhf/train.jsonl", "pku-saferlhf/test.jsonl", "truthfulqa/TruthfulQA.csv"):
                path = Path(root) / relative
                if path.is_file():
                    data_files[relative] = sha256_file(path)
        return {
            "skupy_version": __version__,
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            "model": self.config.model,
            "data_dir": str(root) if root is not None else None,
            "data_sha256": data_files,
            "steps": len(result.log),
            "task_vector_norm": result.task_vector.norm(),
            "task_vector_parameters": result.task_vector.num_parameters(),
            "evaluation": result.evaluation,
            "versions": package_versions(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        }


def encode_fitting(tokenizer, pairs: list, config: SKUConfig) -> tuple:
    """Encode pairs, leaving out those whose prompt leaves no room for an answer; returns (pairs, encoded)."""
    kept, encoded = [], []
    for pair in pairs:
        try:
            item = encode_pair(tokenizer, pair.question, pair.answer, config.template, config.max_length)
        except PromptTooLongError:
            continue
        kept.append(pair)
        encoded.append(item)
    if len(kept) < len(pairs):
        logger.warning("left out %d of %d pairs whose prompt does not fit in max_length=%d",
                       len(pairs) - len(kept), len(pairs), config.max_length)
    return kept, encoded


def answer_nll(model: Model, encoded: list, pad_id: int, batch_size: int = 8) -> float:
    """Mean over sequences of the mean NLL of their answer tokens."""
    if not encoded:
        return float("nan")
    total = 0.0
    for first in range(0, len(encoded), batch_size):
        chunk = encoded[first:first + batch_size]
        batch = make_lm_batch(chunk, pad_id)
        value, _ = model.token_nll(batch["tokens"], batch["targets"], batch["weights"], batch["mask"],
                                   batch["positions"])
        total += value * len(chunk)
    return total / len(encoded)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("numpy", "scipy-openblas32", "gguf", "tokenizers", "safetensors", "torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def plot_losses(log: list, path: Path) -> None:
    """Plot GD, RD and PD against the step into a PNG, written atomically."""
    if not log:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_write_bytes
    import io

    steps = [r["step"] for r in log]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label in (("gd", "GD (harmful NLL)"), ("rd", "RD (random-answer NLL)"), ("pd", "PD (-KL)")):
        axis.plot(steps, [r[key] for r in log], label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss term")
    axis.set_title("SKU stage 1: harmful knowledge acquisition")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
