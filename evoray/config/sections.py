"""The job's config sections: one dataclass per stage, and :class:`Config`, the whole job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from evoray.config.fields import _f, _Stage
from evoray.config.selectors import (
    SELECTOR_SETTINGS,
    AttrDivSettings,
    DiversitySettings,
    EvoSelectSettings,
    TsdsSettings,
)
from evoray.errors import ConfigError

__all__ = ["Config", "FeaturesConfig", "SelectConfig", "TrainConfig", "GenerateConfig",
           "EvolveConfig", "SweepConfig", "SELECT_METHODS", "GENERATORS"]

SELECT_METHODS = ("evoselect", "random", "attribution", "diversity", "attr_div", "tsds")
GENERATORS = ("simulated", "pool", "hf", "vllm")


@dataclass
class FeaturesConfig(_Stage):
    """Per-sample LoRA-gradient features (LESS-style), computed on Ray Data actors."""

    section: ClassVar[str] = "features"
    dim: int | None = _f(None, "projection dimension; null = 8192 on GPU (LESS), 1024 on CPU")
    lora_r: int = _f(8, "rank of the proxy's fresh LoRA (LESS uses 8)")
    lora_alpha: float = _f(32.0, "LoRA alpha; the scale is alpha / r")
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"],
                                   "modules that get LoRA matrices")
    max_length: int = _f(512, "tokens per (prompt, response); prompts are cut from the left")
    batch_size: int = _f(16, "samples per forward/backward (Ray Data needs an int)")
    num_actors: int = _f(1, "feature actors in the pool (ActorPoolStrategy size)")
    num_gpus: float = _f(0.0, "GPUs per actor (0 on CPU)")
    num_cpus: float = _f(1.0, "CPUs per actor; fractional (e.g. 0.5) on a small local machine")
    threads: int | None = _f(None, "torch threads per actor; null = num_cpus rounded (at least "
                             "1). Features are bit-identical only between runs with equal threads")
    adam: bool = _f(False, "precondition candidate gradients with a saved Adam state (LESS)")
    seed: int = _f(0, "seed of the Rademacher projection")
    dtype: Literal["float32", "float16"] = _f("float32", "storage type of the feature column")
    bf16: bool = _f(False, "bfloat16 autocast of the proxy's forward and backward (GPU, or a CPU "
                    "with AVX512-BF16 or AMX, where it about halves the time); the per-sample "
                    "gradients are formed and projected in float32. Moves a SmolLM2 feature "
                    "by 4% (median; benchmarks/features.py --bf16)")
    on_bad: Literal["error", "skip"] = _f(
        "error", "a candidate whose response does not fit max_length: fail naming it, or skip it "
        "(counted in the log and in meta.json)")
    proj_block_mb: float = _f(64.0, "size of one generated block of the projection matrix")
    proj_cache_mb: float = _f(2048.0, "keep projection blocks in memory up to this total; beyond, "
                              "regenerate them for every pass (memory stays at one block)")
    proj_batch_mb: float = _f(2048.0, "per-sample gradients held for one projection pass: each "
                              "pass walks the whole projection matrix, so more rows a pass "
                              "regenerate the uncached blocks less often (at least one batch)")

    def _check(self) -> None:
        self._require(self.dim is None or self.dim > 0, "dim", "must be positive")
        self._require(self.lora_r > 0, "lora_r", "must be positive")
        self._require(self.lora_alpha > 0, "lora_alpha", "must be positive")
        self._require(len(self.target_modules) > 0, "target_modules", "needs at least one name")
        self._require(self.max_length >= 2, "max_length", "must be at least 2")
        self._require(self.batch_size > 0, "batch_size", "must be positive")
        self._require(self.num_actors > 0, "num_actors", "must be positive")
        self._require(self.num_gpus >= 0, "num_gpus", "must be >= 0")
        self._require(self.num_cpus > 0, "num_cpus", "must be positive")
        self._require(self.threads is None or self.threads > 0, "threads", "must be positive")
        self._require(self.proj_block_mb > 0, "proj_block_mb", "must be positive")
        self._require(self.proj_cache_mb >= 0, "proj_cache_mb", "must be >= 0")
        self._require(self.proj_batch_mb > 0, "proj_batch_mb", "must be positive")


@dataclass
class SelectConfig(_Stage):
    """Selection of a budget of candidates; see docs/algorithms.md §3-4. (Target subtask
    labels for ``attribution``/``attr_div``, ``subtasks=``, are data, not settings: Python API
    only, :func:`evoray.select.select`.)"""

    section: ClassVar[str] = "select"
    method: Literal[SELECT_METHODS] = _f("evoselect", "selector: " + ", ".join(SELECT_METHODS))
    ratio: float = _f(0.1, "budget as a share of the pool, in (0, 1]; ignored when k is set")
    k: int | None = _f(None, "budget as a count; overrides ratio")
    lam: float = _f(0.25, "EvoSelect trade-off: 0 = pure OT alignment, 1 = pure diversity")
    blocks: int = _f(10, "EvoSelect blocks: OT is re-solved on the uncovered targets after each")
    eps: float = _f(0.01, "entropic regularisation of the OT (on centred cosine costs)")
    tau: float = _f(0.01, "KL penalty on the relaxed candidate marginal")
    seed: int = _f(0, "seed of randomised selectors and tie-breaking")
    backend: Literal["local", "sharded"] = _f(
        "local", "local: read every feature onto the driver; sharded: Ray actors each hold "
        "some features files and the driver only per-target vectors and the picks "
        "(evoselect, tsds, attribution, random; docs/algorithms.md §3.8)")
    shards: int | None = _f(None, "actors of backend=sharded; null = one per 500,000 "
                            "candidates (at most one per features file)")
    evoselect: EvoSelectSettings = field(default_factory=EvoSelectSettings,
                                         metadata={"help": "EvoSelect's other settings"})
    tsds: TsdsSettings = field(default_factory=TsdsSettings, metadata={"help": "TSDS"})
    diversity: DiversitySettings = field(default_factory=DiversitySettings,
                                         metadata={"help": "Diversity"})
    attr_div: AttrDivSettings = field(default_factory=AttrDivSettings,
                                      metadata={"help": "Attr-Div"})
    # keys that are gone, and where their settings went (an old config gets this hint)
    moved: ClassVar[dict[str, str]] = {
        "params": "each selector's settings are typed fields: select.evoselect.*, select.tsds.*, "
                  "select.diversity.*, select.attr_div.* (e.g. select.evoselect.novelty=knn)"}

    def method_params(self) -> dict:
        """The keyword arguments of :func:`evoray.select.select` for ``method``: EvoSelect's
        ``lam``, ``blocks``, ``eps``, ``tau`` and its other settings, or the method's own."""
        import dataclasses

        if self.method == "evoselect":
            return {"lam": self.lam, "blocks": self.blocks, "eps": self.eps, "tau": self.tau,
                    **dataclasses.asdict(self.evoselect)}
        name = SELECTOR_SETTINGS.get(self.method)
        return dataclasses.asdict(getattr(self, name)) if name else {}

    def _check(self) -> None:
        self._require(0.0 < self.ratio <= 1.0, "ratio", "must be in (0, 1]")
        self._require(self.k is None or self.k > 0, "k", "must be positive")
        self._require(0.0 <= self.lam <= 1.0, "lam", "must be in [0, 1]")
        self._require(self.blocks > 0, "blocks", "must be positive")
        self._require(self.eps > 0, "eps", "must be positive")
        self._require(self.tau > 0, "tau", "must be positive")
        self._require(self.shards is None or self.shards > 0, "shards", "must be positive")
        sharded = ("evoselect", "tsds", "attribution", "random")
        self._require(self.backend == "local" or self.method in sharded, "backend",
                      f"sharded runs {', '.join(sharded)} only; {self.method} clusters the "
                      "whole pool: use backend=local")
        self._require(self.backend == "local" or self.method != "evoselect"
                      or self.evoselect.alignment == "mass", "backend",
                      "sharded aligns by OT mass only; evoselect.alignment=lava needs "
                      "backend=local")


