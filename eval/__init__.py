"""Eval harness: a pure HTTP client that scores served models on held-out data and compares them.

``run_eval`` is imported lazily so that ``loraplex --help`` does not load numpy, rouge-score and friends."""


def __getattr__(name):
    if name == "run_eval":
        from .runner import run_eval

        return run_eval
    raise AttributeError(name)
