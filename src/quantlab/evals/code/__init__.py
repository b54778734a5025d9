"""Code-generation benchmarks: HumanEval and BabelCode / MultiPL-E, judged in the sandbox."""
