"""``evaluate``: perplexity and bits per byte, lm-eval tasks, local tasks from text, comparisons."""

from .._lazy import lazy_exports

_MODULES = {  # module -> the public names it defines
    ".harness": "evaluate run_evaluate EvaluateConfig",
    ".perplexity": "run_perplexity PerplexityConfig PerplexityResult score_documents score_token_stream",
    ".tasks": "make_tasks MakeTasksConfig",
    ".compare": "plot_comparison",
}
__all__ = sorted(name for names in _MODULES.values() for name in names.split())
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
