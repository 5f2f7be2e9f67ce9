"""What `epic demo` runs: the data, the model shape, the training budgets, the arms and their seeds, in one place.

The paper's budgets for LLaVA-1.5's 576 visual tokens map proportionally onto the demo's N tokens
(576 -> N, 192 -> N/3, 128 -> 2N/9, 64 -> N/9, 36 -> N/16); the headline budget is N/9.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from epic.data.shapes import SynthConfig, chance_accuracy
from epic.models.tiny import TinyLlavaSpec

PAPER_BUDGETS = (576, 192, 128, 64, 36)
HEADLINE_BUDGET = 64  # of 576: the paper's main comparison
LOW_BUDGET = 36  # of 576: the smallest, where the paper finds training pays the most


def scaled_budget(image_tokens: int, paper_budget: int) -> int:
    """A budget of LLaVA-1.5 (out of 576 tokens) mapped onto an image of `image_tokens` tokens."""
    return max(1, round(image_tokens * paper_budget / 576))


def scaled_budgets(image_tokens: int) -> list[int]:
    """The paper's budgets mapped onto `image_tokens` (576 -> N, 64 -> N/9, ...), largest first."""
    return [scaled_budget(image_tokens, budget) for budget in PAPER_BUDGETS]


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of a demo run; `report.md` records it whole.

    Two stages, as LLaVA-1.5's: stage 1 (the stand-in for the projector's pretraining on top of a pretrained LLM)
    teaches the tiny model to see and to speak at full tokens on captions and a question type other than the
    scored one, once, cached; stage 2 (instruction tuning) teaches the scored question, under each arm's
    compression, from that one checkpoint. `from_base` (`epic demo --from-base`) is the earlier experiment instead:
    stage 1 learns the scored question itself and stage 2 only fine-tunes a converged base.
    """

    seed: int = 0  # data, the stage-1 model's initialisation and training, the first stage-2 seed
    seeds: int = 3  # the headline arms (direct, TCD, TCD without KD) are trained with seeds seed, seed+1, ...
    from_base: bool = False
    quick: bool = False  # `epic demo --quick`: the mechanics end to end, sizes too small for its numbers to mean much
    # the built-in data
    image_size: int = 48
    patch_size: int = 6
    grid: int = 3
    min_shapes: int = 3
    max_shapes: int = 7
    # the scored question, the colour of the shape at a named place: every question needs one region of the image,
    # and which one is known only from the question, so a budget that drops that region costs the answer (see
    # docs/demo.md for why one type: a model this small learns each type in turn)
    question_types: tuple[str, ...] = ("colour",)
    multi_turn: bool = False  # True: each scene's questions as one conversation (slower to learn, measured)
    n_train: int = 24000  # stage-2 questions
    n_test: int = 2000
    # stage 1: what the model learns before stage 2 (its own scenes, drawn with seed + STAGE1_SEED_OFFSET)
    stage1_types: tuple[str, ...] = ("shape",)  # the kind of the shape at a named place: seeing places, not colour
    stage1_questions: int = 12000
    stage1_captions: int = 12000  # "top left: red circle; center: blue square."
    caption_style: str = "places"
    stage1_test: int = 1000
    # the model: a one-layer CLIP tower (its patch embedding is the visual feature), a Llama decoder
    hidden_size: int = 64
    num_layers: int = 6
    num_heads: int = 4
    layer: int = 2  # K: compression before this decoder layer
    template: str = "chatml"
    # training
    batch_size: int = 32
    stage1_steps: int = 4000  # 3,000 left seed 1 at 87.7% on its own questions (one process): see docs/demo.md
    stage1_lr: float = 3e-3
    stage1_schedule: str = "constant_with_warmup"  # the place-keyed answers form late: the rate must not decay first
    warmup_ratio: float = 0.03
    adam_beta2: float = 0.98  # a short memory for a small model's fast-changing gradients
    stage2_steps: int = 600  # every arm trains this many steps from the stage-1 model
    stage2_lr: float = 1e-3
    stage2_schedule: str = "constant_with_warmup"
    hold: float = 0.3  # TCD and LCD reach the target budget / layer at 1 - hold of stage 2 and train there after
    tcd_r_max_start: float | None = 0.3  # TCD's student ratio starts in [0.1, this], ends at the target (None: preset)
    # evaluated (name@K: at layer K instead of `layer`; 0: before the LLM)
    methods: tuple[str, ...] = ("dart", "fastv", "random", "pdrop", "divprune@0", "dart_pre@0", "visionzip@0")
    train_method: str = "dart"
    workers: int = 2  # processes, one thread each
    eval_batch_size: int = 64
    pictures: int = 3
    # `epic demo --kd` (LLaVA-KD's ablation): a student narrower and shallower than the base model, its teacher
    kd_student_hidden: int = 32
    kd_student_layers: int = 4
    kd_pt_steps: int = 200  # PT / DPT: the projector alone
    kd_sft_steps: int = 500  # SFT: projector and LLM (with 2,000 + 1,000 the student alone reaches 100%: measured)
    kd_dft_steps: int = 500  # DFT: projector and LLM with the teacher (PT-SFT: as many more SFT steps)
    kd_pt_lr: float = 1e-3
    kd_lr: float = 3e-3  # the student's LLM starts from random weights, like the base model's
    kd_weights: str = "released"

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def budgets(self) -> list[int]:
        return scaled_budgets(self.image_tokens)

    @property
    def target_tokens(self) -> int:
        """The training budget: 64 of 576 mapped onto N (N/9)."""
        return scaled_budget(self.image_tokens, HEADLINE_BUDGET)

    @property
    def headline_budgets(self) -> list[int]:
        """The headline's budgets: N/9 (the training budget) and N/16 (the paper's "low ROI" region)."""
        return [self.target_tokens, scaled_budget(self.image_tokens, LOW_BUDGET)]

    def spec(self) -> TinyLlavaSpec:
        return TinyLlavaSpec(
            hidden_size=self.hidden_size,
            intermediate_size=2 * self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_hidden_size=64,
            vision_layers=1,
            vision_heads=2,
            position_code_scale=0.3,  # places are learnt early (see init_position_codes)
        )

    def kd_student_spec(self) -> TinyLlavaSpec:
        """The `--kd` student: the base model's vision tower and image size, a smaller Llama."""
        return replace(
            self.spec(),
            hidden_size=self.kd_student_hidden,
            intermediate_size=2 * self.kd_student_hidden,
            num_layers=self.kd_student_layers,
        )

    def kd_key(self) -> dict[str, Any]:
        """Everything the `--kd` students depend on besides the base model."""
        return {key: value for key, value in self.as_dict().items() if key.startswith("kd_")} | {
            "seed": self.seed,
            "template": self.template,
            "batch_size": self.batch_size,
            "spec": asdict(self.kd_student_spec()),
        }

    @property
    def stage1_name(self) -> str:
        """The stage-1 model's folder under `models/`: `base` for `--from-base`, else `stage1`."""
        return "base" if self.from_base else "stage1"

    def synth(self) -> SynthConfig:
        """The stage-2 data: the scored questions (train and test)."""
        return SynthConfig(
            n_train=self.n_train,
            n_val=0,
            n_test=self.n_test,
            n_captions=0,
            image_size=self.image_size,
            grid=self.grid,
            min_shapes=self.min_shapes,
            max_shapes=self.max_shapes,
            questions_per_scene=len(self.question_types),
            question_types=self.question_types,
            multi_turn_train=self.multi_turn,
            seed=self.seed,
        )

    def stage1_synth(self) -> SynthConfig:
        """The stage-1 data: captions and the stage-1 question types, on scenes of their own."""
        return replace(
            self.synth(),
            n_train=self.stage1_questions,
            n_test=self.stage1_test,
            n_captions=self.stage1_captions,
            caption_style=self.caption_style,
            questions_per_scene=len(self.stage1_types),
            question_types=self.stage1_types,
            multi_turn_train=False,
            seed=self.seed + STAGE1_SEED_OFFSET,
        )

    def stage1_key(self) -> dict[str, Any]:
        """Everything the stage-1 model depends on: a cached one is reused only when this matches."""
        keys = ("seed", "from_base", "image_size", "patch_size", "grid", "min_shapes", "max_shapes", "question_types")
        keys += ("n_train", "multi_turn", "stage1_types", "stage1_questions", "stage1_captions", "caption_style")
        keys += ("hidden_size", "num_layers", "num_heads", "template", "batch_size", "stage1_steps", "stage1_lr")
        keys += ("stage1_schedule", "warmup_ratio", "adam_beta2")
        return {key: getattr(self, key) for key in keys} | {"workers": self.workers, "spec": asdict(self.spec())}

    def chance(self) -> float:
        """The scored question's chance level (percent): a uniform guess among its possible answers."""
        return chance_accuracy(self.question_types)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


