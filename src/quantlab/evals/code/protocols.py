"""Prompt protocols of the code evaluators: how a problem becomes a prompt, and how the model's text
becomes the completion that is tested.

Every code metric records its protocol (name and everything that defines it: templates, stop
sequences, post-processing rule) in its provenance; two runs under different protocols are different
experiments. A protocol is chosen with ``eval.<name>.protocol``; each model preset names its default
(``model.code_protocol``: base models ``plain``, chat/instruct models ``instruct``), the SmoothQuant+
paper presets use ``sqplus``.

============  ==========================================================================================
protocol      what it is
============  ==========================================================================================
``plain``     Codex / human-eval: the problem's prompt as-is, the model continues it, the completion is
              cut at the dataset's stop sequences (HumanEval: ``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``,
              ``\\nprint``). For base models. Every language.
``chat``      the prompt inside the tokenizer's chat template after an instruction; the assistant turn
              is pre-filled with a code fence and the prompt, so the completion still continues the
              prompt; a closing fence also stops it. Every language. (Kept for comparison: instruct
              models rarely continue a pre-filled prompt; SmolLM2-135M scores 0/164 with it.)
``instruct``  EvalPlus's chat prompt (``evalplus/provider/utility.py`` ``make_raw_chat_prompt`` with
              ``codegen.py``'s default prefixes): the user asks for a self-contained script in a
              markdown block, the assistant turn is pre-filled with the response prefix and an opening
              ``\\`\\`\\`python`` fence, and generation stops as soon as the block closes (stops:
              :data:`INSTRUCT_STOPS`, EvalPlus's list). The code block is extracted
              (:func:`extract_code_block`) and sanitized (:func:`keep_definitions`); the tested program
              is ``prompt + extracted code + tests`` (the prompt keeps its imports and helpers).
              Python only.
``sqplus``    the SmoothQuant+ paper's own harness (Adlik/vllm ``examples/test_codellama_human_eval.py``):
              the Alpaca-style template :data:`SQPLUS_TEMPLATE`, greedy, up to 2048 new tokens, no stop
              sequence (EOS only), then its post-processing (:func:`sqplus_postprocess`); the result is
              the human-eval completion (``prompt + completion + tests``). Python only.
============  ==========================================================================================

Where quantlab's ``instruct`` differs from EvalPlus: EvalPlus tests the sanitized script alone
(``sanitize`` with tree-sitter keeps the entry point's dependencies); quantlab keeps every top-level
import, function, class and assignment of the block (Python's :mod:`ast`) and puts the HumanEval prompt
in front, so the prompt's imports and helper functions are always there. A block that does not parse
is tested as it is (it fails); a block that is a function body (its first line indented) continues the
prompt instead.
"""
from __future__ import annotations

import ast
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from quantlab.errors import ConfigError
from quantlab.evals.code.problem import CodeProblem
from quantlab.generation import Completion, GenRequest

PROTOCOLS: tuple[str, ...] = ("plain", "chat", "instruct", "sqplus")
LANGUAGE_NAMES = {"python": "Python", "java": "Java", "go": "Go", "cpp": "C++"}
FENCE = {"python": "python", "java": "java", "go": "go", "cpp": "cpp"}

CHAT_INSTRUCTION = "Complete the following {language} code. Reply with the completed code only."
#: ``evalplus/codegen.py`` defaults
INSTRUCT_PREFIX = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and passes "
                   "corresponding tests:")
#: the closing fence ends the block; EvalPlus's EOS list (``provider/utility.py``) cuts example code
INSTRUCT_STOPS: tuple[str, ...] = ("\n```", "<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__",
                                   "\ndef main(", "\nprint(")
_SPLITTER = "-[[]]-quantlab-response-splitter-[[]]-"
#: Adlik/vllm examples/test_codellama_human_eval.py, verbatim
SQPLUS_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n\n### Instruction:\nCreate a Python script for this problem:\n{prompt}\n\n"
                   "### Response:")
