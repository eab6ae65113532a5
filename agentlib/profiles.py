"""Run profiles: one source of truth for models, question counts, SAG, LoRA and lengths.

``smoke`` (CI, minutes), ``cpu`` (default: an offline laptop run with real small models), ``paper``
(one GPU, vLLM, the paper's settings). Notebooks take ``profile`` as a papermill parameter and may
override single fields: ``get_profile("cpu", sag_n=4)``. Each setting's comment says why it has its
value; the measurements behind the ``cpu`` profile's are in ``docs/profile_choices.md``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields, replace

from agentlib.sft import SFTConfig

__all__ = [
    "Profile",
    "PROFILES",
    "Departure",
    "DEPARTURES",
    "departures_markdown",
    "get_profile",
]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    expected_wall: str
    # teacher
    teacher: str
    teacher_backend: (
        str  # "llamacpp" (local server), "hf" (in-process), "vllm" (server pool), "auto" (per machine)
    )
    teacher_max_tokens: int
    teacher_temperature: float
    teacher_top_p: float
    teacher_samples: int  # trajectories per training question (rejection sampling; the paper: 1)
    # student
    student: str
    student_backend: str
    student_max_tokens: int
    # agent
    max_steps: int
    sag_n: int
    sag_temperature: float
    sag_top_p: float
    # retrieval
    retriever: str  # "wiki_mini" (offline corpus) or a Pyserini prebuilt index name
    top_k: int
    passage_chars: int  # characters kept per retrieved passage (search observations and the RAG prompt)
    # data: (loader, name, count); loader is "train", "test", "extra"; a training spec may add a first row,
    # (loader, name, count, first): rows first .. first + count - 1
    train_factual: tuple[tuple[str, str, int] | tuple[str, str, int, int], ...]
    train_math: tuple[tuple[str, str, int] | tuple[str, str, int, int], ...]
    eval_sets: tuple[tuple[str, str, int], ...]
    answerable_only: bool  # keep only questions whose evidence is in the offline corpus
    # fine-tuning (notebook 02): the agent students' run; the CoT students' differs only in max_length
    sft: SFTConfig = field(default_factory=SFTConfig)
    sft_max_length_cot: int = 4096  # SFTConfig.max_length of the CoT students (sft.max_length: the agents')
    teacher_short_prompt: bool = (
        False  # the student's short system prompt (319 tokens, not 1.8k) for the teacher
    )
    train_unfiltered_if_empty: bool = False  # smoke: exercise SFT even when the tiny teacher solves nothing
    stop_on_repeat: bool = (
        False  # end an agent loop at a step that repeats the previous one (not in the paper)
    )
    teacher_slots: int = 6  # llama.cpp server slots for the teacher = its trajectories advanced together
    teacher_servers: int = 1  # llama.cpp teacher servers, each with an equal share of the cores
    cot_max_tokens: int | None = (
        None  # one CoT answer, teacher and student alike; None: 2 x student_max_tokens
    )
    teacher_source: str = (
        "generate"  # notebook 01: "generate" runs the teacher, "published" loads data/'s set
    )
    teacher_set: str | None = None  # the profile whose published teacher set this one uses (cpu-full: cpu)
    teacher_chunk: int = 10  # training questions per teacher chunk: all three runs, then a checkpoint/publish
    ftp_source: str = (
        "cot"  # first-thought prefix from the CoT run's answers (the authors'); "plan": asked for
    )
    sag_vote: str = (
        "logs"  # SAG groups candidates by printed logs (the authors'); "logs+answer" adds the answer
    )
    last_output: str = (
        "always"  # observations end with the code's last value (smolagents); "not_none": unless None
    )
    students: tuple[str, ...] = ()  # the student sizes of Table 2 (notebooks 02/03); () = (student,)
    judge: tuple[str, str] | None = (
        None  # (OpenAI-compatible base URL, model) scoring factual answers, or None
    )
    # ablations
    sag_sweep: tuple[int, ...] = (1, 2, 4, 8)
    k_sweep: tuple[int, ...] = (1, 3, 5)

    @property
    def cot_tokens(self) -> int:
        """Token budget of one chain-of-thought answer (teacher CoT data and the student's CoT methods)."""
        return self.cot_max_tokens or 2 * self.student_max_tokens

    @property
    def student_models(self) -> list[str]:
        """The students to train and evaluate, in Table 2's order (smallest first)."""
        return list(self.students or (self.student,))

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys([self.teacher, *self.student_models]))

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's eight test sets and their sizes (Table 1)
PAPER_TESTS = {
    "hotpotqa": 500,
    "bamboogle": 125,
    "musique": 500,
    "2wikimultihopqa": 500,
    "math500": 500,
    "gsm_hard": 500,
    "aime": 90,
    "olymath": 200,
}

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="CI: every notebook end to end in minutes; SmolLM2-135M as teacher and student.",
        expected_wall="~6 min on 2 CPU cores",
        teacher="smollm2-135m",
        teacher_backend="hf",
        teacher_max_tokens=80,
        teacher_temperature=0.0,
        teacher_top_p=1.0,
        teacher_samples=1,
        student="smollm2-135m",
        student_backend="llamacpp",
        student_max_tokens=48,
        max_steps=1,
        sag_n=2,
        sag_temperature=0.4,
        sag_top_p=0.8,
        retriever="wiki_mini",
        top_k=2,
        passage_chars=300,
        train_factual=(("extra", "hotpotqa_dev300", 3),),
        train_math=(("train", "math_medium", 2),),
        eval_sets=(("test", "hotpotqa", 2), ("test", "math500", 2)),
        answerable_only=True,
        sft=SFTConfig(lora_r=8, lora_alpha=16, num_epochs=1, batch_size=2, max_length=768, max_steps=3),
        sft_max_length_cot=512,
        train_unfiltered_if_empty=True,
        stop_on_repeat=True,
        sag_sweep=(1, 2),
        k_sweep=(1, 2),
    ),
    "cpu": Profile(
        name="cpu",
        description="Offline laptop run: Qwen2.5-Coder-1.5B teacher, Qwen2.5-Coder-0.5B student (llama.cpp or bf16).",
        expected_wall="~46-76 min on 2 cores (measurements: docs/profile_choices.md)",
        teacher="qwen2.5-coder-1.5b",
        teacher_backend="auto",  # batched bf16 transformers where bf16 is native (1.4x llama.cpp), else llama.cpp
        teacher_max_tokens=512,  # MATH thoughts in LaTeX ran past 256 tokens before their code (parse errors)
        teacher_temperature=0.7,
        teacher_top_p=0.8,
        teacher_samples=2,  # rejection sampling: a 1.5B teacher solves too few questions greedily
        teacher_source="published",  # the set in data/ (hours to regenerate on 2 cores)
        student="qwen2.5-coder-0.5b",
        student_backend="auto",  # the LoRA merged into bf16 weights, batched, where bf16 is native (1.9x); else llama.cpp
        student_max_tokens=192,
        max_steps=5,
        sag_n=2,  # N samples cost N times the student's decoding; 2 fits the CPU budget
        sag_temperature=0.4,
        sag_top_p=0.8,
        retriever="wiki_mini",
        top_k=3,
        passage_chars=400,
        # The factual questions the mini-corpus can answer, none in a test set; MATH levels 2-3, then 4-5
        train_factual=(("extra", "hotpotqa_dev300", 100), ("extra", "hotpotqa_train100", 100)),
        train_math=(("train", "math_medium", 200), ("train", "math", 100)),
        eval_sets=(
            ("test", "hotpotqa", 3),
            ("extra", "musique_train100", 1),
            ("test", "math500", 1),
            ("test", "gsm_hard", 1),
            ("test", "aime", 1),
            ("test", "olymath", 1),
        ),
        answerable_only=True,
        # 3072 keeps the teacher's agent trajectories whole; two epochs as in the paper, so few examples still train
        sft=SFTConfig(lora_r=16, lora_alpha=32, num_epochs=2, batch_size=2, max_length=3072),
        sft_max_length_cot=1024,
        cot_max_tokens=2048,  # the teacher's CoT is rarely cut before its answer; half the paper's 4,096
        stop_on_repeat=True,  # small models loop; a repeated step would run on into the step limit
        sag_vote="logs+answer",  # ours: candidates that print nothing but answer differently are not one group
        last_output="not_none",  # the 1.5B read "Last output: None" after a print as a failed step and repeated it
        teacher_slots=1,  # on 2 cores more slots decode no faster and each prefills the long prompt again
        teacher_servers=2,  # one 1-thread server per core, trajectories dealt over them
        teacher_chunk=30,  # 30 trajectories a run fill the in-process batch; a chunk is ~1 h on 2 cores
        # teacher_short_prompt stays False: on the zero-shot prompt the 1.5B wrote its own `search`
        sag_sweep=(1, 2),
        k_sweep=(1, 3),
    ),
    "paper": Profile(
        name="paper",
        description="One GPU, the paper's settings: Qwen2.5-32B-Instruct teacher on vLLM, full splits.",
        expected_wall="~20-30 H100 GPU-hours (estimate; docs/gpu.md)",
        teacher="Qwen/Qwen2.5-32B-Instruct",
        teacher_backend="vllm",
        teacher_max_tokens=1024,
        teacher_temperature=0.0,
        teacher_top_p=0.8,
        teacher_samples=1,
        student="Qwen/Qwen2.5-0.5B-Instruct",
        students=(
            "Qwen/Qwen2.5-0.5B-Instruct",
            "Qwen/Qwen2.5-1.5B-Instruct",
            "Qwen/Qwen2.5-3B-Instruct",
            "Qwen/Qwen2.5-7B-Instruct",
        ),  # Table 2's rows
        student_backend="vllm",
        student_max_tokens=1024,
        max_steps=5,
        sag_n=8,
        sag_temperature=0.4,
        sag_top_p=0.8,
        retriever="wikipedia-dpr-100w",
        top_k=3,
        passage_chars=4000,
        train_factual=(("train", "hotpotqa", 1000),),
        train_math=(("train", "math", 1000), ("train", "math_medium", 1000)),
        eval_sets=tuple(("test", name, n) for name, n in PAPER_TESTS.items()),
        answerable_only=False,
        cot_max_tokens=4096,  # the authors' CoT budget (teacher data and student evaluation)
        judge=("https://api.openai.com/v1", "gpt-4o-mini"),  # the paper's judge; any OpenAI-compatible server
        # QLoRA fits every student size on one GPU; 7B chats of ~9.8k tokens need checkpointing (docs/gpu.md)
        sft=SFTConfig(load_in_4bit=True, gradient_checkpointing=True),
        sft_max_length_cot=4096,
    ),
}


