"""Unlearning methods that skupy compares with SKU, all trained by the same C engine.

Every method reuses the SKU class for data, encoding, batch samplers, the
optimizer schedule, checkpoints and output files, so a comparison changes
only the loss. Each step draws one harmful batch and one normal batch from the
same seeded samplers as SKU, so all methods draw the same batches in the
same order. Gradient ascent is Model.accumulate_ce with a negative scale.

Methods that end with negation (sku, its ablations and tv) train a harmful
model and return theta_0 - lambda * tau. Direct methods (ft, ga, ga_mismatch,
llmu, npo) return the trained weights.

    name         loss minimized per step                          ends with
    sku          e1*GD + e2*RD + e3*PD (see skupy.sku)               negation
    sku_no_gd    SKU with e1 = 0                                      negation
    sku_no_rd    SKU with e2 = 0                                      negation
    sku_no_pd    SKU with e3 = 0                                      negation
    tv           e1*GD only: a plain task vector                      negation
    ft           NLL of normal answers (a control, not unlearning)    trained weights
    ga           -NLL of harmful answers                              trained weights
    ga_mismatch  -NLL(harmful) + NLL(harmful question, normal answer) trained weights
    llmu         0.5*(-NLL harmful) + 1*mismatch + 1*KL(p_0 || p)     trained weights
    npo          NPO loss with beta = 0.1 on harmful answers          trained weights

The mismatch term pairs each harmful question of the batch with the same K
(num_random_answers) answers drawn per step from the distinct answers of the
normal training pairs, as LLMU does with TruthfulQA answers. LLMU (Yao et al.
2023, "Large Language Model Unlearning") uses weights 0.5 / 1 / 1 in its
published code (github.com/kevinyaobytedance/llm_unlearn), with lr 2e-6 and
K = 5. Here lr, K, steps, batch size and LoRA come from the shared SKUConfig,
so only the loss differs between methods.

NPO (Zhang et al. 2024, "Negative Preference Optimization") minimizes

    L = (2 / beta) * mean_i softplus(beta * r_i),
    r_i = log p_theta(y_i | x_i) - log p_ref(y_i | x_i),

with sequence log-likelihoods summed over the answer tokens and p_ref the
original model. Its gradient is

    dL/dtheta = (1/B) * sum_i 2 * sigmoid(beta * r_i) * d log p_theta(y_i | x_i)/dtheta
              = -(1/B) * sum_i w_i * d NLL_i/dtheta,   w_i = 2 * sigmoid(beta * r_i),

so one NPO step is gradient ascent on the summed answer NLL with per-sequence
weights w_i computed without gradient from the current and reference NLLs. At
theta = theta_0 every w_i is 1 and the step equals GA on summed NLL; as a
sequence becomes unlikely its weight decays towards 0.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .atomic import atomic_write_bytes, atomic_write_text
from .batching import make_kl_batch, make_lm_batch, make_random_disassociation_batch
from .model import Model
from .optim import AdamW, LinearSchedule, clip_grad_norm, global_grad_norm
from .sku import SKU, SKUResult, replay_sampler
from .sku_config import SKUConfig

logger = logging.getLogger(__name__)

# Seeds the per-step draw of mismatch answers, apart from SKU's random-disassociation draw.
MISMATCH_STREAM = 104729


@dataclass
class MethodResult(SKUResult):
    """Outputs of one method run; unlearned_params are the method's final weights."""

    method: str = ""
    negates: bool = False

    @property
    def final_params(self) -> dict:
        return self.unlearned_params


class MethodMixin:
    """Method name, loss weights and manifest entries shared by both kinds of method.

    ``weights`` overrides entries of ``default_weights``: the loss weights and,
    for NPO, beta. Other keyword arguments go to the SKU constructor.
    """

    name = ""
    summary = ""
    negates = False
    default_weights: dict = {}

    def __init__(self, config: SKUConfig, *, weights: Optional[dict] = None, **kwargs):
        self.weights = resolve_weights(self.name, self.default_weights, weights)
        super().__init__(self.adjust_config(config), **kwargs)

    def adjust_config(self, config: SKUConfig) -> SKUConfig:
        return config

    def manifest(self, result) -> dict:
        manifest = super().manifest(result)
        manifest["method"] = self.name
        manifest["method_summary"] = self.summary
        manifest["negation"] = self.negates
        manifest["method_weights"] = dict(self.weights)
        return manifest

    def as_method_result(self, result: SKUResult) -> MethodResult:
        values = {item.name: getattr(result, item.name) for item in dataclasses.fields(SKUResult)}
        return MethodResult(**values, method=self.name, negates=self.negates)