SQPLUS_MAX_NEW_TOKENS = 2048
_FENCE_LINE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[ \t]*$")
_KEEP_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
               ast.AnnAssign)


# --------------------------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class Extracted:
    """A code block taken from a reply: ``code`` and the rule that picked it (recorded per sample)."""

    code: str
    rule: str


def code_blocks(text: str) -> list[tuple[str, str, bool]]:
    """Fenced blocks of ``text`` as ``(language tag, code, closed)``; a block whose closing fence is
    missing runs to the end of the text."""
    blocks: list[tuple[str, str, bool]] = []
    tag: str | None = None
    body: list[str] = []
    for line in text.split("\n"):
        m = _FENCE_LINE.match(line)
        if tag is None:
            if m:
                tag, body = m.group(1).lower(), []
        elif m and not m.group(1):
            blocks.append((tag, "\n".join(body), True))
            tag = None
        else:
            body.append(line)
    if tag is not None:
        blocks.append((tag, "\n".join(body), False))
    return blocks


def extract_code_block(text: str, entry_point: str | None = None) -> Extracted:
    """The code of a reply.

    Rule: no fenced block -> the whole reply; one block -> it; several -> the first that defines
    ``entry_point`` (``def <entry_point>(``), else the first one; a block without its closing fence
    runs to the end of the reply.
    """
    blocks = code_blocks(text)
    if not blocks:
        return Extracted(text, "no fence: whole reply")
    pick = 0
    if len(blocks) > 1 and entry_point:
        defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        pick = next((i for i, b in enumerate(blocks) if defines.search(b[1])), 0)
    tag, code, closed = blocks[pick]
    rule = f"block {pick + 1} of {len(blocks)}" + ("" if closed else ", closing fence missing")
    return Extracted(code, rule)