@dataclass(frozen=True)
class Departure:
    """One way this suite differs from the authors' code (Nardien/agent-distillation @ 0f6cae3)."""

    what: str
    theirs: str
    ours: str
    why: str
    profiles: str  # where it applies


DEPARTURES: tuple[Departure, ...] = (
    Departure(
        "Retriever",
        "dense e5 over the DPR Wikipedia (21M passages)",
        "Pyserini BM25: the DPR Wikipedia prebuilt index (`paper`), a 12k-passage offline mini-corpus "
        "(`cpu`, `smoke`)",
        "no embedding model or GPU offline; BM25 is exact and reproducible",
        "all",
    ),
    Departure(
        "Student fine-tuning precision",
        "bf16 LoRA",
        "4-bit QLoRA (NF4) on a GPU; bf16/fp32 LoRA on a CPU",
        "one GPU for every student size, and the same code on a laptop",
        "`paper`; `cpu` uses bf16/fp32",
    ),
    Departure(
        "Teacher",
        "Qwen2.5-32B-Instruct",
        "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
        "the largest instruct model installable offline",
        "`cpu`",
    ),
    Departure(
        "Teacher samples",
        "one greedy run per question",
        "sample 0 greedy; a question it did not solve gets a second sample at T=0.7 (rejection sampling)",
        "a 1.5B teacher solves ~10-20% greedily: too few trajectories to train on",
        "`cpu`",
    ),
    Departure(
        "Training filter",
        "correct answer, no parse error (the step-limit check never fires)",
        "also drops trajectories that hit the step limit or repeated a step",
        "the paper's text asks for it; the code's check was dead",
        "all",
    ),
    Departure(
        "Repeated steps",
        "a loop runs into the step limit",
        "a step repeating the previous one (same code, "
        "same observation) ends the loop with one request for the answer (`stop_on_repeat`)",
        "small models loop; each repeat costs a full step on 2 cores",
        "`cpu`, `smoke`",
    ),
    Departure(
        "SAG vote key",
        "printed logs",
        "printed logs and the final answer (`sag_vote='logs+answer'`)",
        "candidates that print nothing but answer differently would otherwise be one group",
        "`cpu`, `smoke` (the `paper` profile votes as the authors)",
    ),
    Departure(
        "SAG samples", "N = 8", "N = 2", "N samples cost N times the student's decoding on a CPU", "`cpu`"
    ),
    Departure(
        "CoT budget",
        "4,096 tokens",
        "2,048 tokens",
        "long enough that the teacher's CoT is rarely cut before its answer, at half the worst-case cost",
        "`cpu`",
    ),
    Departure(
        "Factual metric",
        "LLM judge (gpt-4o-mini)",
        "exact match, and the judge where the profile configures one (`judge`)",
        "no judge offline; exact match needs no server",
        "`cpu`, `smoke`",
    ),
    Departure(
        "Math grader",
        "Qwen2.5-Math's grader: numbers equal within 1e-4 relative",
        "integers exact; other numbers to the precision the prediction states; lists as multisets; "
        "math-verify for expressions",
        "1e-4 accepted 28801 for 28800",
        "all",
    ),
    Departure(
        "Last output in observations",
        "every successful step's observation ends with 'Last output from code snippet:' and the value of the "
        "last statement, `None` after a print",
        "the line only when that value is not None (`last_output='not_none'`)",
        "the 1.5B teacher read the `None` after its print as a failed step and ran the same code again",
        "`cpu`",
    ),
    Departure(
        "Passages in observations",
        "whole passages",
        "each passage cut at 400 characters",
        "observations are most of a CPU teacher's prefill",
        "`cpu`",
    ),
    Departure(
        "Training and test questions",
        "1,000 HotpotQA + 2,000 MATH; full test sets",
        "200 HotpotQA questions with evidence in the mini-corpus + 300 MATH; test subsets",
        "what 2 CPU cores can generate and score",
        "`cpu`",
    ),
)


