"""Sandboxed execution of untrusted (LLM-generated) programs.

Generated code runs only through :class:`Sandbox`: each :class:`Program` (files + build/run
:class:`Step` s) gets a fresh temp work dir, a stripped environment, rlimits, its own process group and
a dedicated unprivileged uid when the host is root, under bubblewrap (read-only root, private /tmp,
no network, own pid namespace) when it is usable. :mod:`quantlab.execution.toolchains` builds the
programs for Python, Java, Go and C++; ``python -m quantlab.execution.selfcheck`` checks the whole
thing on HumanEval and on hostile programs.
"""
from quantlab.execution.program import Limits, Program, ProgramResult, Step, StepResult
from quantlab.execution.sandbox import Sandbox
from quantlab.execution.toolchains import TOOLCHAINS, Toolchain, ToolchainMissing, get_toolchain

__all__ = [
    "TOOLCHAINS",
    "Limits",
    "Program",
    "ProgramResult",
    "Sandbox",
    "Step",
    "StepResult",
    "Toolchain",
    "ToolchainMissing",
    "get_toolchain",
]