def keep_definitions(code: str) -> tuple[str, str]:
    """``(code, rule)``: the top-level imports, functions, classes and assignments of ``code`` (example
    calls, prints, asserts and ``if __name__ == "__main__":`` blocks dropped), in source order with
    their own text. Code that does not parse is returned unchanged (it will fail when run)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code, "does not parse: kept as is"
    lines = code.split("\n")
    kept, dropped = [], 0
    for node in tree.body:
        if not isinstance(node, _KEEP_NODES):
            dropped += 1
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        kept.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n".join(kept), f"kept {len(kept)} definitions, dropped {dropped} statements"


def instruct_completion(reply: str, entry_point: str, closed: bool = False) -> tuple[str, str]:
    """``(completion, rule)`` of an ``instruct`` reply (the text after the pre-filled opening fence):
    the completion goes right after the HumanEval prompt, before the tests. ``closed``: generation
    ended at a stop sequence (the closing fence, or one of EvalPlus's), which the text no longer holds:
    the block ends there."""
    block = extract_code_block("```python\n" + reply + ("\n```" if closed else ""), entry_point)
    first = next((ln for ln in block.code.split("\n") if ln.strip()), "")
    if first[:1] in (" ", "\t"):  # a function body: it continues the prompt's signature
        return block.code.rstrip() + "\n", f"{block.rule}; body continues the prompt"
    code, rule = keep_definitions(block.code)
    return "\n" + code.rstrip() + "\n", f"{block.rule}; {rule}"


def sqplus_postprocess(text: str) -> str:
    """The SmoothQuant+ harness's post-processing of one output, rule by rule (``re_process``):

    1. the text after the last ``### Response:``;
    2. if it holds ```` ```python````: from there, stripped, every ```` ```python```` removed, then cut
       before the next ```` ``` ```` and stripped (no closing fence: kept to the end);
    3. cut before ``if __name__ == '__main__':``, ``# Example usage``, ``###`` and ``</s>``, in that
       order, stripping after each cut.

    One deviation: the reference tests for ``__name__ == '__main__'`` but cuts at
    ``if __name__ == '__main__':``, so a text holding the first without the second made it crash;
    here such a text is left uncut.
    """
    out = text.split("### Response:")[-1]
    if "```python" in out:
        out = out[out.index("```python"):].strip().replace("```python", "")
        if "```" in out:
            out = out[: out.index("```")].strip()
    for marker in ("if __name__ == '__main__':", "# Example usage", "###", "</s>"):
        if marker in out:
            out = out[: out.index(marker)].strip()
    return out


# ---------------------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class PromptProtocol(ABC):
    """How problems become prompts and replies become tested completions.

    Attributes:
        key: config key prefix for errors (``eval.humaneval``).
        instruction: the user instruction (``chat``: ``{language}`` is filled in; ``instruct``: the
            prefix before the fenced problem); ``None`` = the protocol's default.
        response_prefix: ``instruct`` only: the pre-filled start of the assistant turn.
    """

    key: str = "eval"
    instruction: str | None = None
    response_prefix: str | None = None

    name: ClassVar[str] = ""
    #: languages the protocol is defined for (``None``: all)
    languages: ClassVar[tuple[str, ...] | None] = None
    default_max_new_tokens: ClassVar[int] = 512

    @abstractmethod
    def request(self, problem: CodeProblem, tokenizer: Any, stop: tuple[str, ...] | None) -> GenRequest:
        """The generation request of ``problem`` (``stop`` replaces the protocol's stops when given)."""

    def completion(self, problem: CodeProblem, comp: Completion) -> tuple[str, str]:
        """``(completion passed to problem.program, post-processing note)`` of a generated completion
        (its text is already cut before the stop sequence that ended it)."""
        return comp.text, ""

    def describe(self) -> dict[str, Any]:
        """Everything that defines the protocol (recorded with every metric)."""
        return {"name": self.name}

    def check_language(self, language: str) -> None:
        if self.languages is not None and language not in self.languages:
            raise ConfigError(f"{self.key}.protocol", f"{self.name!r} is defined for {list(self.languages)} only, "
                                                       f"not {language!r}; use plain or chat")

    def _chat(self, tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{self.key}.protocol", f"{self.name} needs a tokenizer with a chat template; "
                                                       "use plain for base models")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@dataclass(frozen=True)
class Plain(PromptProtocol):
    """The prompt as-is (Codex); completions continue it."""

    name: ClassVar[str] = "plain"

    def request(self, problem: CodeProblem, tokenizer: Any, stop: tuple[str, ...] | None) -> GenRequest:
        return GenRequest(problem.prompt, tuple(stop) if stop is not None else tuple(problem.stop))


@dataclass(frozen=True)
class Chat(PromptProtocol):
    """Chat template, pre-filled fence + prompt in the assistant turn; completions continue the prompt."""

    name: ClassVar[str] = "chat"

    @property
    def text(self) -> str:
        return self.instruction if self.instruction is not None else CHAT_INSTRUCTION

    def request(self, problem: CodeProblem, tokenizer: Any, stop: tuple[str, ...] | None) -> GenRequest:
        base = tuple(stop) if stop is not None else tuple(problem.stop)
        lang = problem.language
        fence = FENCE.get(lang, lang)
        text = self.text.format(language=LANGUAGE_NAMES.get(lang, lang))
        head = self._chat(tokenizer, [{"role": "user", "content": f"{text}\n```{fence}\n{problem.prompt}```"}], True)
        # the prompt ends inside a code fence: the model closing it ("```", also at the very start) ends the code
        return GenRequest(f"{head}```{fence}\n{problem.prompt}", (*base, "```"), add_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "instruction": self.text}


@dataclass(frozen=True)
class Instruct(PromptProtocol):
    """EvalPlus's chat prompt, code-block extraction, ``prompt + code + tests`` (see the module docstring)."""

    name: ClassVar[str] = "instruct"
    languages: ClassVar[tuple[str, ...] | None] = ("python",)
    default_max_new_tokens: ClassVar[int] = 768  # evalplus codegen's default

    @property
    def prefixes(self) -> tuple[str, str]:
        return (self.instruction if self.instruction is not None else INSTRUCT_PREFIX,
                self.response_prefix if self.response_prefix is not None else RESPONSE_PREFIX)

    def request(self, problem: CodeProblem, tokenizer: Any, stop: tuple[str, ...] | None) -> GenRequest:
        self.check_language(problem.language)
        ask, answer = self.prefixes
        messages = [{"role": "user", "content": f"{ask}\n```\n{problem.prompt.strip()}\n```\n"},
                    {"role": "assistant", "content": f"{answer}\n```python\n{_SPLITTER}\n```\n"}]
        text = self._chat(tokenizer, messages, False)
        if _SPLITTER not in text:
            raise ConfigError(f"{self.key}.protocol", "the chat template drops the assistant turn; cannot pre-fill it")
        prompt = text.split(_SPLITTER)[0]
        return GenRequest(prompt, tuple(stop) if stop is not None else INSTRUCT_STOPS, add_special_tokens=False)

    def completion(self, problem: CodeProblem, comp: Completion) -> tuple[str, str]:
        return instruct_completion(comp.text, getattr(problem, "entry_point", "") or "",
                                   closed=comp.finish_reason == "stop")

    def describe(self) -> dict[str, Any]:
        ask, answer = self.prefixes
        return {"name": self.name, "instruction_prefix": ask, "response_prefix": answer,
                "post_processing": "code block (first defining the entry point) -> top-level definitions "
                                   "(ast) -> prompt + code + tests; v1"}


@dataclass(frozen=True)
class SqPlus(PromptProtocol):
    """The SmoothQuant+ paper's HumanEval harness (see the module docstring)."""

    name: ClassVar[str] = "sqplus"
    languages: ClassVar[tuple[str, ...] | None] = ("python",)
    default_max_new_tokens: ClassVar[int] = SQPLUS_MAX_NEW_TOKENS

    def request(self, problem: CodeProblem, tokenizer: Any, stop: tuple[str, ...] | None) -> GenRequest:
        self.check_language(problem.language)
        # vLLM tokenizes with the tokenizer's special tokens (BOS for Llama); no stop string, EOS only
        return GenRequest(SQPLUS_TEMPLATE.format(prompt=problem.prompt), tuple(stop) if stop is not None else ())

    def completion(self, problem: CodeProblem, comp: Completion) -> tuple[str, str]:
        return sqplus_postprocess(comp.text), "sqplus post-processing"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "template": SQPLUS_TEMPLATE, "source": "Adlik/vllm examples/test_codellama_human_eval.py",
                "post_processing": "after last '### Response:'; ```python block; cut at if __name__ / "
                                   "# Example usage / ### / </s>; v1"}

    def deviations(self, do_sample: bool, max_new_tokens: int, stop: tuple[str, ...] | None) -> list[str]:
        """Settings that differ from the paper's harness (recorded; the metric is then not the paper's)."""
        out = []
        if do_sample:
            out.append("do_sample=true (paper: greedy)")
        if max_new_tokens != SQPLUS_MAX_NEW_TOKENS:
            out.append(f"max_new_tokens={max_new_tokens} (paper: {SQPLUS_MAX_NEW_TOKENS})")
        if stop:
            out.append(f"stop={list(stop)} (paper: EOS only)")
        return out


_CLASSES: dict[str, type[PromptProtocol]] = {c.name: c for c in (Plain, Chat, Instruct, SqPlus)}


def make_protocol(name: str, key: str, instruction: str | None = None, response_prefix: str | None = None) -> PromptProtocol:
    """The protocol ``name`` (ConfigError naming ``<key>.protocol`` for an unknown one)."""
    if name not in _CLASSES:
        raise ConfigError(f"{key}.protocol", f"must be one of {list(PROTOCOLS)}, got {name!r}")
    if response_prefix is not None and name != "instruct":
        raise ConfigError(f"{key}.response_prefix", f"only the instruct protocol has one (protocol is {name!r})")
    if instruction is not None and name in ("plain", "sqplus"):
        raise ConfigError(f"{key}.instruction", f"the {name} protocol has no instruction")
    return _CLASSES[name](key=key, instruction=instruction, response_prefix=response_prefix)
