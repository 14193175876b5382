"""Few-shot prompts for model generators, the parser of their outputs, and the round's pool file.

Shared by the ``hf`` (:mod:`evoray.generate.hf`) and ``vllm`` (:mod:`evoray.generate.vllm`)
generators. Both send a plain-text completion prompt (no chat template) and parse the text the
model writes after it.

Prompt format
-------------
Candidate ``i`` of a round is shown ``shots`` target examples drawn without replacement by
:func:`plan_shots` (``random.Random(f"evoray:fewshot:{seed}")``, one draw per candidate, in
order), then asked for one more::

    Here are examples of a task. Each example is a prompt and its response. Write one new
    example of the same task, different from these, in exactly the same format.

    ### Example 1
    Prompt:
    <target prompt>
    Response:
    <target response>

    ### Example 2
    ...

    ### Example <shots + 1>
    Prompt:

The prompt ends with :data:`PRIMER` (``"Prompt:\\n"``), so the model starts writing the new
prompt at once; the generators parse ``PRIMER + generation``. Generation stops at :data:`END`
(``"\\n###"``, the model starting the next example's header), at EOS, or at ``max_new_tokens``.

Parser rules (:func:`parse_generation`)
---------------------------------------
* Markers are lines starting with ``Prompt:`` or ``Response:`` (optionally in ``**bold**``;
  text may follow the colon on the same line). Case matters; ``\\r\\n`` counts as ``\\n``.
* The **response** starts after the first ``Response:`` marker; the **prompt** is the text
  between the last ``Prompt:`` marker before it and it. Text before that ``Prompt:`` (chatter
  such as "Sure, here is one:") is ignored; no ``Prompt:`` before a ``Response:`` → unparsable.
* The response ends at the first following line that starts with ``###`` (the next example's
  header) or is a marker line (a further example). Without such a line the text's end closes
  it, but only when the generation was ``complete`` (stopped by EOS or :data:`END`, not cut at
  ``max_new_tokens``): a cut response may be truncated, so it is dropped.
* Prompt and response are stripped of surrounding whitespace and must be non-empty
  (:func:`evoray.data.records.validate_record`); a prompt holding a ``###`` line is rejected.
* **Multiple choice**: when the prompt ends with ``Answer:`` (as the built-in tasks' do, see
  :func:`evoray.tasks.families.to_prompt`), it must list at least two options as lines
  ``A. ...`` / ``B) ...``, and the response's first non-empty line must be one of those letters,
  alone or followed by ``.``, ``)`` or ``:`` and any text (``B``, ``(B)``, ``B. Friday``); the
  response becomes the bare letter, and text after that line (explanations) is ignored.
  Otherwise (general tasks) the whole response is kept: a chat model's closing remarks stay in
  it unless a ``###`` or marker line separates them.
* **MCQ without a Response: marker**: small models often answer right after ``Answer:``
  (``...Answer:\\nB``). When the text has no ``Response:`` marker at all, the first ``Answer:``
  after the last ``Prompt:`` (and before any ``###`` or marker line) ends the prompt, and the
  letter is read after it by the rule above.

A parsed example is then dropped when its prompt repeats a target's prompt or an earlier
generation's of the round (whitespace-normalised): a copied shot is not a new example.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re

from evoray.data.io import write_records
from evoray.data.records import validate_record
from evoray.errors import EvorayError, RecordError

__all__ = ["GenerateError", "INSTRUCTION", "PRIMER", "END", "few_shot_prompt", "plan_shots",
           "round_prompts", "row_seed", "parse_generation", "write_pool"]

log = logging.getLogger("evoray.generate")

INSTRUCTION = ("Here are examples of a task. Each example is a prompt and its response. Write one "
               "new example of the same task, different from these, in exactly the same format.")
PRIMER = "Prompt:\n"
END = "\n###"

_MARKER = re.compile(r"^[ \t]*(?:\*\*)?(Prompt|Response)(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*", re.M)
_HEADER = re.compile(r"^[ \t]*###", re.M)
_OPTION = re.compile(r"^[ \t]*([A-Z])[.)][ \t]", re.M)
_LETTER = re.compile(r"\(?([A-Z])(?:[.):](?:\s.*)?)?")
_ANSWER = re.compile(r"Answer:")


class GenerateError(EvorayError):
    """A generator produced nothing usable, or cannot run with these inputs. ``stats`` holds
    the counts (``n``, ``dropped``, ``generations``, ...) when generation ran."""

    def __init__(self, message: str, stats: dict | None = None):
        super().__init__(message)
        self.stats = stats or {}


def few_shot_prompt(examples: list[dict]) -> str:
    """The completion prompt showing ``examples`` (records with ``prompt`` and ``response``)
    and opening the next example; see the module docstring for the format."""
    blocks = [f"### Example {n}\nPrompt:\n{ex['prompt'].strip()}\nResponse:\n"
              f"{ex['response'].strip()}" for n, ex in enumerate(examples, start=1)]
    blocks.append(f"### Example {len(examples) + 1}\n{PRIMER}")
    return INSTRUCTION + "\n\n" + "\n\n".join(blocks)


def plan_shots(n_targets: int, shots: int, pool_size: int, seed: int) -> list[list[int]]:
    """For each of ``pool_size`` candidates, the indices of the ``min(shots, n_targets)`` targets
    its prompt shows, drawn without replacement from one seeded RNG (deterministic)."""
    if shots > 0 and n_targets == 0:
        raise GenerateError(f"generate.shots={shots} but the round has no target examples to "
                            f"show; give targets or set generate.shots=0")
    rng = random.Random(f"evoray:fewshot:{seed}")
    k = min(shots, n_targets)
    return [rng.sample(range(n_targets), k) for _ in range(pool_size)]


def round_prompts(targets: list[dict], shots: int, pool_size: int,
                  seed: int) -> tuple[list[str], list[list[int]]]:
    """This round's ``pool_size`` few-shot prompts and the target indices each one shows."""
    plan = plan_shots(len(targets), shots, pool_size, seed)
    return [few_shot_prompt([targets[j] for j in row]) for row in plan], plan


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of generation ``row`` in a round of seed ``seed`` (31 bits): each row
    draws its tokens from its own stream, whichever actor or batch it lands in."""
    digest = hashlib.sha256(f"evoray:generate:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _cut(text: str) -> int | None:
    """Position of the first ``###`` or marker line in ``text``, or None."""
    hits = [m.start() for m in (_HEADER.search(text), _MARKER.search(text)) if m]
    return min(hits) if hits else None


