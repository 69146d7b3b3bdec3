"""KDConfig: every knob of a distillation run, validated at construction.

Sources, highest priority first: explicit arguments (the CLI passes its flags this way), environment
variables `CONCH_KD_<FIELD>` (nested: `CONCH_KD_LORA__RANK=32`), the TOML file (`config/kd.toml` in the
working directory, or `KDConfig.load(config_file=...)`, or `CONCH_KD_CONFIG_FILE`), then defaults.
Out-of-range values, unknown keys and malformed TOML fail with the field, the value and what is allowed.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from conch_dna.inputs import read_input

DEFAULT_CONFIG_FILE = Path("config/kd.toml")
CONFIG_MAX_BYTES = 1 << 20  # a settings file; anything larger is not one
DEFAULT_OUTPUT_DIR = Path("models/distilled_neurons/adapters_kd")
LORA_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

_config_file: ContextVar[Path | None] = ContextVar("kd_config_file", default=None)


# The learning rate when none is given, by the adapter's start: one that starts from the teacher's residual
# is already close, and larger steps undo the start (docs/benchmarks.md, alpha 1, 3 seeds: held-out KL 0.107 at
# 2e-4, 0.070 at 5e-5, from 0.087 at the start); from a zero start 2e-4 was the best of 2e-4, 5e-4 and 1e-3.
LEARNING_RATE = {"residual": 5e-5, "zero": 2e-4}


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the source, key and what to do."""


class LoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r")
    scale: float = Field(2.0, gt=0.0, le=100.0, description="LoRA output scale (mlx-lm's `scale`, i.e. alpha/r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    num_layers: int = Field(-1, ge=-1, description="adapt the last N transformer blocks; -1 = all (auto-detected)")
    keys: list[str] = Field(default_factory=lambda: list(LORA_KEYS), min_length=1,
                            description="module paths inside a block that get LoRA (attention and MLP by default)")
    # "residual": start each adapter as the calibrated rank-r correction of the student's difference from the
    # teacher (lora_init.py; the default 4-bit student's held-out KL 0.255 -> 0.082 before training);
    # "zero": mlx-lm's start (B = 0, a no-op); "auto": residual when the student is a same-shaped copy.
    init: Literal["auto", "residual", "zero"] = Field("auto", description="how the adapter starts")


class GenerationConfig(BaseModel):
    """How the teacher writes responses to the domain prompts."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1, le=32768, description="length of the teacher's answers, in tokens")
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling of the teacher's answers")
    batch_size: int = Field(8, ge=1, le=1024, description="prompts the teacher answers at once")
    system_prompt: str | None = Field(None, description="optional system message for the chat template")


class KDConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONCH_KD_", env_nested_delimiter="__", extra="forbid", validate_default=True,
    )

    # Models
    teacher_model_id: str = Field("default-teacher", description="EGO teacher: model folder or hub id")
    student_model_id: str = Field("default-student", description="CORTEX base student: model folder or hub id")
    output_dir: Path = Field(DEFAULT_OUTPUT_DIR, description="folder of the adapters: one subfolder per domain")

    # The objective: alpha * T^2 * divergence(teacher_T, student_T) + (1 - alpha) * CE
    temperature: float = Field(2.0, ge=0.5, le=10.0, description="T: both distributions are softened as "
                               "softmax(logits / T); the KD term is scaled by T^2")
    # 0.7: from the default student's residual start (lora.init), the lowest repetition of the neuron's own
    # answers at nearly the lowest held-out KL (docs/benchmarks.md, 3 seeds: KL 0.078, repetition 0.061; alpha 1:
    # 0.073, 0.098; 0.3: 0.177, 0.084). From a zero start alpha 0.3 loops least (0.080 against 0.111).
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="loss = alpha * KD + (1 - alpha) * cross-entropy on "
                         "the teacher's tokens")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = Field(
        "forward_kl", description="the KD term: KL(teacher||student), KL(student||teacher), generalized JSD or "
        "total variation")
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd only: 0 = forward KL, 1 = reverse KL")

    # Teacher targets: online dense (exact) or cached top-k (computed once, reusable across temperatures/alphas).
    on_policy_lambda: float = Field(
        0.0, ge=0.0, le=1.0, description="share of training sequences whose response the current student writes "
        "(scored by the teacher online), as in GKD; needs teacher_targets = online")
    # Against loops (docs/design.md, "The loop terms"): the student's own answers show where it
    # loops; the teacher scores them. On tokens that repeat a 4-gram of their answer, the student learns the
    # teacher as decoded under a no-repeat rule, and an unlikelihood term (Welleck et al. 2019) pushes the
    # repeat down. Measured on 60 held-out prompts: repetition 0.082 -> 0.047 (SFT 0.068), KL 0.079 -> 0.098
    # at weight 0.5. Weight 1 is the default: with it all six domains' neurons pass the quality gate on the
    # CPU, with 0.5 five (docs/benchmarks.md, "All six domains"). Answers to prompts only: corpus text is left
    # as it is.
    own_answers: Literal["auto", "on", "off"] = Field(
        "auto", description="before its first step, the student answers the training prompts greedily (as users "
        "see it answer); those answers join the training data, scored by the teacher. auto: on with online "
        "targets, a shared tokenizer and no corpus (text)")
    unlikelihood: float = Field(
        1.0, ge=0.0, le=100.0, description="weight of the unlikelihood term -log(1 - p) on answer tokens that "
        "repeat a 4-gram earlier in the same answer (per response token, like KD and CE); 0 = off")
    no_repeat_teacher: bool = Field(
        True, description="on answer tokens that repeat a 4-gram of their answer, learn the teacher as decoded "
        "under a no-repeat rule (that token's teacher logit lowered by 20) and skip CE")
    teacher_targets: Literal["cache", "online"] = Field(
        "online", description="online: teacher forward every step, exact dense targets (default); cache: top-k "
        "computed once, an approximation (docs/benchmarks.md gives its error)")
    top_k: int = Field(64, ge=1, le=4096, description="teacher_targets = cache: logits kept per position")

    # Different tokenizers (detected automatically): KD on exactly-mapped tokens + ULD on the remainder.
    uld_weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of the sorted-probability (ULD) term "
                              "on tokens without a counterpart in the other vocabulary")
    uld_top_k: int = Field(64, ge=1, le=4096, description="largest unmapped probabilities compared by ULD")

    # Corpus KD: the teacher scores real text (no generation) besides, or instead of, its domain answers.
    text: Path | None = Field(None, description="a text file or a folder of text files for corpus KD; None = off")
    text_share: float = Field(
        0.5, ge=0.0, le=1.0, description="with text: share of training sequences taken from the corpus (the rest "
        "are the domain's teacher answers); 1 = corpus only, no teacher generation")
    text_max_tokens: int | None = Field(None, ge=2, description="read at most this many corpus tokens")
    text_val_windows: int = Field(8, ge=0, le=100000, description="corpus windows held out for validation")

    # Held-out evaluation: the neuron's own greedy answers to the domain's `held_out` prompts
    eval_max_new_tokens: int = Field(64, ge=0, le=4096, description="answer length on held-out prompts; 0 = "
                                     "skip the held-out evaluation")

    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    # Optimisation
    # None: LEARNING_RATE[start], by how the adapter starts (lora.init; `learning_rate_for`)
    learning_rate: float | None = Field(None, gt=0.0, le=1.0, description="AdamW's peak learning rate; None = "
                                         "5e-5 from a residual start, 2e-4 from a zero start")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "cosine", description="decay of the learning rate after warm-up, to 10% of it at the last step")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, ge=0.0, description="clip the global gradient norm; 0 = off")
    batch_size: int = Field(4, ge=1, le=4096, description="sequences per optimizer step")
    grad_accumulation: int = Field(1, ge=1, le=1024, description="micro-batches a step's batch is split into "
                                   "(same result, less memory)")
    iters: int = Field(100, ge=1, le=1_000_000_000, description="optimizer steps")
    max_seq_length: int = Field(512, ge=8, le=131072, description="tokens per training sequence (prompt + "
                                "answer); longer ones are cut")

    # Memory and speed
    loss_impl: Literal["fused", "reference"] = Field(
        "fused", description="fused: chunked loss from hidden states, never full-vocabulary logits; reference: plain")
    loss_chunk_size: int = Field(1024, ge=1, le=1 << 20, description="token positions per chunk of the fused loss")
    grad_checkpoint: bool = Field(False, description="recompute blocks' activations in the backward pass")
    grad_checkpoint_every: int = Field(
        1, ge=1, description="with grad_checkpoint, recompute every k-th block only (1 = all blocks; 2 = every "
        "other block: about half the activation memory saved, for half the recompute time)")
    grad_checkpoint_scope: Literal["block", "mlp"] = Field(
        "block", description="with grad_checkpoint, what a checkpointed block recomputes: block = all of it "
        "(least memory); mlp = only its feed-forward part, most of a block's activations for the cost of its "
        "matmuls (no attention, norms or LoRA recomputed)")
    grad_checkpoint_whole_blocks: int = Field(
        0, ge=0, le=100_000, description="with grad_checkpoint_scope = 'mlp': the first this many recomputed "
        "blocks are recomputed whole instead (all of them when larger): memory between the two scopes, for less "
        "recompute time than recomputing every block whole")
    lean_backward: Literal["auto", "on", "off"] = Field(
        "auto", description="frozen RMSNorms skip their weight's gradient and SwiGLU MLPs recompute their sigmoid "
        "in the backward pass instead of keeping it (lean.lean_backward): same values, less memory and GPU "
        "time; auto = on a GPU (on 2 CPU cores no gain was measurable)")
    teacher_pass_tokens: int = Field(
        4096, ge=1, description="the online teacher's forward runs on groups of whole rows of at most this many "
        "tokens (at least one row), each evaluated before the next: bounds its transient memory")
    compile_step: Literal["auto", "on", "off"] = Field(
        "auto", description="mx.compile the student's forward/backward + loss: auto = on a GPU, off on the CPU")
    teacher_prefetch: Literal["auto", "on", "off"] = Field(
        "auto", description="run the online teacher's pass for the next micro-batch on its own stream while the "
        "student trains on this one: auto = on, except with on-policy sequences (whose next batch is not known)")
    memory_limit_gb: float | None = Field(
        None, gt=0.0, le=1e6, allow_inf_nan=False, description="cap MLX's memory during training (mx.set_memory_limit): past it MLX waits for "
        "running work to free its temporaries instead of allocating more; None = MLX's default")
    teacher_states_memory_gb: float = Field(
        1.0, ge=0.0, le=1e6, allow_inf_nan=False, description="online targets: keep the teacher's final hidden "
        "states of the fixed training and validation examples in memory when they fit in this many GB, so that "
        "only the first epoch runs the teacher (exact; not with on-policy sequences or a text corpus); 0 = off")
    memory_budget_gb: float | None = Field(
        None, gt=0.0, le=1e6, allow_inf_nan=False, description="fit the training step into this many GB: the "
        "fastest checkpointing, loss chunk, memory limit and micro-batch whose estimated peak fits are chosen "
        "(they replace those settings; the batch the optimizer sees stays); None = the settings as given")
    memory_preflight: bool = Field(True, description="refuse settings whose estimated peak memory does not fit")

    # Validation and checkpoints
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of prompts held out for validation")
    val_interval: int = Field(25, ge=1, description="validate every this many steps (and after the last)")
    checkpoint_interval: int = Field(50, ge=1, description="save a resumable checkpoint every this many steps")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept; older ones are removed")
    seed: int = Field(0, ge=0, description="seed of the batch order, the split and LoRA's start: a step's batch "
                      "is a function of (seed, step), so a resumed run is the same run")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _resolve_config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: str | os.PathLike | None = None, **overrides) -> KDConfig:
        """Build a config from `config_file` (or the default file) plus explicit `overrides`.

        Raises `ConfigError` with a readable message instead of pydantic's or tomllib's exceptions.
        """
        if config_file is not None and not Path(config_file).exists():
            raise ConfigError(f"config file {config_file} does not exist")
        token = _config_file.set(Path(config_file) if config_file is not None else None)
        try:
            return cls(**overrides)
        except ValidationError as e:
            raise ConfigError(describe_validation_error(e, _resolve_config_file())) from e
        finally:
            _config_file.reset(token)

    @model_validator(mode="after")
    def _on_policy_needs_online(self):
        if self.on_policy_lambda > 0 and self.teacher_targets != "online":
            raise ValueError("on_policy_lambda > 0 needs teacher_targets = 'online' (cached targets cannot score "
                             "sequences the student writes during training)")
        return self

    @model_validator(mode="after")
    def _own_answers_need_online(self):
        if self.own_answers == "on" and self.teacher_targets != "online":
            raise ValueError("own_answers = 'on' needs teacher_targets = 'online' (cached targets cover the "
                             "teacher's answers only, not the ones the student writes); use 'auto' or 'off'")
        return self

    @model_validator(mode="after")
    def _own_answers_not_with_text(self):
        if self.own_answers == "on" and self.text is not None:
            raise ValueError("own_answers = 'on' cannot be combined with text (corpus KD streams its windows; the "
                             "student's answers are for prompt-only training); use 'auto' or 'off'")
        return self

    @model_validator(mode="after")
    def _text_needs_online(self):
        if self.text is not None and self.teacher_targets != "online":
            raise ValueError("text (corpus KD) needs teacher_targets = 'online': the teacher scores each corpus "
                             "window as it is trained on")
        return self

    @model_validator(mode="after")
    def _whole_blocks_need_the_mlp_scope(self):
        if self.grad_checkpoint_whole_blocks and self.grad_checkpoint_scope != "mlp":
            raise ValueError("grad_checkpoint_whole_blocks only applies with grad_checkpoint_scope = 'mlp' (with "
                             "'block' every recomputed block is recomputed whole already); set the scope or drop it")
        return self

    @model_validator(mode="after")
    def _prefetch_needs_known_batches(self):
        if self.teacher_prefetch == "on" and self.on_policy_lambda > 0:
            raise ValueError("teacher_prefetch = 'on' cannot be combined with on_policy_lambda > 0 (the next batch "
                             "holds sequences the student has not written yet); use 'auto' or 'off'")
        return self

    def updated(self, **changes) -> KDConfig:
        """A copy with `changes`, validated as any configuration is (pydantic's model_copy would not)."""
        try:
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValidationError as e:
            raise ConfigError(describe_validation_error(e)) from e

    def learning_rate_for(self, residual_start: bool) -> float:
        """`learning_rate`, or when unset the default for how the adapter starts (LEARNING_RATE)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return LEARNING_RATE["residual" if residual_start else "zero"]

    def lora_parameters(self) -> dict:
        """The `lora_parameters` dict of mlx-lm's adapter_config.json."""
        return {"rank": self.lora.rank, "scale": self.lora.scale, "dropout": self.lora.dropout, "keys": list(self.lora.keys)}


def _resolve_config_file() -> Path | None:
    path = _config_file.get()
    if path is None and (env := os.environ.get("CONCH_KD_CONFIG_FILE")):
        path = Path(env)
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            tomllib.loads(read_input(path, "config file", CONFIG_MAX_BYTES, ConfigError).decode("utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}. Fix the syntax or pass another --config.") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    return path


def describe_validation_error(e: ValidationError, config_file: Path | None = None) -> str:
    """One line per problem: the field, the value given, and what is allowed."""
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown setting {field!r} (check the spelling; `python -m conch_dna.training.kd --help` lists them)")
        else:
            lines.append(f"{field} = {err.get('input')!r}: {err['msg']}")
    where = f" (sources: arguments, CONCH_KD_* environment, {config_file})" if config_file else ""
    return "invalid KD configuration" + where + ":\n  " + "\n  ".join(lines)


@dataclass(frozen=True)
class FieldInfo:
    """What the CLI and the reference say of one KDConfig field (`lora.rank` for a nested one)."""

    name: str
    type: type
    choices: tuple | None
    default: object
    bounds: str
    description: str

    @property
    def metavar(self) -> str | None:
        return None if self.choices else self.name.rpartition(".")[2].upper()

    @property
    def help(self) -> str:
        extra = [f"default {self.default}"] + ([self.bounds] if self.bounds else [])
        return f"{self.description} ({'; '.join(extra)})"


def config_fields(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every settable field's dotted name, nested sections (lora, generation) expanded."""
    model = model or KDConfig
    names = []
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            names += config_fields(f.annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def field_info(name: str) -> FieldInfo:
    """Type, choices, default, range and description of a KDConfig field, from its declaration."""
    model: type[BaseModel] = KDConfig
    *sections, last = name.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    f = model.model_fields[last]
    annotation = f.annotation
    if get_origin(annotation) is not Literal and type(None) in get_args(annotation):  # X | None
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    choices = get_args(annotation) if get_origin(annotation) is Literal else None
    kind = str if choices or annotation is Path else annotation
    default = f.get_default(call_default_factory=True)
    bounds = []
    for m in f.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr)}")
    if not f.description:
        raise AssertionError(f"KDConfig field {name} has no description")  # the CLI and reference need one
    return FieldInfo(name, kind, choices, default, ", ".join(bounds), f.description)