@dataclass
class TrainConfig(_Stage):
    """LoRA fine-tuning on Ray Train (TorchTrainer, DDP)."""

    section: ClassVar[str] = "train"
    lr: float = _f(2e-4, "peak learning rate (AdamW)")
    epochs: int = _f(3, "passes over the selection; ignored when max_steps is set")
    max_steps: int | None = _f(None, "optimizer steps; overrides epochs")
    batch_size: int = _f(8, "samples per worker per step")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    warmup_ratio: float = _f(0.03, "share of steps with linear warm-up")
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "learning-rate decay")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    bf16: bool = _f(False, "bfloat16 autocast of the forward and backward (GPU, or a CPU with "
                         "AVX512-BF16 or AMX, where it about halves a step's time; slower on "
                         "other CPUs); the LoRA weights and optimizer stay float32")
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory")
    max_length: int = _f(512, "tokens per example; prompts are cut from the left")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout while training")
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "LoRA targets")
    seed: int = _f(0, "seed of data order, dropout and LoRA init")
    num_workers: int = _f(0, "Ray Train workers; 0 = in-process local mode")
    use_gpu: bool = _f(False, "one GPU per worker")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per Ray Train worker; fractional (e.g. 0.5) "
                                "on a small local machine")
    checkpoint_every: int = _f(0, "steps between checkpoints; 0 = at each epoch's end only")
    num_to_keep: int = _f(2, "checkpoints kept in storage_path")
    max_failures: int = _f(0, "worker-group restarts allowed (FailureConfig)")
    storage_path: str | None = _f(None, "checkpoint storage (local path or s3:// / gs:// URI); "
                                  "null = ~/ray_results")
    on_overflow: Literal["error", "skip"] = _f(
        "error", "an example whose response does not fit max_length: fail naming it, or skip it "
        "(counted in the result)")
    max_grad_norm: float = _f(1.0, "gradient clipping; 0 = off")
    loss: Literal["ce", "gce"] = _f(
        "ce", "per-token loss on the response: cross-entropy, or the generalized cross-entropy "
        "(1 - p^q) / q of Zhang & Sabuncu (2018), which weighs each token's gradient by p^q "
        "(p: the model's probability of the label) so labels the model disagrees with pull less")
    gce_q: float = _f(0.7, "q of loss=gce, in (0, 1]: 1 is mean absolute error, q -> 0 is "
                           "cross-entropy")
    early_stop_patience: int = _f(
        0, "local mode: score each epoch's adapter on the multiple-choice targets (for stopping "
        "only, never trained on), stop after this many epochs without a better score and keep "
        "the best epoch's adapter; 0 = off (train every epoch, keep the last)")

    def _check(self) -> None:
        self._require(self.lr > 0, "lr", "must be positive")
        self._require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")
        self._require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        self._require(0.0 < self.gce_q <= 1.0, "gce_q", "must be in (0, 1]")
        self._require(self.early_stop_patience >= 0, "early_stop_patience", "must be >= 0")
        self._require(not (self.early_stop_patience and self.num_workers), "early_stop_patience",
                      "needs local mode (num_workers=0)")
        self._require(self.epochs > 0, "epochs", "must be positive")
        self._require(self.max_steps is None or self.max_steps > 0, "max_steps", "must be > 0")
        self._require(self.batch_size > 0, "batch_size", "must be positive")
        self._require(self.grad_accum > 0, "grad_accum", "must be positive")
        self._require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        self._require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._require(self.max_length >= 2, "max_length", "must be at least 2")
        self._require(self.lora_r > 0, "lora_r", "must be positive")
        self._require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        self._require(self.num_workers >= 0, "num_workers", "must be >= 0")
        self._require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        self._require(self.num_to_keep > 0, "num_to_keep", "must be positive")
        self._require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = no limit)")