def resolve_weights(method: str, defaults: dict, overrides: Optional[dict]) -> dict:
    """Return the defaults with overrides applied; unknown names and negative or non-finite values raise ValueError."""
    weights = dict(defaults)
    for key, value in (overrides or {}).items():
        if key not in defaults:
            valid = ", ".join(defaults) if defaults else "none"
            raise ValueError(f"method {method!r} has no weight or setting {key!r}; valid names: {valid}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} of method {method!r} must be a finite number >= 0, got {value}")
        weights[key] = value
    return weights


# ----------------------------------------------------------------------
# SKU and the methods that end with negation


class NegationMethod(MethodMixin, SKU):
    """SKU with some of its loss terms switched off; weights gd, rd and pd set epsilon 1, 2 and 3.

    A weight left out of ``weights`` comes from the config; a term listed in
    ``disabled_terms`` always gets weight 0.
    """

    name = "sku"
    summary = "SKU: GD + RD + PD on a harmful copy, then negation"
    negates = True
    disabled_terms: tuple = ()
    term_fields = {"gd": "bad_weight", "rd": "random_weight", "pd": "normal_weight"}

    def __init__(self, config: SKUConfig, *, weights: Optional[dict] = None, **kwargs):
        defaults = {term: getattr(config, field) for term, field in self.term_fields.items()}
        for term in self.disabled_terms:
            if weights and term in weights:
                raise ValueError(f"method {self.name!r} switches the {term.upper()} term off; "
                                 f"use method 'sku' to set its weight")
            defaults[term] = 0.0
        self.default_weights = defaults
        super().__init__(config, weights=weights, **kwargs)

    def adjust_config(self, config: SKUConfig) -> SKUConfig:
        changes = {self.term_fields[term]: value for term, value in self.weights.items()}
        return dataclasses.replace(config, **changes)

    def run(self, out_dir=None, resume: bool = False, save_model: bool = True) -> MethodResult:
        return self.as_method_result(super().run(out_dir, resume=resume, save_model=save_model))


class SKUNoGD(NegationMethod):
    name = "sku_no_gd"
    summary = "SKU without guided distortion (epsilon 1 = 0)"
    disabled_terms = ("gd",)


class SKUNoRD(NegationMethod):
    name = "sku_no_rd"
    summary = "SKU without random disassociation (epsilon 2 = 0)"
    disabled_terms = ("rd",)


class SKUNoPD(NegationMethod):
    name = "sku_no_pd"
    summary = "SKU without preservation divergence (epsilon 3 = 0)"
    disabled_terms = ("pd",)


class PlainTaskVector(NegationMethod):
    name = "tv"
    summary = "task vector: fine-tune on harmful answers (GD only), then negation"
    disabled_terms = ("rd", "pd")


# ----------------------------------------------------------------------
# direct methods: the trained weights are the result