def _choice(prompt: str, body: str, complete: bool) -> str | None:
    """The letter answering MCQ ``prompt`` at the start of response text ``body``, or None."""
    options = set(_OPTION.findall(prompt))
    if len(options) < 2:
        return None
    stripped = body.lstrip()
    first, newline, _ = stripped.partition("\n")
    if not newline and not complete:  # the line may be cut mid-way
        return None
    m = _LETTER.fullmatch(first.strip())
    return m.group(1) if m and m.group(1) in options else None


def parse_generation(text: str, *, complete: bool = True) -> tuple[str, str] | None:
    """Parse one model output into ``(prompt, response)``; None when it does not parse.

    Args:
        text: the model's text, starting with (or after chatter, containing) a ``Prompt:``
            marker; the generators pass ``PRIMER + generation``.
        complete: whether the generation ended by itself (EOS or :data:`END`) rather than at
            the token limit; an unterminated response of an incomplete text is dropped.

    Returns:
        ``(prompt, response)``, both stripped and non-empty, or None. The rules are in the
        module docstring.
    """
    text = text.replace("\r\n", "\n")
    markers = list(_MARKER.finditer(text))
    response = next((m for m in markers if m.group(1) == "Response"), None)
    end = response.start() if response else len(text)
    opens = [m for m in markers if m.group(1) == "Prompt" and m.start() < end]
    if not opens:
        return None
    if response is not None:
        prompt, rest = text[opens[-1].end():response.start()], text[response.end():]
    else:  # an MCQ answered right after its "Answer:", without a Response: marker
        region = text[opens[-1].end():]
        stop = _cut(region)
        found = _ANSWER.search(region if stop is None else region[:stop])
        if found is None:
            return None
        prompt, rest = region[:found.end()], region[found.end():]
    if _HEADER.search(prompt):
        return None
    prompt = prompt.strip()
    stop = _cut(rest)
    body = rest if stop is None else rest[:stop]
    if prompt.endswith("Answer:"):
        answer = _choice(prompt, body, complete or stop is not None)
    else:
        answer = body.strip() if stop is not None or complete else None
    if not prompt or not answer:
        return None
    try:
        validate_record({"id": "generation", "prompt": prompt, "response": answer}, "candidate",
                        path="<generation>")
    except RecordError:
        return None
    return prompt, answer