def departures_markdown() -> str:
    """The departures as a Markdown table (``docs/departures.md`` is this text; a test keeps them equal)."""
    lines = [
        "# Departures from the authors' method",
        "",
        "Generated from `agentlib/profiles.py` (`python -m agentlib.profiles departures`); the authors' code is "
        "Nardien/agent-distillation at 0f6cae3.",
        "",
        "| what | theirs | ours | why | profiles |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {d.what} | {d.theirs} | {d.ours} | {d.why} | {d.profiles} |" for d in DEPARTURES]
    return "\n".join(lines) + "\n"


# Every method and ablation of the cpu profile at the sizes that can separate methods (hours; resumable).
PROFILES["cpu-full"] = replace(
    PROFILES["cpu"],
    name="cpu-full",
    description="The cpu profile at full n: 300 factual and 200+ math questions, AIME and OlymMATH, every ablation.",
    expected_wall="many hours on 2 cores (resumable across sessions)",
    eval_sets=(
        ("test", "hotpotqa", 200),  # the paper's HotpotQA test questions whose evidence is in the corpus
        ("extra", "musique_train100", 100),  # out of domain
        ("test", "math500", 100),
        ("test", "gsm_hard", 100),  # where the paper's code tool helps most
        ("test", "aime", 30),
        ("test", "olymath", 100),
    ),
    teacher_set="cpu",  # the same teacher data as cpu
    sag_sweep=(1, 2, 4, 8),
    k_sweep=(1, 3, 5),
)


def get_profile(name: str = "cpu", **overrides) -> Profile:
    """The profile ``name`` with single fields overridden (unknown fields raise)."""
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    profile = PROFILES[name]
    known = {f.name for f in fields(Profile)}
    bad = set(overrides) - known
    if bad:
        raise KeyError(f"unknown profile field(s) {sorted(bad)}; fields are {sorted(known)}")
    return replace(profile, **{k: v for k, v in overrides.items() if v is not None})


if __name__ == "__main__":  # `python -m agentlib.profiles models cpu` lists the models to fetch
    if len(sys.argv) == 3 and sys.argv[1] == "models":
        print(" ".join(m for m in get_profile(sys.argv[2]).models if "/" not in m))
    elif sys.argv[1:] == ["departures"]:
        print(departures_markdown(), end="")
    else:
        sys.exit("usage: python -m agentlib.profiles models PROFILE | departures")