STAGE1_SEED_OFFSET = 1000  # stage 1 draws its own scenes: no stage-2 image is seen before stage 2

# `epic demo --from-base`: the earlier experiment, every arm a short fine-tune of a base that already answers the
# scored question at full tokens (stage 1 trains on the stage-2 questions themselves, 4,000 steps)
FROM_BASE = {
    "from_base": True,
    "seeds": 2,
    "stage1_types": ("colour",),
    "stage1_captions": 0,
    "stage1_steps": 4000,
    "stage2_steps": 300,
    "stage2_lr": 1e-3,
    "stage2_schedule": "cosine",
    "hold": 0.0,
    "tcd_r_max_start": None,
}

QUICK = {
    "quick": True,
    "seeds": 1,
    "n_train": 1500,
    "n_test": 120,
    "stage1_questions": 600,
    "stage1_captions": 600,
    "stage1_test": 100,
    "hidden_size": 32,
    "num_layers": 4,
    "batch_size": 16,
    "stage1_steps": 60,
    "stage2_steps": 20,
    "pictures": 1,
    "kd_student_hidden": 16,
    "kd_pt_steps": 5,
    "kd_sft_steps": 10,
    "kd_dft_steps": 10,
}


def demo_config(quick: bool = False, seed: int = 0, from_base: bool = False, **overrides: Any) -> DemoConfig:
    """The full demo's settings, or `--quick`'s (the same pipeline, smaller everywhere); `from_base` gives the
    earlier fine-tune-a-converged-base experiment."""
    preset = (FROM_BASE if from_base else {}) | (QUICK if quick else {})
    return replace(DemoConfig(seed=seed), **(preset | overrides))


ARMS = ("sft", "direct", "tcd", "tcd-nokd", "lcd")  # stage 2, in the reports' order
HEADLINE_ARMS = ("direct", "tcd", "tcd-nokd")  # trained with `config.seeds` seeds; the others with the first
KD_ARMS = ("pt-sft", "dpt-sft-dft")  # `epic demo --kd`: LLaVA-KD's ablation, without KD and with it


def model_name(arm: str, seed_index: int) -> str:
    """`tcd` for the first fine-tuning seed, `tcd-seed2` for the second, ..."""
    return arm if seed_index == 0 else f"{arm}-seed{seed_index + 1}"


def arm_runs(config: DemoConfig) -> list[tuple[str, str, int]]:
    """(model name, arm, seed) of every stage-2 run: the headline arms on every seed, the others on the first."""
    runs = []
    for index in range(config.seeds):
        for arm in ARMS:
            if index == 0 or arm in HEADLINE_ARMS:
                runs.append((model_name(arm, index), arm, config.seed + index))
    return runs


def seed_names(config: DemoConfig, arm: str) -> list[str]:
    """The model names of `arm`'s runs, first seed first."""
    return [name for name, kind, _ in arm_runs(config) if kind == arm]