def _norm(text: str) -> str:
    return " ".join(text.split())


def write_pool(generations: list[dict], *, targets: list[dict], plan: list[list[int]],
               round: int, kind: str, model: str, out: str,
               meta: dict | None = None) -> dict:
    """Parse a round's raw generations and write the usable ones as candidate records.

    Args:
        generations: one dict per generation, in row order: ``text`` (the model's output after
            the prompt) and ``complete`` (bool; see :func:`parse_generation`).
        targets: the round's target records (copies of their prompts are dropped).
        plan: the target indices each generation's prompt showed (:func:`plan_shots`).
        round: 1-based round number (it starts every id).
        kind: ``"hf"`` or ``"vllm"``: the id infix and the ``source`` prefix.
        model: generator model spec (``source`` is ``f"{kind}:{model}"``).
        out: the pool file (JSONL or Parquet).
        meta: extra entries for every record's ``meta`` (e.g. the adapter).

    Returns:
        ``{"n": written, "dropped": generations not written, "generations": total,
        "unparsable": ..., "copies": ...}``; ``n + dropped == generations``.

    Raises:
        GenerateError: when no generation is usable (the message shows one raw output).
    """
    seen = {_norm(t["prompt"]) for t in targets}
    records, unparsable, copies = [], 0, 0
    for row, gen in enumerate(generations):
        parsed = parse_generation(PRIMER + gen["text"], complete=bool(gen["complete"]))
        if parsed is None:
            unparsable += 1
            continue
        if _norm(parsed[0]) in seen:
            copies += 1
            continue
        seen.add(_norm(parsed[0]))
        shown = [str(targets[j].get("id", j)) for j in plan[row]]
        records.append({"id": f"r{round:02d}-{kind}-{len(records):06d}", "prompt": parsed[0],
                        "response": parsed[1], "source": f"{kind}:{model}",
                        "meta": {"generation": row, "round": round, "shots": shown,
                                 **(meta or {})}})
    total = len(generations)
    stats = {"n": len(records), "dropped": total - len(records), "generations": total,
             "unparsable": unparsable, "copies": copies}
    if not records:
        sample = generations[0]["text"] if generations else ""
        why = (f"all {copies} parsed generation(s) repeat a target's or an earlier generation's "
               f"prompt" if copies else "none parsed as a (prompt, response) example")
        raise GenerateError(
            f"generate ({kind}, model {model!r}, round {round}): no usable candidate in {total} "
            f"generation(s): {why}; a raw output (after the few-shot prompt): {sample[:500]!r}. "
            f"A base or instruct model of reasonable size follows the format; see "
            f"evoray.generate.fewshot for the rules", stats)
    write_records(records, out, "candidate")
    log.info("generate (%s): %d of %d generations written to %s (%d unparsable, %d copies)",
             kind, len(records), total, out, unparsable, copies)
    return stats