class DirectMethod(MethodMixin, SKU):
    """A method whose trained weights are its result; subclasses implement accumulate_terms.

    Outputs match SKU's folder except that the weight change theta - theta_0
    is written as weight_delta.safetensors, not task_vector.safetensors,
    because negating it would undo the method.
    """

    loss_terms: tuple = ()

    def __init__(self, config: SKUConfig, *, weights: Optional[dict] = None, **kwargs):
        super().__init__(config, weights=weights, **kwargs)
        self.normal_answer_pool = list(dict.fromkeys(pair.answer for pair in self.normal_pairs))

    def accumulate_terms(self, model: Model, step: int, harmful_idx: np.ndarray, normal_idx: np.ndarray,
                         record: dict) -> int:
        """Add the gradients of the loss terms into model.grads, store the terms and "loss" in record.

        Returns the number of tokens processed.
        """
        raise NotImplementedError

    def step(self, model: Model, optimizer: AdamW, step: int, harmful_sampler, normal_sampler) -> dict:
        """Run one step (1-based); returns the logged values."""
        cfg = self.config
        started = time.perf_counter()
        model.zero_grad()
        record = {"step": step}
        # Both samplers advance every step so all methods see SKU's batches in SKU's order.
        harmful_idx = harmful_sampler.next_indices()
        normal_idx = normal_sampler.next_indices()
        tokens = self.accumulate_terms(model, step, harmful_idx, normal_idx, record)
        if cfg.grad_clip > 0:
            record["grad_norm"] = clip_grad_norm(model.grads, cfg.grad_clip)
        else:
            record["grad_norm"] = global_grad_norm(model.grads)
        record["lr"] = optimizer.step(model.grads)
        record["tokens"] = tokens
        record["seconds"] = time.perf_counter() - started
        return record

    # -- the loss terms ---------------------------------------------------

    def harmful_batch(self, harmful_idx) -> dict:
        return make_lm_batch([self.harmful[i] for i in harmful_idx], self.pad_id)

    def mismatch_batch(self, harmful_idx, step: int) -> dict:
        """Harmful questions of the batch, each paired with the same K random normal answers."""
        cfg = self.config
        questions = [self.harmful_pairs[i].question for i in harmful_idx]
        rng = np.random.default_rng([cfg.seed, MISMATCH_STREAM, step])
        batch, _ = make_random_disassociation_batch(self.tokenizer, questions, self.normal_answer_pool,
                                                    cfg.num_random_answers, rng, cfg.template, cfg.max_length)
        return batch

    def accumulate_normal_kl(self, model: Model, batch: dict, weight: float, step: int) -> float:
        """Add weight * d KL(p_original || p_current) over the real positions of batch; returns the KL."""
        reference = self.reference_logits(model, batch)
        if weight == 0.0:
            model.run(batch["tokens"], batch["mask"], batch["positions"])
            kl, _ = model.engine.kl_div(reference, batch["weights"])
        else:
            kl = model.accumulate_kl(batch["tokens"], reference, batch["weights"], batch["mask"],
                                     batch["positions"], scale=weight)
        self._check_finite(model, float(kl), step, "KL")
        return float(kl)

    def reference_logits(self, model: Model, batch: dict) -> np.ndarray:
        """Logits of the original model: the base weights without adapters, or the frozen copy."""
        if self.config.lora:
            return model.forward(batch["tokens"], batch["mask"], batch["positions"], use_lora=False)
        return model.forward(batch["tokens"], batch["mask"], batch["positions"], params=self._original)

    def reference_token_nll(self, model: Model, batch: dict) -> np.ndarray:
        """Per-position NLL (B, T) of batch["targets"] under the original model."""
        if self.config.lora:
            _, losses = model.token_nll(batch["tokens"], batch["targets"], batch["weights"], batch["mask"],
                                        batch["positions"], use_lora=False)
            return losses
        model.run(batch["tokens"], batch["mask"], batch["positions"], params=self._original)
        _, losses = model.engine.cross_entropy(batch["targets"], batch["weights"])
        return losses

    # -- the run ----------------------------------------------------------

    def run(self, out_dir=None, resume: bool = False, save_model: bool = True) -> MethodResult:
        """Train for max_unlearn_steps; with out_dir, write the outputs there and resume from its checkpoints."""
        cfg = self.config
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            checkpoints = out / "checkpoints"
            if not resume and checkpoints.exists() and any(checkpoints.iterdir()):
                raise FileExistsError(f"{out} already has checkpoints of an earlier run; pass resume=True "
                                      "(--resume) to continue it or choose another output folder")

        model = self.build_model()
        if not cfg.lora:
            self._original = self.base_params
        trainable = {name: model.params[name] for name in model.trainable}
        optimizer = AdamW(trainable, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                          weight_decay=cfg.weight_decay, schedule=LinearSchedule(cfg.lr, cfg.max_unlearn_steps))

        start, log = 0, []
        if resume and out is not None:
            start, log = self._restore(out, model, optimizer)
        harmful_sampler = replay_sampler(len(self.harmful), cfg.batch_size, [cfg.seed, 1], start)
        normal_sampler = replay_sampler(len(self.normal), cfg.batch_size, [cfg.seed, 2], start)

        self._train(model, optimizer, start, log, harmful_sampler, normal_sampler, out)

        weight_delta = self.task_vector(model)
        trained = model.merged_params() if cfg.lora else dict(model.params)
        result = MethodResult(out, weight_delta, trained, self.base_config, log, method=self.name, negates=False)
        if self.eval_pairs > 0:
            result.evaluation = self.evaluate_nll(trained)
        if out is not None:
            self._write_outputs(out, model, result, save_model)
        return result

    def _train(self, model, optimizer, start, log, harmful_sampler, normal_sampler, out) -> None:
        cfg = self.config
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_unlearn_steps, initial=start, desc=self.name, unit="step",
                       dynamic_ncols=True, file=sys.stderr)
        log_file = open(out / "log.jsonl", "a", encoding="utf-8") if out is not None else None
        try:
            for step in range(start + 1, cfg.max_unlearn_steps + 1):
                record = self.step(model, optimizer, step, harmful_sampler, normal_sampler)
                log.append(record)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                terms = " ".join(f"{term} {record[term]:.4f}" for term in self.loss_terms)
                if bar is not None:
                    bar.set_postfix_str(terms)
                    bar.update(1)
                elif cfg.log_every and step % cfg.log_every == 0:
                    logger.info("%s step %d: %s", self.name, step, terms)
                if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(out, model, optimizer, step)
        finally:
            if bar is not None:
                bar.close()
            if log_file is not None:
                log_file.close()

    def _write_outputs(self, out: Path, model: Model, result: MethodResult, save_model: bool) -> None:
        from .hf_io import save_hf

        result.task_vector.save(out / "weight_delta.safetensors")
        if self.config.lora:
            from safetensors.numpy import save

            adapters = {name: model.params[name] for name in model.lora_names()}
            atomic_write_bytes(out / "trained_lora.safetensors", save(adapters))
        if save_model:
            save_hf(out / "unlearned", self.base_config, result.unlearned_params, self.tokenizer)
        atomic_write_text(out / "evaluation.json", json.dumps(result.evaluation, indent=2))
        atomic_write_text(out / "manifest.json", json.dumps(self.manifest(result), indent=2))
        plot_terms(result.log, self.loss_terms, f"{self.name}: loss terms", out / "loss_curve.png")

    def manifest(self, result) -> dict:
        manifest = super().manifest(result)
        # The delta of a direct method is its update, not a task vector to negate.
        manifest["weight_delta_norm"] = manifest.pop("task_vector_norm")
        manifest["weight_delta_parameters"] = manifest.pop("task_vector_parameters")
        return manifest