@dataclass
class GenerateConfig(_Stage):
    """Where each round's candidates come from."""

    section: ClassVar[str] = "generate"
    kind: Literal[GENERATORS] = _f("simulated", "generator: " + ", ".join(GENERATORS))
    task: str = _f("arithmetic", "built-in task family the simulated generator writes for")
    preset: Literal["weak", "strong"] = _f("weak", "simulated generator's noise mix")
    pool_size: int = _f(2000, "candidates per round")
    path: str | None = _f(None, "pool file(s) for kind=pool: one file, or a pattern with {round}")
    model: str | None = _f(None, "generator model for kind=hf/vllm; null = the model being trained")
    seed: int = _f(0, "seed of the generator (round r uses seed + r)")
    shots: int = _f(4, "hf/vllm: target examples shown in each few-shot prompt")
    max_new_tokens: int = _f(96, "hf/vllm: tokens generated per candidate at most")
    temperature: float = _f(0.8, "hf/vllm: sampling temperature (0 = greedy)")
    top_p: float = _f(0.95, "hf/vllm: nucleus sampling mass")
    batch_size: int = _f(16, "hf/vllm: prompts per generation batch")
    num_actors: int = _f(1, "hf/vllm: generation actors (Ray Data ActorPoolStrategy size)")
    num_gpus: float = _f(0.0, "hf/vllm: GPUs per actor (0 on CPU)")
    num_cpus: float = _f(1.0, "hf: CPUs per actor; fractional (e.g. 0.5) on a small machine")
    engine_kwargs: dict[str, Any] = _f({}, "vllm: further vLLM engine arguments "
                                       "(e.g. max_model_len, tensor_parallel_size)")

    def _check(self) -> None:
        self._require(self.pool_size > 0, "pool_size", "must be positive")
        self._require(self.shots >= 0, "shots", "must be >= 0")
        self._require(self.max_new_tokens > 0, "max_new_tokens", "must be positive")
        self._require(self.temperature >= 0, "temperature", "must be >= 0")
        self._require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._require(self.batch_size > 0, "batch_size", "must be positive")
        self._require(self.num_actors > 0, "num_actors", "must be positive")
        self._require(self.num_gpus >= 0, "num_gpus", "must be >= 0")
        self._require(self.num_cpus > 0, "num_cpus", "must be positive")
        if self.kind == "pool" and not self.path:
            raise ConfigError("generate.path: required when generate.kind is 'pool'")


