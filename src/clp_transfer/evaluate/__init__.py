"""``evaluate``: perplexity and bits per byte, lm-eval tasks, local tasks from text, comparisons."""

from .._lazy import lazy_exports

_EXPORTS = {
    "evaluate": ".harness",
    "run_evaluate": ".harness",
    "EvaluateConfig": ".harness",
    "run_perplexity": ".perplexity",
    "PerplexityConfig": ".perplexity",
    "PerplexityResult": ".perplexity",
    "score_documents": ".perplexity",
    "score_token_stream": ".perplexity",
    "make_tasks": ".tasks",
    "MakeTasksConfig": ".tasks",
    "plot_comparison": ".compare",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