class FineTune(DirectMethod):
    name = "ft"
    summary = "fine-tune on normal answers only (a control)"
    default_weights = {"normal_nll": 1.0}
    loss_terms = ("normal_nll",)

    def accumulate_terms(self, model, step, harmful_idx, normal_idx, record):
        batch = make_lm_batch([self.normal[i] for i in normal_idx], self.pad_id)
        weight = self.weights["normal_nll"]
        record["normal_nll"] = self._accumulate_lm(model, batch, weight, step, "normal NLL")
        record["loss"] = weight * record["normal_nll"]
        return int(batch["mask"].sum())


class GradientAscent(DirectMethod):
    name = "ga"
    summary = "gradient ascent on harmful answers"
    default_weights = {"ga": 1.0}
    loss_terms = ("harmful_nll",)

    def accumulate_terms(self, model, step, harmful_idx, normal_idx, record):
        batch = self.harmful_batch(harmful_idx)
        weight = self.weights["ga"]
        record["harmful_nll"] = self._accumulate_lm(model, batch, -weight, step, "GA")
        record["loss"] = -weight * record["harmful_nll"]
        return int(batch["mask"].sum())


class GAMismatch(DirectMethod):
    name = "ga_mismatch"
    summary = "gradient ascent on harmful answers plus NLL of random normal answers to harmful questions"
    default_weights = {"ga": 1.0, "mismatch": 1.0}
    loss_terms = ("harmful_nll", "mismatch_nll")

    def __init__(self, config: SKUConfig, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.num_random_answers > len(self.normal_answer_pool):
            raise ValueError(f"num_random_answers (K) = {self.config.num_random_answers} is larger than the "
                             f"{len(self.normal_answer_pool)} distinct normal answers; lower K")

    def accumulate_terms(self, model, step, harmful_idx, normal_idx, record):
        harmful = self.harmful_batch(harmful_idx)
        record["harmful_nll"] = self._accumulate_lm(model, harmful, -self.weights["ga"], step, "GA")
        mismatch = self.mismatch_batch(harmful_idx, step)
        record["mismatch_nll"] = self._accumulate_lm(model, mismatch, self.weights["mismatch"], step, "mismatch")
        record["loss"] = -self.weights["ga"] * record["harmful_nll"] + self.weights["mismatch"] * record["mismatch_nll"]
        return int(harmful["mask"].sum()) + int(mismatch["mask"].sum())


class LLMU(GAMismatch):
    name = "llmu"
    summary = "LLMU (Yao et al. 2023): GA + random mismatch + KL to the original model on normal pairs"
    default_weights = {"ga": 0.5, "mismatch": 1.0, "kl": 1.0}
    loss_terms = ("harmful_nll", "mismatch_nll", "normal_kl")

    def accumulate_terms(self, model, step, harmful_idx, normal_idx, record):
        tokens = super().accumulate_terms(model, step, harmful_idx, normal_idx, record)
        batch = make_kl_batch([self.normal[i] for i in normal_idx], self.pad_id)
        record["normal_kl"] = self.accumulate_normal_kl(model, batch, self.weights["kl"], step)
        record["loss"] += self.weights["kl"] * record["normal_kl"]
        return tokens + 2 * int(batch["mask"].sum())


class NPO(DirectMethod):
    name = "npo"
    summary = "negative preference optimization (Zhang et al. 2024) on harmful answers"
    default_weights = {"npo": 1.0, "beta": 0.1}
    loss_terms = ("npo", "harmful_nll")

    def __init__(self, config: SKUConfig, **kwargs):
        super().__init__(config, **kwargs)
        if self.weights["beta"] <= 0:
            raise ValueError(f"NPO beta must be > 0, got {self.weights['beta']}")

    def sequence_log_ratios(self, model: Model, batch: dict) -> tuple:
        """Return (r, losses): r_i = log p_theta(y_i|x_i) - log p_ref(y_i|x_i) over answer tokens, float64,
        and the current model's per-position NLL (B, T)."""
        answer = batch["weights"] > 0
        reference = (self.reference_token_nll(model, batch) * answer).sum(axis=1, dtype=np.float64)
        _, losses = model.token_nll(batch["tokens"], batch["targets"], batch["weights"], batch["mask"],
                                    batch["positions"])
        current = (losses * answer).sum(axis=1, dtype=np.float64)
        return reference - current, losses

    def npo_loss(self, log_ratios: np.ndarray) -> float:
        beta = self.weights["beta"]
        return float(np.mean(2.0 / beta * np.logaddexp(0.0, beta * log_ratios)))

    def accumulate_terms(self, model, step, harmful_idx, normal_idx, record):
        batch = self.harmful_batch(harmful_idx)
        beta, weight = self.weights["beta"], self.weights["npo"]
        log_ratios, losses = self.sequence_log_ratios(model, batch)
        npo = self.npo_loss(log_ratios)
        sequence_weights = 1.0 + np.tanh(0.5 * beta * log_ratios)  # 2 * sigmoid(beta * r), without overflow
        answer = batch["weights"] > 0
        ce_weights = (answer * (sequence_weights / len(sequence_weights))[:, None]).astype(np.float32)
        if weight != 0.0:
            model.accumulate_ce(batch["tokens"], batch["targets"], ce_weights, batch["mask"], batch["positions"],
                                scale=-weight)
        self._check_finite(model, npo, step, "NPO")

        record["npo"] = npo
        record["harmful_nll"] = float(np.sum(losses * batch["weights"]))
        record["npo_weight_mean"] = float(np.mean(sequence_weights))
        record["loss"] = weight * npo
        return int(batch["mask"].sum())


# ----------------------------------------------------------------------
# registry

METHODS = {cls.name: cls for cls in (NegationMethod, SKUNoGD, SKUNoRD, SKUNoPD, PlainTaskVector,
                                     FineTune, GradientAscent, GAMismatch, LLMU, NPO)}


def get_method(name: str) -> type:
    """Return the method class registered as ``name``; unknown names raise ValueError listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def parse_method_names(text) -> list:
    """Split "sku,ga,tv" (or take a list) into checked method names, keeping order and dropping repeats."""
    names = [part.strip() for part in text.split(",")] if isinstance(text, str) else [str(n) for n in text]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"no method given; valid methods: {', '.join(METHODS)}")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; valid methods: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def build_method(name: str, config: SKUConfig, **kwargs):
    """Create the method ``name`` for ``config``; kwargs go to the SKU constructor (model=, data=, ...)."""
    return get_method(name)(config, **kwargs)


def plot_terms(log: list, terms, title: str, path: Path) -> None:
    """Plot the logged loss terms against the step into a PNG, written atomically."""
    if not log or not terms:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in log]
    figure, axis = plt.subplots(figsize=(7, 4))
    for term in terms:
        axis.plot(steps, [record[term] for record in log], label=term)
    axis.set_xlabel("step")
    axis.set_ylabel("loss term")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