@dataclass
class EvolveConfig(_Stage):
    """The round loop: generate → featurize → select → train → evaluate."""

    section: ClassVar[str] = "evolve"
    rounds: int = _f(2, "number of generate → select → train rounds")
    run_dir: str = _f("runs/demo", "where each round's outputs and the manifest go (path or URI)")
    task: str = _f("arithmetic", "built-in task providing targets/dev/test when paths are null")
    targets: str | None = _f(None, "target (validation) records file; null = the built-in task")
    dev: str | None = _f(None, "dev MCQ file for choosing hyper-parameters")
    test: str | None = _f(None, "test MCQ file, for reporting only")
    fixed_proxy: bool = _f(False, "use the round-1 model as proxy in every round")
    replay: bool = _f(False, "also train on earlier rounds' selections")
    eval_actors: int = _f(0, "test evaluation: 0 = in the driver; N = a Ray Data stage of N "
                          "actors (use it when the driver has no GPU, e.g. a CPU head node)")
    eval_gpus: float = _f(0.0, "GPUs per evaluation actor (the actor then scores on CUDA)")
    test_size: int | None = _f(None, "score the base model and each round on the first "
                               "test_size test items; null = all")

    def _check(self) -> None:
        self._require(self.rounds > 0, "rounds", "must be positive")
        self._require(self.test_size is None or self.test_size > 0, "test_size",
                      "must be positive")
        self._require(self.eval_actors >= 0, "eval_actors", "must be >= 0")
        self._require(self.eval_gpus >= 0, "eval_gpus", "must be >= 0")


@dataclass
class SweepConfig(_Stage):
    """Ray Tune sweep over selection and training parameters (``evoray sweep``, evoray.tune).

    Every trial selects from, trains on and is scored with the same shared task, pool and
    features, computed once; only ``select.*`` and ``train.*`` may vary between trials."""

    section: ClassVar[str] = "sweep"
    space: dict[str, Any] = _f({}, "parameter path (select.* or train.*) -> {grid: [...]}, "
                               "{choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} or "
                               "{randint: [lo, hi]}")
    search: Literal["grid", "random", "optuna"] = _f(
        "grid", "grid: every grid point (distributions sampled num_samples times per point); "
        "random: num_samples draws, grids as choices; optuna: the same through Optuna's TPE "
        "(needs the optional optuna package)")
    num_samples: int = _f(1, "samples per grid point (grid) or trials (random/optuna)")
    metric: str = _f("dev_accuracy", "trial metric the scheduler and the best config use: "
                     "dev_accuracy or dev_loss (test metrics are recorded, never optimised)")
    mode: Literal["max", "min"] = _f("max", "whether the metric is maximised")
    scheduler: Literal["fifo", "asha"] = _f("asha", "trial scheduler (ASHA: per-epoch dev metric)")
    grace_period: int = _f(1, "ASHA: epochs every trial trains before it may be stopped")
    reduction_factor: float = _f(2.0, "ASHA: a rung keeps the best 1/reduction_factor of trials")
    max_concurrent_trials: int | None = _f(None, "null = derived from the cluster's resources")
    max_failures: int = _f(1, "retries of a failed trial (Tune FailureConfig); -1 = no limit")
    trial_cpus: float | None = _f(None, "CPUs each trial's own process reserves (selection, "
                                  "evaluation, and training when train.num_workers is 0); "
                                  "null = train.cpus_per_worker")
    resources: dict[str, float] = _f({}, "cluster resources to plan trials for, e.g. {CPU: 64, "
                                     "GPU: 8}; empty = the cluster's when the sweep starts (give "
                                     "them for an autoscaling cluster that starts small)")
    dev_size: int | None = _f(None, "score trials on the first dev_size dev items; null = all")
    test_size: int | None = _f(None, "report test accuracy on the first test_size items; "
                               "null = all")
    sweep_dir: str = _f("runs/sweep", "results, summary and best_config.yaml")
    shared_dir: str | None = _f(None, "task, pool and features shared by every trial; null = "
                                "sweep_dir/shared. Sweeps of one pool and proxy may share one")

    def _check(self) -> None:
        self._require(self.num_samples > 0, "num_samples", "must be positive")
        self._require(self.grace_period > 0, "grace_period", "must be positive")
        self._require(self.reduction_factor > 1, "reduction_factor", "must be > 1")
        self._require(self.max_concurrent_trials is None or self.max_concurrent_trials > 0,
                      "max_concurrent_trials", "must be positive")
        self._require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = no limit)")
        self._require(self.trial_cpus is None or self.trial_cpus >= 0, "trial_cpus",
                      "must be >= 0")
        self._require(self.dev_size is None or self.dev_size > 0, "dev_size", "must be positive")
        self._require(self.test_size is None or self.test_size > 0, "test_size",
                      "must be positive")
        self._require(self.metric in ("dev_accuracy", "dev_loss"), "metric",
                      "dev_accuracy or dev_loss: trials are chosen on the dev split, and test "
                      "metrics are for reporting only")
        for name, amount in self.resources.items():
            if not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0:
                raise ConfigError(f"sweep.resources: {name}: {amount!r} is not a non-negative "
                                  "number")


@dataclass
class Config(_Stage):
    """A whole job: the model, a seed, and one section per stage."""

    model: str = _f("smollm2-135m",
                    "base model: HF folder or hub id, smollm2-135m, tiny-gpt2, tiny-llama")
    cache_dir: str | None = _f(None, "model cache; null = $EVORAY_CACHE or ~/.cache/evoray")
    seed: int = _f(0, "global seed")
    trust_remote_code: bool = _f(False, "let transformers run Python code shipped with a hub "
                                 "model, in every stage (or EVORAY_TRUST_REMOTE_CODE=1); off by "
                                 "default")
    features: FeaturesConfig = field(default_factory=FeaturesConfig, metadata={"help": "features"})
    select: SelectConfig = field(default_factory=SelectConfig, metadata={"help": "selection"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training"})
    generate: GenerateConfig = field(default_factory=GenerateConfig, metadata={"help": "generator"})
    evolve: EvolveConfig = field(default_factory=EvolveConfig, metadata={"help": "round loop"})
    sweep: SweepConfig = field(default_factory=SweepConfig, metadata={"help": "Tune sweep"})
